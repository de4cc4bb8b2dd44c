"""Child processes of the tests, the benchmark and the demo.

A :class:`Child` runs in its own session (a Ctrl-C reaches only the parent, which then stops
it), with stdout and stderr in a log file; it can be signalled, stopped with SIGTERM and a
grace period, killed, restarted (appending to its log), and asked for its CPU time.

(The stack's own services are not children: ops/devstack starts them detached and finds them
again through pid files, see :mod:`stacklib.processes`.)
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from stacklib.common import REPO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, all its threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), utime and stime; fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Child:
    """One subprocess, started by :meth:`start`, with its stdout and stderr in `log_path`.

    With ``append``, each start appends to the log after a ``=== name: start #n ===`` line
    (:meth:`log` reads the current start's part); otherwise each start truncates it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        cwd: Path = REPO,
        append: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.append = append
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_offset = 0

    def start(self) -> Self:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        with self.log_path.open("ab" if self.append else "wb") as log:
            if self.append:
                log.write(f"=== {self.name}: start #{self.starts} ===\n".encode())
                log.flush()
            self.log_offset = log.tell()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    # -- state ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    # -- signals and stopping ---------------------------------------------------------------

    def send(self, sig: signal.Signals) -> None:
        """Signal the process if it runs."""
        if self.running:
            os.kill(self.pid, sig)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM and wait: the exit code, or None if it still runs after `timeout`."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        self.send(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, timeout: float | None = 30.0) -> None:
        """SIGKILL (no clean-up at all) and wait for the exit (None: as long as it takes)."""
        if self.proc is not None:
            self.send(signal.SIGKILL)
            self.proc.wait(timeout)

    def wait_with_usage(self) -> tuple[int, float]:
        """Wait for the exit: (exit code, CPU seconds of the whole process)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode, usage.ru_utime + usage.ru_stime

    # -- its log ----------------------------------------------------------------------------

    def log(self, *, all_starts: bool = False) -> str:
        """The log of the current start (or of all of them)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0 if all_starts else self.log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        text = self.log(all_starts=True).splitlines()[-lines:]
        state = "running" if self.running else f"exited {self.returncode}"
        return f"--- {self.log_path} ({state}, last {len(text)} lines)\n" + "\n".join(text)
