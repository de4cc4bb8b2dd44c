"""Enricher processes for the integration tests, and the checks the tests share.

- :class:`Instance`: one ``python -m enricher run`` subprocess (start, SIGTERM stop, SIGKILL,
  SIGSTOP/SIGCONT), its log file and the metrics port it reports;
- :class:`Fleet` and the ``fleet`` fixture: every instance a test starts, killed at teardown
  whatever happened; when a test fails, the tail of each instance's log is attached to the
  failure report;
- :func:`produce_input` / :class:`Feeder`: input records with the Java partitioner, and where
  each one landed;
- :class:`Progress`: the service's committed input offsets, to wait on;
- :class:`BatchReference` and :func:`check_output`: the fault-free reference
  (``python -m enricher batch`` on the same input) and the exactly-once comparison with it.

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
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from stack import Record, Stack, TopicSet

from enricher import generate
from enricher.codecs import tracker
from enricher.entities import CLIENT_SESSION_SCHEMA
from stacklib.children import Child
from stacklib.client import committed_offsets, high_watermarks

REPO = Path(__file__).resolve().parent.parent
SALT = "integration-test-salt"
# Short timeouts make sessions renew a lot within the generated traffic.
FOREGROUND_TIMEOUT = 60.0
BACKGROUND_TIMEOUT = 15.0
# The session events topic's allowed lateness (event time).
LATENESS = 30.0
# Bounds for a clean SIGTERM: the service's own deadline, then slack for the interpreter.
SHUTDOWN_TIMEOUT = 15.0
STOP_SLACK = 15.0
LOG_TAIL_LINES = 40
# A wait for the service fails when its committed offsets stop moving for this long.
STALL_SECONDS = 60.0

Headers = tuple[tuple[str, bytes | None], ...]
Event = dict[str, str]
Item = tuple[str, Event]  # (device id, tracker event)


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
                state = Path(f"/proc/{self.pid}/syscall").read_text().split()
            except OSError:
                return False
            if state and state[0] == "-1":
                return True
            self.resume()
            time.sleep(0.013)  # a different moment of the batch cycle, not synchronisation
        self.pause()
        return False

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


class Progress:
    """The committed input offsets of the service's consumer group, and the input's ends.

    The service commits its input offsets in the transaction that publishes the output, so
    once every partition's committed offset is at its end, all output is committed."""

    def __init__(self, stack: Stack, group: str, topic: str) -> None:
        self.stack = stack
        self.group = group
        self.topic = topic
        meta = stack.admin().list_topics(topic, timeout=10)
        self.partitions = sorted(meta.topics[topic].partitions)
        self.consumer = self._consumer()

    def _consumer(self) -> Any:
        # read_uncommitted: an OffsetFetch for read_committed would wait for pending
        # transactional offsets (e.g. of a killed instance) instead of answering.
        return self.stack.kafka.offsets_reader(self.group, **{"auto.offset.reset": "earliest"})

    def reconnect(self) -> None:
        """A fresh client (fresh metadata), after a broker went away."""
        self.consumer.close()
        self.consumer = self._consumer()

    def _tps(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in self.partitions]

    def committed(self) -> dict[int, int]:
        found = committed_offsets(self.consumer, self._tps(), timeout=20)
        return {partition: offset for (_, partition), offset in found.items()}

    def ends(self) -> dict[int, int]:
        found = high_watermarks(self.consumer, self._tps(), timeout=10)
        return {partition: offset for (_, partition), offset in found.items()}

    def total(self) -> int:
        return sum(self.committed().values())

    def lag(self) -> dict[int, int]:
        committed, ends = self.committed(), self.ends()
        return {p: ends[p] - committed[p] for p in self.partitions if ends[p] != committed[p]}

    def wait(
        self,
        goal: Callable[[int, dict[int, int]], bool],
        what: str,
        fleet: Fleet,
        *,
        timeout: float = 300.0,
        stall: float = STALL_SECONDS,
        hint: Callable[[], str] = lambda: "",
    ) -> None:
        """Poll until ``goal(committed total, lag per partition)`` holds.

        Fails after ``timeout`` seconds, or sooner if the committed offsets do not move for
        ``stall`` seconds, or at once if an instance of ``fleet`` died unexpectedly."""
        started = last_change = time.monotonic()
        last_total = -1
        while True:
            try:
                committed, ends = self.committed(), self.ends()
            except KafkaException as error:  # e.g. a broker is down and leaders are moving
                if time.monotonic() - last_change > stall:
                    pytest.fail(f"cannot read offsets for {what}: {error}", pytrace=False)
                time.sleep(0.5)
                self.reconnect()
                continue
            total = sum(committed.values())
            lag = {p: ends[p] - committed[p] for p in self.partitions if ends[p] != committed[p]}
            if goal(total, lag):
                return
            fleet.check()
            now = time.monotonic()
            if total != last_total:
                last_total, last_change = total, now
            if now - started > timeout or now - last_change > stall:
                why = (
                    f"no committed progress for {stall:.0f}s"
                    if now - last_change > stall
                    else f"timed out after {timeout:.0f}s"
                )
                extra = hint()
                pytest.fail(
                    f"{why} waiting for {what}: committed {total} input records, lag per "
                    f"partition {lag}" + (f"\n{extra}" if extra else ""),
                    pytrace=False,
                )
            time.sleep(0.2)

    def wait_total(self, at_least: int, timeout: float, fleet: Fleet) -> None:
        """Until at least ``at_least`` input records are committed."""
        self.wait(
            lambda total, _: total >= at_least,
            f"{at_least} committed records",
            fleet,
            timeout=timeout,
        )

    def wait_done(
        self,
        timeout: float,
        fleet: Fleet,
        expected: int | None = None,
        *,
        stall: float = STALL_SECONDS,
        hint: Callable[[], str] = lambda: "",
    ) -> None:
        """Until every partition is committed up to its end (and, if given, the ends add up
        to ``expected`` records)."""
        self.wait(
            lambda total, lag: not lag and (expected is None or total == expected),
            "all input to be committed" + (f" ({expected} records)" if expected else ""),
            fleet,
            timeout=timeout,
            stall=stall,
            hint=hint,
        )

    def close(self) -> None:
        self.consumer.close()


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Input:
    """An input record to produce."""

    key: bytes | None
    value: bytes | None
    headers: Headers = ()


@dataclass(frozen=True)
class Sent:
    """An input record and where it landed."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int
    offset: int


def traffic(events: int, devices: int, seed: int) -> list[Item]:
    """Generated multi-device traffic (short timeouts: many session renewals)."""
    spec = generate.Traffic(
        events=events,
        devices=devices,
        seed=seed,
        foreground_timeout=FOREGROUND_TIMEOUT,
        background_timeout=BACKGROUND_TIMEOUT,
    )
    return list(generate.events(spec))


def as_messages(
    items: Iterable[Item], headers: Callable[[int], Headers] | None = None
) -> list[Input]:
    """Compact-JSON input records keyed by device, with headers chosen by position."""
    return [
        Input(key.encode(), tracker.dump(event), headers(i) if headers else ())
        for i, (key, event) in enumerate(items)
    ]


def _input_producer(stack: Stack) -> Any:
    # The Java client's partitioner, as a JVM collector would use.
    return stack.producer(partitioner="murmur2_random", **{"linger.ms": 20})


def _produce(
    producer: Any,
    topic: str,
    messages: Sequence[Input],
    sent: list[Sent | None],
    errors: list[str],
    *,
    pace: Callable[[int], None] | None = None,
) -> None:
    base = len(sent)
    sent.extend([None] * len(messages))

    def delivered(index: int) -> Callable[[KafkaError | None, Message], None]:
        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                errors.append(str(error))
                return
            m = messages[index]
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            sent[base + index] = Sent(m.key, m.value, m.headers, partition, offset)

        return report

    for index, m in enumerate(messages):
        if pace is not None:
            pace(index)
        headers = list(m.headers) if m.headers else None
        while True:
            try:
                producer.produce(
                    topic, key=m.key, value=m.value, headers=headers, on_delivery=delivered(index)
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)


def _finish(producer: Any, topic: str, sent: list[Sent | None], errors: list[str]) -> list[Sent]:
    remaining = producer.flush(60)
    if errors or remaining:
        raise AssertionError(
            f"producing to {topic}: {len(errors)} errors {errors[:3]}, {remaining} undelivered"
        )
    missing = [i for i, s in enumerate(sent) if s is None]
    if missing:
        raise AssertionError(f"producing to {topic}: no delivery report for {len(missing)} records")
    return [s for s in sent if s is not None]


def produce_input(stack: Stack, topic: str, messages: Sequence[Input]) -> list[Sent]:
    """Produce (idempotent, not transactional: the input's end offsets then equal the
    service's committed offsets once it is done) and return where each record landed."""
    producer = _input_producer(stack)
    sent: list[Sent | None] = []
    errors: list[str] = []
    _produce(producer, topic, messages, sent, errors)
    return _finish(producer, topic, sent, errors)


class Feeder:
    """Produces records in a background thread at about ``rate`` records per second."""

    def __init__(self, stack: Stack, topic: str, messages: Sequence[Input], rate: float) -> None:
        self.stack = stack
        self.topic = topic
        self.messages = messages
        self.rate = rate
        self.sent: list[Sent] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            producer = _input_producer(self.stack)
            started = time.monotonic()

            def pace(index: int) -> None:
                ahead = started + index / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # rate limiting, not synchronisation
                    producer.poll(0)

            sent: list[Sent | None] = []
            errors: list[str] = []
            _produce(producer, self.topic, self.messages, sent, errors, pace=pace)
            self.sent = _finish(producer, self.topic, sent, errors)
        except BaseException as error:
            self.error = error

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float = 300.0) -> list[Sent]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"producing to {self.topic} took longer than {timeout}s", pytrace=False)
        if self.error is not None:
            raise self.error
        return self.sent


# --------------------------------------------------------------------------- service settings


def service_env(stack: Stack, topics: TopicSet, **extra: str) -> dict[str, str]:
    """Settings for instances of one test: its own topics, group, Redis prefix, short timeouts."""
    return {
        **stack.env(topics),
        "ENRICHER_GROUP_ID": f"{topics.input}-group",
        "ENRICHER_REDIS_KEY_PREFIX": stack.redis_prefix(),
        "ENRICHER_SALT": SALT,
        "ENRICHER_FOREGROUND_TIMEOUT": str(FOREGROUND_TIMEOUT),
        "ENRICHER_BACKGROUND_TIMEOUT": str(BACKGROUND_TIMEOUT),
        "ENRICHER_SESSION_EVENTS_LATENESS": str(LATENESS),
        "ENRICHER_METRICS_HOST": "127.0.0.1",
        "ENRICHER_METRICS_PORT": "0",
        "ENRICHER_LOG_FORMAT": "json",
        "ENRICHER_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
        **extra,
    }


# --------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class Expected:
    """What ``enricher batch`` wrote for one event."""

    key: str
    event: dict[str, str]

    @property
    def value(self) -> bytes:
        data: bytes = tracker.dump(self.event)
        return data


class BatchReference:
    """``python -m enricher batch`` on the good input, started in the background."""

    def __init__(self, items: Sequence[Item], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.source = workdir / f"reference-{uuid.uuid4().hex[:8]}.jsonl"
        self.target = self.source.with_suffix(".out.jsonl")
        with self.source.open("wb") as out:
            for key, event in items:
                out.write(tracker.dump({"key": key, "event": event}) + b"\n")
        self.count = len(items)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICHER_")}
        argv = [
            sys.executable, "-m", "enricher", "batch",
            "--input", str(self.source), "--output", str(self.target),
            "--foreground-timeout", str(FOREGROUND_TIMEOUT),
            "--background-timeout", str(BACKGROUND_TIMEOUT),
            "--salt", SALT,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._result: dict[str, Expected] | None = None

    def result(self, timeout: float = 120.0) -> dict[str, Expected]:
        """The reference output by event id."""
        if self._result is None:
            output, _ = self.proc.communicate(timeout=timeout)
            assert self.proc.returncode == 0, f"enricher batch failed: {output.decode()}"
            expected: dict[str, Expected] = {}
            with self.target.open("rb") as lines:
                for line in lines:
                    record = json.loads(line)
                    event = record["event"]
                    expected[event["eid"]] = Expected(record["key"], event)
            errors = self.target.with_name(self.target.name + ".errors.jsonl").read_text()
            assert not errors, f"enricher batch rejected reference input:\n{errors[:2000]}"
            assert len(expected) == self.count, f"batch wrote {len(expected)} of {self.count}"
            self._result = expected
        return self._result


def client_session(event: Mapping[str, str]) -> Any:
    """The client_session entity's data in an event's ``co`` contexts (None if absent)."""
    contexts = json.loads(event.get("co", "null") or "null")
    for entity in (contexts or {}).get("data", []):
        if entity.get("schema") == CLIENT_SESSION_SCHEMA:
            return entity.get("data")
    return None


def check_output(
    output: Sequence[Record],
    expected: Mapping[str, Expected],
    sent: Sequence[Sent],
) -> None:
    """Exactly once, and equal to the reference: every expected event appears once in
    ``output`` with the reference's bytes, the input's key, headers and partition."""
    by_eid: dict[str, Sent] = {}
    for source in sent:
        try:
            by_eid[json.loads(source.value or b"")["eid"]] = source
        except (ValueError, KeyError, TypeError):
            continue
    events: dict[str, tuple[Record, dict[str, str]]] = {}
    counts: Counter[str] = Counter()
    unreadable = []
    for record in output:
        try:
            event = json.loads(record.value or b"")
            eid = event["eid"]
        except (ValueError, KeyError, TypeError):
            unreadable.append(record)
            continue
        counts[eid] += 1
        events[eid] = (record, event)
    duplicates = {eid: n for eid, n in counts.items() if n > 1}
    missing = sorted(set(expected) - set(events))
    unexpected = sorted(set(events) - set(expected))
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable output records, e.g. {unreadable[:2]}")
    if duplicates:
        problems.append(
            f"{len(duplicates)} events published more than once "
            f"({sum(duplicates.values()) - len(duplicates)} extra copies), "
            f"e.g. {list(duplicates.items())[:3]}"
        )
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} events missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected events, e.g. {unexpected[:3]}")

    sessions, events_differ, bytes_differ, keys, headers, partitions = [], [], [], [], [], []
    for eid, (record, event) in events.items():
        want = expected.get(eid)
        if want is None:
            continue
        got_session, want_session = client_session(event), client_session(want.event)
        if got_session != want_session:
            sessions.append(
                f"  {want.key} {eid}:\n    got      {got_session}\n    expected {want_session}"
            )
        elif event != want.event:
            events_differ.append(f"  {eid}:\n    got      {event}\n    expected {want.event}")
        elif record.value != want.value:
            bytes_differ.append(
                f"  {eid}:\n    got      {record.value!r}\n    expected {want.value!r}"
            )
        if record.key != want.key.encode():
            keys.append(f"  {eid}: got {record.key!r}, expected {want.key!r}")
        origin = by_eid.get(eid)
        if origin is not None and record.headers != origin.headers:
            headers.append(f"  {eid}: got {record.headers}, expected {origin.headers}")
        if origin is not None and record.partition != origin.partition:
            partitions.append(f"  {eid}: got {record.partition}, input {origin.partition}")
    for label, found in (
        ("client_session entities differ from the reference", sessions),
        ("output events differ from the reference", events_differ),
        ("output bytes differ from the reference", bytes_differ),
        ("keys differ from the input", keys),
        ("headers differ from the input", headers),
        ("output partitions differ from the input partitions", partitions),
    ):
        if found:
            problems.append(f"{len(found)} {label}, e.g.\n" + "\n".join(found[:3]))
    if problems:
        raise AssertionError(
            "output is not the reference exactly once:\n- " + "\n- ".join(problems)
        )


def read_all(stack: Stack, topics: TopicSet) -> tuple[list[Record], list[Record]]:
    """Everything committed to the output and dead-letter topics: (output, dead letters)."""
    records = stack.read_committed([topics.output, topics.dlq], timeout=120)
    return (
        [r for r in records if r.topic == topics.output],
        [r for r in records if r.topic == topics.dlq],
    )
