"""Following a process as it works: samples of its progress and of the CPU time of it, the
brokers and Redis, and the window between two samples."""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from bench.children import Child, cpu_seconds
from bench.common import BenchError, say
from bench.lab import Lab
from bench.results import Window
from bench.stack import CommittedOffsets

POLL_SECONDS = 0.5
REPORT_SECONDS = 5.0
STALL_SECONDS = 120.0
METRICS_TIMEOUT_SECONDS = 2.0
HTTP_LOG_LINE = re.compile(r"http on (\S+):(\d+) \(/metrics")
PRODUCED_METRIC = re.compile(r"^enricher_records_produced_total (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    events: int  # processed so far
    cpu_seconds: float  # of the process
    broker_cpu_seconds: float
    redis_cpu_seconds: float


def sample(lab: Lab, child: Child, events: int) -> Sample:
    """Now: ``events`` and the CPU time so far of the process, the brokers and Redis."""
    broker = sum(cpu_seconds(pid) for pid in lab.broker_pids)
    return Sample(time.monotonic(), events, child.cpu_seconds(), broker, lab.redis.cpu_seconds())


def between(first: Sample, last: Sample) -> Window:
    return Window(
        events=last.events - first.events,
        seconds=last.at - first.at,
        cpu_seconds=last.cpu_seconds - first.cpu_seconds,
        broker_cpu_seconds=last.broker_cpu_seconds - first.broker_cpu_seconds,
        redis_cpu_seconds=last.redis_cpu_seconds - first.redis_cpu_seconds,
    )


class Progress(Protocol):
    """How many events a process has done so far."""

    @property
    def last_error(self) -> str:
        """Why the count could not be read, the last time it could not."""

    def total(self) -> int | None:
        """The count now, or None when it cannot be read right now."""


class Produced:
    """The events ``enricher run`` has committed to its output: its own
    ``enricher_records_produced_total``, counted after each transaction commits, read from its
    ``/metrics`` at the address it logged."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.url = ""
        self.last_error = ""
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def total(self) -> int | None:
        """The count, or None before the process serves its metrics."""
        if not self.url:
            found = HTTP_LOG_LINE.search(self.child.log_path.read_text(errors="replace"))
            if found is None:
                return None
            self.url = f"http://{found[1]}:{found[2]}/metrics"
        try:
            with self.opener.open(self.url, timeout=METRICS_TIMEOUT_SECONDS) as response:
                text = response.read().decode()
        except OSError as error:
            self.last_error = str(error)
            return None
        value = PRODUCED_METRIC.search(text)
        if value is None:
            self.last_error = f"no enricher_records_produced_total in {self.url}"
            return None
        return int(float(value[1]))


class Rekeyed:
    """The events a mode behind the re-keying hop has committed to its output, from the
    hop's first commit on (None before it), so that a window from the first count to the
    last takes in the hop's work from its start: the hop alone may be through much of the
    input before the first enriched batch commits. Output events, not input records: a
    collector record carries several events, and the hop's own topic, written in
    transactions, holds commit markers between its records."""

    def __init__(self, hopped: CommittedOffsets, produced: Produced) -> None:
        self.hopped = hopped
        self.produced = produced
        self.started = False

    @property
    def last_error(self) -> str:
        return self.produced.last_error or self.hopped.last_error

    def total(self) -> int | None:
        if not self.started:
            self.started = bool(self.hopped.total())
            if not self.started:
                return None
        return self.produced.total()


def follow(lab: Lab, child: Child, progress: Progress, total: int, label: str) -> list[Sample]:
    """Sample ``progress`` and the CPU time of the process, the broker and Redis every
    :data:`POLL_SECONDS` until ``total`` events are done."""
    samples: list[Sample] = []
    last_change = time.monotonic()
    next_report = last_change + REPORT_SECONDS
    tick = last_change
    while True:
        if not child.running:
            raise child.failure(f"exited during {label}")
        done = progress.total()
        now = time.monotonic()
        if done is not None:
            samples.append(sample(lab, child, done))
            if done >= total:
                return samples
            if len(samples) > 1 and done != samples[-2].events:
                last_change = now
        if now - last_change > STALL_SECONDS:
            why = progress.last_error
            seen = f" (last error reading the count: {why})" if why else ""
            raise child.failure(f"committed nothing for {STALL_SECONDS:.0f}s in {label}{seen}")
        if now >= next_report and samples:
            say(f"  {label}: {samples[-1].events:,} of {total:,} events committed")
            next_report += REPORT_SECONDS
        tick += POLL_SECONDS
        time.sleep(max(0.0, tick - time.monotonic()))


def measured_window(samples: list[Sample], label: str) -> Window:
    """From the first of ``samples`` to the last."""
    first = samples[0]
    if samples[-1].at <= first.at:
        raise BenchError(
            f"{label} committed everything within one {POLL_SECONDS}s sample: too few events"
            " to measure a window (use more --events)"
        )
    return between(first, samples[-1])
