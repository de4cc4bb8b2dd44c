"""Latency at a fixed offered load: a streaming mode first works through the input (its state
warm, as in a long-running service), then events are offered at a rate and each output record
is timed from its input's timestamp. ``docs/benchmark.md`` explains the method."""

from __future__ import annotations

import threading
import time

from bench import workload
from bench.children import Child
from bench.common import say
from bench.lab import INPUT_TOPIC, Lab
from bench.measure import redis_use
from bench.results import Latency, milliseconds
from bench.sampling import between, follow, sample
from bench.stack import Kafka

WARMUP_SECONDS = 5.0
"""offered before the latency is measured"""
DRAIN_SECONDS = 60.0
"""the longest wait for output after the last offer"""


class Probe:
    """Reads an output topic (read_committed) in a thread; the latency of a record is the
    time it is read minus its timestamp, which the producer set when it produced the input."""

    def __init__(self, kafka: Kafka, topic: str) -> None:
        self.consumer = kafka.reader(topic, **{"fetch.wait.max.ms": 100})
        self.records: list[tuple[int, float]] = []  # (timestamp ms, latency ms)
        self.error: str | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="latency-probe", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                message = self.consumer.poll(0.1)
                if message is None:
                    continue
                received_ms = time.time() * 1000
                if message.error() is not None:
                    self.error = str(message.error())
                    continue
                timestamp_ms = message.timestamp()[1]
                self.records.append((timestamp_ms, received_ms - timestamp_ms))
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


def latency_run(lab: Lab, mode: str, rate: float, items: list[workload.Payload]) -> Latency:
    """A new ``mode`` instance first works through everything already in the input (its
    state is then warm, as in a long-running service); then ``items`` are offered at ``rate``
    per second. Percentiles over the records produced after the warm-up; Redis commands over
    the offered records only."""
    name = f"bench-{mode}-latency"
    target = f"bench.{mode}-latency.out"
    lab.kafka.create_topics([target])
    lab.redis.reset()
    backlog = sum(lab.kafka.high_watermarks(INPUT_TOPIC))
    child = lab.start_streaming(mode, name, INPUT_TOPIC, target)
    try:
        say(f"{mode} latency: working through the {backlog:,} events in the input first")
        with lab.kafka.committed_offsets(name, INPUT_TOPIC) as offsets:
            follow(lab, child, offsets, backlog, f"{mode} latency warm-up")
        lab.redis.reset_counters()
        memory_before = lab.redis.used_memory()
        probe = Probe(lab.kafka, target)
        try:
            say(f"{mode} latency: offering {rate:,.0f} events/s for {len(items) / rate:.0f}s")
            first, bench_cpu = sample(lab, child, 0), time.process_time()
            fed = workload.feed(lab.kafka, INPUT_TOPIC, items, rate)
            deadline = time.monotonic() + DRAIN_SECONDS
            while len(probe.records) < len(items) and time.monotonic() < deadline:
                child_alive_or_fail(child, f"{mode} latency run")
                time.sleep(0.2)
            window = between(first, sample(lab, child, len(probe.records)))
            bench_cpu = time.process_time() - bench_cpu
        finally:
            probe.stop()
        redis = redis_use(lab.redis, memory_before)
    finally:
        child.stop()
    lab.kafka.delete_topics([target])
    if not probe.records:
        raise child.failure(f"delivered nothing within {DRAIN_SECONDS:.0f}s of the last offer")
    if probe.error:
        say(f"{mode} latency: the probe saw a consumer error: {probe.error}")
    measured_from_ms = (fed.started + WARMUP_SECONDS) * 1000
    expected = sum(1 for ts in fed.timestamps if ts >= measured_from_ms)
    latencies = [latency for ts, latency in probe.records if ts >= measured_from_ms]
    latency = Latency.of(
        latencies,
        offered=rate,
        achieved=len(items) / fed.seconds,
        expected=expected,
        window=window,
        bench_cpu_seconds=bench_cpu,
        redis=redis,
    )
    say(
        f"{mode} latency: p50 {milliseconds(latency.p50_ms)},"
        f" p99 {milliseconds(latency.p99_ms)}"
        f" ({latency.received:,} of {expected:,} records after the warm-up delivered),"
        f" {window.cores_busy:.2f} cores busy (the benchmark itself:"
        f" {bench_cpu / window.seconds:.2f}), {latency.commands_per_event:.4f} Redis commands"
        " per event"
    )
    return latency


def child_alive_or_fail(child: Child, label: str) -> None:
    if not child.running:
        raise child.failure(f"exited during the {label}")
