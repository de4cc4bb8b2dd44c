"""Enricher processes for the integration tests: ``enricher run`` subprocesses and the fixture.

- :class:`Instance`: one ``python -m enricher run`` subprocess (start, SIGTERM stop, SIGKILL,
  SIGSTOP/SIGCONT), its log file and the metrics port it reports;
- :class:`Fleet` and the ``fleet`` fixture: every instance a test starts, killed at teardown
  whatever happened; when a test fails, the tail of each instance's log is attached to the
  failure report;
- :func:`wait_for`: poll a condition, failing at once if an instance died.

The rest of what the tests share lives next to it: ``service_settings`` (the instances'
environment and the constants behind it), ``feeding`` (input records and producing them),
``progress`` (the committed input offsets, to wait on) and ``reference`` (the fault-free
reference and the exactly-once check).

Test modules use it with ``pytest_plugins = ["instances"]``, which registers the fixture and
the report hook below. (PYTEST_DONT_REWRITE: the test modules import this module before pytest
loads it as a plugin, so its asserts could not be rewritten anyway.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from service_settings import REPO, SHUTDOWN_TIMEOUT

from stacklib.children import Child

# After the service's own SIGTERM deadline (SHUTDOWN_TIMEOUT), slack for the interpreter.
STOP_SLACK = 15.0
LOG_TAIL_LINES = 40


# --------------------------------------------------------------------------- processes


class Instance:
    """One ``enricher run`` process; restartable, with one log file across its incarnations.

    The process itself is a :class:`stacklib.children.Child` (ops/stacklib/children.py, the
    process manager the benchmark uses too); this adds what the tests expect of it."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.child = Child(
            name,
            # faulthandler: SIGABRT (sent to a process that hangs) dumps every thread.
            [sys.executable, "-X", "faulthandler", "-m", "enricher", "run"],
            {},
            self.log_path,
            cwd=REPO,
            append=True,
        )
        self._expected = False  # running, as far as the test is concerned
        self._paused = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Instance:
        base = {k: v for k, v in os.environ.items() if not k.startswith("ENRICHER_")}
        self.child.env = {**base, **self.env}
        self.child.start()
        self._expected = True
        self._paused = False
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.proc

    @property
    def starts(self) -> int:
        return self.child.starts

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def running(self) -> bool:
        return self.child.running

    @property
    def returncode(self) -> int | None:
        return self.child.returncode

    def _signal(self, sig: signal.Signals) -> None:
        self.child.send(sig)

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT + STOP_SLACK) -> int:
        """SIGTERM, and wait for the exit; the exit code (a hang fails the test)."""
        assert self.proc is not None, f"{self.name} was never started"
        self._expected = False
        code = self.child.terminate(timeout)
        if code is None:
            self.dump_threads()
            self.kill()
            pytest.fail(
                f"{self.name} did not exit within {timeout}s of SIGTERM (thread dump at the "
                f"end of its log)\n{self.tail(200)}",
                pytrace=False,
            )
        return code

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, an open transaction stays open."""
        self._expected = False
        self.child.kill(30)

    def dump_threads(self) -> None:
        """SIGABRT: faulthandler writes every thread's Python stack to the log, then the
        process dies."""
        if self.proc is not None and self.running:
            self.resume()
            os.kill(self.pid, signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process stops dead, librdkafka's threads included."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def pause_inside_batch(self, attempts: int = 100) -> bool:
        """SIGSTOP at a moment the main thread runs Python code (Linux: /proc/<pid>/syscall
        reads ``-1``, stopped in user space), not waiting inside librdkafka for input: with a
        backlog that is the middle of a batch. Retries at other moments; False if none was
        found (the process is left paused anyway)."""
        for _ in range(attempts):
            self.pause()
            try:
                self._wait_stopped()
                state = Path(f"/proc/{self.pid}/syscall").read_text().split()
            except OSError:
                return False
            if state and state[0] == "-1":
                return True
            self.resume()
            time.sleep(0.013)  # a different moment of the batch cycle, not synchronisation
        self.pause()
        return False

    def _wait_stopped(self, timeout: float = 5.0) -> None:
        """Until the main thread has taken the SIGSTOP (its state reads ``T``): a signal is
        delivered asynchronously, and before that /proc shows the thread running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            if stat[stat.rindex(")") + 2] in "Tt":
                return
            time.sleep(0.001)  # polling the kernel's view of the process, not synchronisation

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def check(self) -> None:
        """Fail the test if the process exited while the test expected it to run."""
        if self._expected and not self.running:
            self._expected = False
            pytest.fail(
                f"{self.name} exited unexpectedly (code {self.returncode})\n{self.tail()}",
                pytrace=False,
            )

    def close(self) -> None:
        if self._paused:
            self.resume()
        self.kill()

    # -- its log ---------------------------------------------------------------------------

    def log(self, *, all_starts: bool = False) -> str:
        """The log of the current incarnation (or of all of them)."""
        return self.child.log(all_starts=all_starts)

    def messages(self, *, all_starts: bool = False) -> list[str]:
        """The ``message`` of each JSON log line (ENRICHER_LOG_FORMAT=json)."""
        out = []
        for line in self.log(all_starts=all_starts).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(str(entry.get("message", "")))
        return out

    def logged(self, needle: str, *, all_starts: bool = False) -> bool:
        return any(needle in m for m in self.messages(all_starts=all_starts))

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return self.child.tail(lines)

    def wait_logged(self, needle: str, timeout: float = 60.0) -> None:
        wait_for(
            lambda: self.logged(needle), f"{self.name} to log {needle!r}", timeout, checks=[self]
        )

    def wait_owning(self, timeout: float = 60.0) -> None:
        """Until the current incarnation logged a non-empty partition assignment."""
        wait_for(
            lambda: any(re.match(r"assigned partitions \[\d", m) for m in self.messages()),
            f"{self.name} to own partitions",
            timeout,
            checks=[self],
        )

    def metrics_port(self, timeout: float = 60.0) -> int:
        """The port of /metrics, /healthz, /readyz, from the log line that reports it."""
        found: list[int] = []

        def reported() -> bool:
            match = re.search(r"http on \S+:(\d+)", self.log())
            if match:
                found.append(int(match.group(1)))
            return bool(found)

        wait_for(reported, f"{self.name} to report its metrics port", timeout, checks=[self])
        return found[0]

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics, e.g. ``metric("enricher_records_produced_total")``."""
        url = f"http://127.0.0.1:{self.metrics_port()}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        wanted = name + (f"{{{labels}}}" if labels else "")
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_counted(self, records: int, timeout: float = 60.0) -> None:
        """Until the instance's metrics count ``records`` consumed input records. A batch's
        commit is visible to the tests' consumer a moment before the instance counts the
        batch in its metrics (more than a moment on a loaded machine): read the metrics of a
        batch only after this."""
        name = "enricher_records_consumed_total"
        wait_for(
            lambda: self.metric(name) >= records,
            f"{self.name} to count {records} consumed records",
            timeout,
            checks=[self],
            detail=lambda: f"it counts {self.metric(name):.0f}",
        )


class Fleet:
    """The instances of one test; all are killed at teardown, whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.instances: list[Instance] = []

    def add(self, name: str, env: Mapping[str, str]) -> Instance:
        """A new (not yet started) instance with its own stable transactional id."""
        instance = Instance(name, {"ENRICHER_TRANSACTIONAL_ID": f"{name}-txn", **env}, self.log_dir)
        self.instances.append(instance)
        return instance

    def check(self) -> None:
        for instance in self.instances:
            instance.check()

    def tails(self) -> str:
        return "\n".join(i.tail() for i in self.instances) or "(no instances)"

    def close(self) -> None:
        for instance in self.instances:
            instance.close()


_FLEETS = pytest.StashKey[list[Fleet]]()


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    """Enricher instances for one test: killed at teardown, logs shown if the test fails."""
    handle = Fleet(tmp_path / "instances")
    request.node.stash.setdefault(_FLEETS, []).append(handle)
    try:
        yield handle
    finally:
        handle.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for handle in item.stash.get(_FLEETS, []):
            if handle.instances:
                report.sections.append(("enricher instance logs", handle.tails()))
    return report


# --------------------------------------------------------------------------- waiting


def wait_for(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    *,
    checks: Sequence[Instance | Fleet] = (),
    detail: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``condition`` until it holds; fail with ``detail()`` after ``timeout`` seconds.

    ``checks`` fail the test at once if an instance died that should be running."""
    deadline = time.monotonic() + timeout
    while not condition():
        for check in checks:
            check.check()
        if time.monotonic() > deadline:
            extra = detail()
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f": {extra}" if extra else ""),
                pytrace=False,
            )
        time.sleep(0.2)
