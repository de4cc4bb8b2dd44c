"""What the benchmark measured, and the numbers derived from it."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# The service sends these only from inside its Lua scripts (enricher/scripts.py): the fenced
# write runs HSET, HDEL, ZADD and ZREM, the sweep HSCAN, HDEL and ZREM, the expiring sessions'
# lookup ZRANGEBYSCORE. HMGET, which the service also sends itself, is counted as sent although
# the fenced write and the lookup run one each. Everything else the service sends itself.
SCRIPT_COMMANDS = frozenset({"hget", "hset", "hscan", "hdel", "zadd", "zrem", "zrangebyscore"})
CPU_TARGET = 2.5
"""the working tree's ``enricher run`` against the baseline: times less CPU per event"""
P99_TARGET_MS = 500
MEMORY_TOLERANCE = 0.01
"""``used_memory`` growth differs by a few tenths of a per cent between runs that store the
same records (the allocator's arenas and the hashes' rehashing): a difference within this share
of the baseline's is no difference"""


@dataclass(frozen=True)
class Window:
    """Events processed in a measured interval, and CPU time in it: the process's, and that
    of the Kafka broker and Redis on the same machine (0 where they took no part)."""

    events: int
    seconds: float
    cpu_seconds: float
    broker_cpu_seconds: float = 0.0
    redis_cpu_seconds: float = 0.0

    @property
    def stack_cpu_per_1k(self) -> float:
        """CPU of the process, the broker and Redis together per 1000 events."""
        total = self.cpu_seconds + self.broker_cpu_seconds + self.redis_cpu_seconds
        return total / self.events * 1000

    @property
    def cores_busy(self) -> float:
        """How many cores the process, the broker and Redis kept busy on average."""
        return (self.cpu_seconds + self.broker_cpu_seconds + self.redis_cpu_seconds) / self.seconds

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_seconds / self.events * 1000


@dataclass(frozen=True)
class RedisUse:
    """Redis over one whole service run: commands per command name, ``used_memory`` growth."""

    calls: dict[str, int]
    memory_bytes: int

    @property
    def commands(self) -> int:
        return sum(self.calls.values())

    @property
    def sent(self) -> int:
        """Commands the client sent, without those its scripts ran."""
        return sum(n for name, n in self.calls.items() if name not in SCRIPT_COMMANDS)


@dataclass(frozen=True)
class StreamRun:
    window: Window
    redis: RedisUse


@dataclass(frozen=True)
class Latency:
    """End to end at a fixed offered load, from produce time to read_committed delivery, and
    Redis over the same run (a steady stream: every batch spans the partitions)."""

    offered_rate: float
    achieved_rate: float
    window: Window  # from the first record offered until the last read (or the deadline)
    bench_cpu_seconds: float  # the benchmark's own feeding and reading, in the window
    expected: int  # records produced after the warm-up
    received: int  # of those, read from the output before the deadline
    p50_ms: float | None  # None: that rank was not delivered before the deadline
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    redis: RedisUse

    @staticmethod
    def of(
        latencies_ms: list[float],
        *,
        offered: float,
        achieved: float,
        expected: int,
        window: Window,
        bench_cpu_seconds: float,
        redis: RedisUse,
    ) -> Latency:
        ordered = sorted(latencies_ms)

        def rank(q: float) -> float | None:
            position = max(1, math.ceil(q * expected))
            return ordered[position - 1] if position <= len(ordered) else None

        complete = len(ordered) >= expected
        return Latency(
            offered_rate=offered,
            achieved_rate=achieved,
            window=window,
            bench_cpu_seconds=bench_cpu_seconds,
            expected=expected,
            received=len(ordered),
            p50_ms=rank(0.50),
            p90_ms=rank(0.90),
            p99_ms=rank(0.99),
            max_ms=ordered[-1] if ordered and complete else None,
            redis=redis,
        )

    @property
    def commands_per_event(self) -> float:
        return self.redis.commands / self.window.events

    @property
    def sent_per_event(self) -> float:
        return self.redis.sent / self.window.events


@dataclass(frozen=True)
class Throughput:
    """A streaming mode's throughput runs on the preloaded input."""

    runs: list[StreamRun]
    events: int
    devices: int

    @property
    def rate(self) -> float:
        return statistics.median(r.window.rate for r in self.runs)

    @property
    def cpu_per_1k(self) -> float:
        return statistics.median(r.window.cpu_per_1k for r in self.runs)

    @property
    def stack_cpu_per_1k(self) -> float:
        return statistics.median(r.window.stack_cpu_per_1k for r in self.runs)

    @property
    def cores_busy(self) -> float:
        return statistics.median(r.window.cores_busy for r in self.runs)

    @property
    def commands_per_event(self) -> float:
        return statistics.median(r.redis.commands / self.events for r in self.runs)

    @property
    def sent_per_event(self) -> float:
        return statistics.median(r.redis.sent / self.events for r in self.runs)

    @property
    def memory_per_device(self) -> float:
        return statistics.median(r.redis.memory_bytes / self.devices for r in self.runs)


@dataclass(frozen=True)
class Streaming(Throughput):
    """A streaming mode: throughput runs, then one latency run."""

    latency: Latency


@dataclass(frozen=True)
class Baseline(Throughput):
    """``enricher run`` from another git revision, in the same interleaved runs as the working
    tree's (``--baseline``)."""

    revision: str  # as given on the command line
    commit: str


@dataclass(frozen=True)
class OutputCheck:
    """One streaming run's output against ``enricher batch``'s (:mod:`bench.reference`)."""

    mode: str
    run: int
    records: int  # read back from the run's output topic
    devices: int  # the keys among them
    difference: str  # where the first differing device's records differ; empty: none differs

    @property
    def matched(self) -> bool:
        return not self.difference


@dataclass(frozen=True)
class Order:
    """The order in which the re-keying hop handed one device's events to the enrichment,
    read back from its topic after a run: an event is behind when its device time (``dtm``)
    is earlier than the latest of the same device before it in its partition."""

    events: int
    behind: int
    devices: int  # devices with at least one event behind
    median_behind_ms: int  # how far behind the latest device time, over the events behind
    max_behind_ms: int

    @property
    def share(self) -> float:
        return self.behind / self.events


@dataclass(frozen=True)
class Hop(Throughput):
    """The re-keying hop's throughput runs on JSON, and the order each of them delivered."""

    orders: list[Order]

    @property
    def order(self) -> Order:
        """The run with the median share of events behind."""
        ranked = sorted(self.orders, key=lambda order: order.share)
        return ranked[(len(ranked) - 1) // 2]


@dataclass(frozen=True)
class Batch:
    """``enricher batch`` runs on the JSON Lines copy of the input."""

    runs: list[Window]
    summary: str  # the command's own last line, e.g. "events=... sessions=... errors=0"

    @property
    def rate(self) -> float:
        return statistics.median(w.rate for w in self.runs)

    @property
    def cpu_per_1k(self) -> float:
        return statistics.median(w.cpu_per_1k for w in self.runs)

    @property
    def rate_per_cpu_second(self) -> float:
        return statistics.median(w.events / w.cpu_seconds for w in self.runs)


@dataclass(frozen=True)
class Memory:
    """``used_memory`` before and after ``enricher batch --redis-url`` wrote one record per
    device."""

    devices: int
    before: int
    after: int

    @property
    def per_device(self) -> float:
        return (self.after - self.before) / self.devices


@dataclass(frozen=True)
class Target:
    goal: str
    measured: str
    met: bool


@dataclass(frozen=True)
class Results:
    plan: dict[str, object]
    machine: dict[str, object]
    passthrough: Streaming
    enricher: Streaming
    sessions: Throughput
    """``enricher run`` with the session events topic"""
    collector: Throughput
    """``enricher run`` on the collector's records, keyed at random (the re-keying hop)"""
    collector_requests: int
    """the records (tracker POSTs) of the collector's input"""
    enriched: Throughput
    """``enricher run`` on Snowplow Enrich's TSV keyed by device (no hop)"""
    hop: Hop
    """``enricher run`` on JSON keyed at random, by ``duid`` (the re-keying hop)"""
    batch: Batch
    floor: Batch
    """the codec floor (``python -m bench.floor``) on the same file as ``batch``"""
    memory: Memory
    repair: Window
    """replaying the whole input to rebuild the state of an emptied Redis"""
    checks: list[OutputCheck]
    """the comparable streaming runs' output against ``enricher batch``'s"""
    baseline: Baseline | None
    """``--baseline``: ``enricher run`` at that revision"""

    def ratio(self, rate: float) -> float:
        return rate / self.passthrough.rate

    def baseline_cpu_ratio(self, baseline: Baseline) -> float:
        """The baseline's CPU per event against the working tree's ``enricher run``."""
        return baseline.cpu_per_1k / self.enricher.cpu_per_1k

    def floor_ratio(self) -> float:
        """Batch mode's events per CPU second against the codec floor's, both in this run."""
        return self.batch.rate_per_cpu_second / self.floor.rate_per_cpu_second

    def targets(self) -> list[Target]:
        enricher, batch, sessions = self.enricher, self.batch, self.sessions
        ratio = self.ratio(enricher.rate)
        with_sessions = sessions.rate / enricher.rate
        p99 = enricher.latency.p99_ms
        steady = enricher.latency
        return [
            Target(
                "enricher exactly-once >= 0.6x passthrough",
                f"{ratio:.2f}x ({enricher.rate:,.0f} vs {self.passthrough.rate:,.0f} events/s)",
                ratio >= 0.6,
            ),
            *self._baseline_targets(),
            Target(
                "with the session events topic >= 0.9x enricher exactly-once without it",
                f"{with_sessions:.2f}x ({sessions.rate:,.0f} vs {enricher.rate:,.0f} events/s)",
                with_sessions >= 0.9,
            ),
            Target(
                "<= 0.05 Redis commands per event (batch size 1000)",
                f"{enricher.commands_per_event:.4f} from a backlog,"
                f" {steady.commands_per_event:.4f} at half of peak load"
                f" (sent by the service: {enricher.sent_per_event:.4f},"
                f" {steady.sent_per_event:.4f})",
                max(enricher.commands_per_event, steady.commands_per_event) <= 0.05,
            ),
            Target(
                "<= 300 bytes of Redis memory per device",
                f"{self.memory.per_device:.0f} B ({self.memory.devices:,} devices)",
                self.memory.per_device <= 300,
            ),
            Target(
                ">= 50k events/s in batch mode on one core",
                f"{batch.rate:,.0f} events/s ({batch.rate_per_cpu_second:,.0f} per CPU second)",
                batch.rate >= 50_000,
            ),
            Target(
                "batch mode >= 0.5x the codec floor (events per CPU second)",
                f"{self.floor_ratio():.2f}x ({batch.rate_per_cpu_second:,.0f} vs"
                f" {self.floor.rate_per_cpu_second:,.0f} per CPU second)",
                self.floor_ratio() >= 0.5,
            ),
            Target(
                f"p99 latency <= {P99_TARGET_MS} ms at half of peak load",
                milliseconds(p99) + f" at {enricher.latency.offered_rate:,.0f} events/s",
                p99 is not None and p99 <= P99_TARGET_MS,
            ),
        ]

    def _baseline_targets(self) -> list[Target]:
        """``enricher run`` against the baseline's, when there is one: CPU, Redis commands and
        memory per device."""
        base, enricher = self.baseline, self.enricher
        if base is None:
            return []
        ratio = self.baseline_cpu_ratio(base)
        at = f"at {base.revision} (the baseline)"
        return [
            Target(
                f"enricher exactly-once: {CPU_TARGET}x less CPU per event than {at}",
                f"{ratio:.2f}x ({base.cpu_per_1k:.3f} vs {enricher.cpu_per_1k:.3f} CPU s per"
                " 1k events)",
                ratio >= CPU_TARGET,
            ),
            Target(
                f"Redis commands per event from a backlog no more than {at}",
                f"{enricher.commands_per_event:.4f} vs {base.commands_per_event:.4f}",
                enricher.commands_per_event <= base.commands_per_event,
            ),
            Target(
                f"Redis memory per device after the run no more than {at}, within"
                f" {MEMORY_TOLERANCE:.0%}",
                f"{enricher.memory_per_device:.1f} B vs {base.memory_per_device:.1f} B",
                enricher.memory_per_device <= base.memory_per_device * (1 + MEMORY_TOLERANCE),
            ),
        ]


def duration(ms: int) -> str:
    """A span of device time, in the largest unit that keeps it above 1."""
    for unit, size in (("days", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:,.1f} {unit}"
    return f"{ms} ms"


def milliseconds(value: float | None) -> str:
    if value is None:
        return "not delivered"
    return f"{value:,.0f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"
