"""Prometheus metrics (served on ``/metrics`` by :mod:`enricher.http`).

Names follow Prometheus conventions: ``enricher_`` prefix, base units, ``_total`` counters,
``_seconds`` histograms, and no per-device labels.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, utils
from prometheus_client.core import HistogramMetricFamily

from enricher import __version__

_go_float: Callable[[float], str] = utils.floatToGoString  # how prometheus_client writes "le"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
_REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    """Every metric the service exports, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("enricher_records_consumed", "Input records read", registry=r)
        self.produced = Counter(
            "enricher_records_produced", "Enriched records committed to the output", registry=r
        )
        self.dead_lettered = Counter(
            "enricher_records_dead_lettered",
            "Input records committed to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.sessions_started = Counter(
            "enricher_sessions_started", "Sessions started", ["cause"], registry=r
        )
        self.sessions_ended = Counter(
            "enricher_sessions_ended",
            "Session ends published to the session events topic",
            ["cause", "detected_by"],
            registry=r,
        )
        self.sessions_reopened = Counter(
            "enricher_sessions_reopened",
            "Late events that joined a session already declared ended",
            registry=r,
        )
        self.watermark = Gauge(
            "enricher_watermark_timestamp_seconds",
            "Each owned partition's event-time watermark (session events topic)",
            ["partition"],
            registry=r,
        )
        self.events = Counter(
            "enricher_events",
            "Enriched events by the device's lifecycle state",
            ["state"],
            registry=r,
        )
        self.batch_size = Histogram(
            "enricher_batch_size_records", "Records per batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            "enricher_batch_duration_seconds",
            "Time from a batch's consumption to its commit",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = BulkHistogram(
            "enricher_end_to_end_latency_seconds",
            "Time from an event's creation (device clock) or its Kafka timestamp to its commit",
            "clock",
            _LATENCY_BUCKETS,
            r,
        )
        self.redis_duration = Histogram(
            "enricher_redis_duration_seconds",
            "Redis round trips",
            ["operation"],
            buckets=_REDIS_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "enricher_redis_errors", "Failed Redis calls", ["operation"], registry=r
        )
        self.transactions = Counter(
            "enricher_transactions", "Kafka transactions by outcome", ["outcome"], registry=r
        )
        self.rebalances = Counter(
            "enricher_rebalances", "Partition assignment changes", ["kind"], registry=r
        )
        self.assigned = Gauge(
            "enricher_assigned_partitions", "Input partitions this instance owns", registry=r
        )
        self.lag = Gauge(
            "enricher_consumer_lag_records",
            "Records between the committed offset and the end of each owned partition",
            ["partition"],
            registry=r,
        )
        self.cache = Counter(
            "enricher_state_cache_lookups", "Device state lookups by result", ["result"], registry=r
        )
        self.expired = Counter(
            "enricher_devices_expired", "Device states deleted after the state TTL", registry=r
        )
        self.rekeyed = Counter(
            "enricher_rekeyed_events",
            "Events the re-keying hop moved to the partition of their device",
            registry=r,
        )
        self.rekey_consumed = Counter(
            "enricher_rekey_records_consumed",
            "Input records the re-keying hop consumed (a collector record holds many events)",
            registry=r,
        )
        self.state_repairs = Counter(
            "enricher_state_repairs",
            "Partitions found with less state in Redis than was committed, by what was found",
            ["found"],
            registry=r,
        )
        self.state_repair_events = Counter(
            "enricher_state_repair_events",
            "Input records replayed to rebuild lost state",
            registry=r,
        )
        self.state_repair_unreplayable = Counter(
            "enricher_state_repair_unreplayable_offsets",
            "Input offsets whose state was lost and that the input topic no longer retains",
            registry=r,
        )
        self.state_repairing = Gauge(
            "enricher_state_repairing_partitions",
            "Partitions whose state is being rebuilt from the input topic",
            registry=r,
        )
        self.build = Gauge("enricher_build_info", "Build information", ["version"], registry=r)
        self.build.labels(version=__version__).set(1)
        self.consumer_info = Gauge(
            "enricher_consumer_info",
            "The consumer group and input topic of this instance",
            ["group", "topic"],
            registry=r,
        )

    def observe_lag(self, stats_json: str, committed: Mapping[int, int]) -> None:
        """Consumer lag from librdkafka statistics: the partition's last stable offset minus
        the offset this instance last committed (through its transactions, which librdkafka's
        own ``consumer_lag`` does not see)."""
        stats: dict[str, Any] = json.loads(stats_json)
        for topic in stats.get("topics", {}).values():
            for name, partition in topic.get("partitions", {}).items():
                number = int(name)
                end = partition.get("ls_offset", -1)
                start = max(committed.get(number, -1), partition.get("committed_offset", -1))
                if number in committed and end >= 0 and start >= 0:
                    self.lag.labels(partition=name).set(max(0, end - start))

    def forget_partitions(self, partitions: list[int]) -> None:
        for partition in partitions:
            for gauge in (self.lag, self.watermark):
                try:
                    gauge.remove(str(partition))
                except KeyError:
                    continue


class BulkHistogram:
    """A histogram with one label, observed a batch at a time: exactly what a
    ``prometheus_client.Histogram`` would export after one ``observe`` per value (every
    value counted, the same buckets, sum and count), at the cost of one sort per batch
    instead of one call per value. For the end-to-end latencies, of which a batch has one per
    event and one per clock."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = [float(b) for b in buckets]
        self._lock = threading.Lock()
        self._series: dict[str, tuple[list[int], float]] = {}
        """label value -> (cumulative count per bound and +Inf, sum)"""
        registry.register(self)

    def observe_ages(self, value: str, now_ms: float, times_ms: list[int]) -> None:
        """Observe ``max(0, now - time) / 1000`` seconds for every time in ``times_ms``
        (epoch milliseconds): the age of each at ``now_ms``."""
        if not times_ms:
            return
        ordered = sorted(times_ms)
        total = len(ordered)
        # An age is at most a bound exactly when its time is at least now minus the bound.
        counts = [
            total - bisect.bisect_left(ordered, now_ms - bound * 1000) for bound in self.bounds
        ]
        counts.append(total)
        past = bisect.bisect_left(ordered, now_ms)  # times before now: a positive age
        seconds = (past * now_ms - sum(ordered[:past])) / 1000
        with self._lock:
            before, before_sum = self._series.get(value, ([0] * len(counts), 0.0))
            self._series[value] = (
                [a + b for a, b in zip(before, counts, strict=True)],
                before_sum + seconds,
            )

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            series = dict(self._series)
        bounds = [*(_go_float(b) for b in self.bounds), "+Inf"]
        for value, (counts, seconds) in series.items():
            family.add_metric([value], list(zip(bounds, counts, strict=True)), seconds)
        yield family
