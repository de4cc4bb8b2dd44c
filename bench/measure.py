"""The measurements: throughput and latency of the streaming modes, batch-mode runs, and
Redis memory per device. ``docs/benchmark.md`` explains each method."""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import workload
from bench.children import Child, Children, cpu_seconds
from bench.common import BenchError, clean_environment, say
from bench.results import Latency, Memory, RedisUse, StreamRun, Window, milliseconds
from bench.stack import PARTITIONS, CommittedOffsets, Kafka, Redis
from enricher import generate

INPUT_TOPIC = "bench.input"
DLQ_TOPIC = "bench.dlq"
SALT = "bench-salt"
POLL_SECONDS = 0.5
REPORT_SECONDS = 5.0
STALL_SECONDS = 120.0
WARMUP_SECONDS = 5.0
DRAIN_SECONDS = 60.0
STREAMING_ARGV = {
    "passthrough": [sys.executable, "-m", "bench.passthrough"],
    "enricher": [sys.executable, "-m", "enricher", "run"],
    "sessions": [sys.executable, "-m", "enricher", "run"],
}
"""``sessions``: ``enricher run`` publishing the session events topic too"""


@dataclass(frozen=True)
class Lab:
    """The running stack and what every measurement needs from it."""

    kafka: Kafka
    redis: Redis
    redis_url: str
    children: Children
    work: Path
    traffic: generate.Traffic
    broker_pids: list[int]

    def start_streaming(
        self, mode: str, name: str, source: str, target: str, process: str = ""
    ) -> Child:
        """``mode`` (passthrough or enricher) from ``source`` to ``target``; ``name`` is its
        consumer group, transactional id and Redis key prefix, and unless ``process`` is
        given, the name of its process and log."""
        env = {
            **clean_environment(),
            "ENRICHER_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "ENRICHER_REDIS_URL": self.redis_url,
            "ENRICHER_INPUT_TOPIC": source,
            "ENRICHER_OUTPUT_TOPIC": target,
            "ENRICHER_DLQ_TOPIC": DLQ_TOPIC,
            "ENRICHER_GROUP_ID": name,
            "ENRICHER_TRANSACTIONAL_ID": name,
            "ENRICHER_REDIS_KEY_PREFIX": f"{name}:",
            "ENRICHER_SALT": SALT,
            "ENRICHER_METRICS_HOST": "127.0.0.1",
            "ENRICHER_METRICS_PORT": "0",
            "ENRICHER_SHUTDOWN_TIMEOUT": "10",
        }
        if mode == "sessions":
            env["ENRICHER_SESSION_EVENTS_TOPIC"] = sessions_topic(target)
        return self.children.start(process or name, STREAMING_ARGV[mode], env)

    def run_batch(
        self, name: str, source: Path, *extra: str, module: str = "enricher batch"
    ) -> tuple[Window, str]:
        """``enricher batch`` (or ``module``, run as ``python -m``, with the same ``--input``
        and ``--output``) on ``source`` to completion: the whole process as the window, and
        the summary line it printed."""
        target = self.work / f"{name}.out.jsonl"
        argv = [sys.executable, "-m", *module.split(), "--input", str(source)]
        argv += ["--output", str(target)]
        argv += [] if module == "bench.floor" else ["--salt", SALT, *extra]
        env = {**clean_environment(), "ENRICHER_REDIS_KEY_PREFIX": f"{name}:"}
        started = time.monotonic()
        child = self.children.start(name, argv, env)
        code, cpu = child.wait_with_usage()
        elapsed = time.monotonic() - started
        for path in (target, target.with_name(target.name + ".errors.jsonl")):
            path.unlink(missing_ok=True)
        lines = child.log_path.read_text(errors="replace").splitlines()
        summary = next((line for line in reversed(lines) if line.startswith("events=")), None)
        if code != 0 or summary is None:
            raise child.failure("failed")
        events = int(summary.split()[0].removeprefix("events="))
        return Window(events, elapsed, cpu), summary


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


def sessions_topic(target: str) -> str:
    return f"{target}.sessions"


def throughput_run(lab: Lab, mode: str, index: int) -> StreamRun:
    """``mode`` consumes the preloaded input with a new group into a new output topic, with
    a freshly emptied Redis; the window runs from the first commit seen to the last."""
    name = f"bench-{mode}-{index}"
    target = f"bench.{mode}-{index}.out"
    topics = [target, sessions_topic(target)] if mode == "sessions" else [target]
    lab.kafka.create_topics(topics)
    lab.redis.reset()
    memory_before = lab.redis.used_memory()
    child = lab.start_streaming(mode, name, INPUT_TOPIC, target)
    try:
        with lab.kafka.committed_offsets(name, INPUT_TOPIC) as offsets:
            samples = follow(lab, child, offsets, lab.traffic.events, f"{mode} run {index}")
    finally:
        child.stop()
    redis = redis_use(lab.redis, memory_before)
    lab.kafka.delete_topics(topics)
    window = measured_window(samples, f"{mode} run {index}")
    say(
        f"{mode} run {index}: {window.rate:,.0f} events/s,"
        f" {window.cpu_per_1k:.3f} CPU s per 1k events"
        f" ({window.stack_cpu_per_1k:.3f} with the broker and Redis,"
        f" {window.cores_busy:.2f} cores busy),"
        f" {redis.commands / lab.traffic.events:.4f} Redis commands per event"
    )
    return StreamRun(window, redis)


def redis_use(redis: Redis, memory_before: int) -> RedisUse:
    """Redis since the last reset: commands run, memory growth."""
    return RedisUse(calls=redis.command_calls(), memory_bytes=redis.used_memory() - memory_before)


def follow(
    lab: Lab, child: Child, offsets: CommittedOffsets, total: int, label: str
) -> list[Sample]:
    """Sample the committed offsets and the CPU time of the process, the broker and Redis
    every :data:`POLL_SECONDS` until ``total`` input events are committed."""
    samples: list[Sample] = []
    last_change = time.monotonic()
    next_report = last_change + REPORT_SECONDS
    tick = last_change
    while True:
        if not child.running:
            raise child.failure(f"exited during {label}")
        committed = offsets.total()
        now = time.monotonic()
        if committed is not None:
            samples.append(sample(lab, child, committed))
            if committed >= total:
                return samples
            if len(samples) > 1 and committed != samples[-2].events:
                last_change = now
        if now - last_change > STALL_SECONDS:
            seen = f" (last error reading them: {offsets.last_error})" if offsets.last_error else ""
            raise child.failure(f"committed nothing for {STALL_SECONDS:.0f}s in {label}{seen}")
        if now >= next_report and samples:
            say(f"  {label}: {samples[-1].events:,} of {total:,} events committed")
            next_report += REPORT_SECONDS
        tick += POLL_SECONDS
        time.sleep(max(0.0, tick - time.monotonic()))


def measured_window(samples: list[Sample], label: str) -> Window:
    first = next(s for s in samples if s.events > 0)
    if samples[-1].at <= first.at:
        raise BenchError(
            f"{label} committed everything within one {POLL_SECONDS}s sample: too few events"
            " to measure a window (use more --events)"
        )
    return between(first, samples[-1])


def batch_run(lab: Lab, source: Path, index: int) -> tuple[Window, str]:
    window, summary = lab.run_batch(f"bench-batch-{index}", source)
    say(
        f"batch run {index}: {window.rate:,.0f} events/s,"
        f" {window.cpu_per_1k:.3f} CPU s per 1k events ({summary})"
    )
    return window, summary


def floor_run(lab: Lab, source: Path, index: int) -> Window:
    """The codec floor (:mod:`bench.floor`) on the file ``enricher batch`` reads."""
    window, _ = lab.run_batch(f"bench-floor-{index}", source, module="bench.floor")
    say(
        f"codec floor run {index}: {window.events / window.cpu_seconds:,.0f} events per CPU"
        f" second, {window.cpu_per_1k:.3f} CPU s per 1k events"
    )
    return window


def repair_run(lab: Lab) -> Window:
    """The state repair: ``enricher run`` commits the whole input, Redis is emptied, and a new
    instance of the same group rebuilds every partition's state from offset 0. The window runs
    from the first partition found behind to the last one repaired (polled in its log)."""
    name, target = "bench-repair", "bench.repair.out"
    lab.kafka.create_topics([target])
    lab.redis.reset()
    child = lab.start_streaming("enricher", name, INPUT_TOPIC, target, f"{name}-first")
    try:
        with lab.kafka.committed_offsets(name, INPUT_TOPIC) as offsets:
            follow(lab, child, offsets, lab.traffic.events, "repair: the first run")
    finally:
        child.stop()
    lab.redis.reset()
    say("repair: Redis emptied; a new instance rebuilds the state from the input")
    child = lab.start_streaming("enricher", name, INPUT_TOPIC, target, f"{name}-second")
    try:
        first, last = watch_repairs(lab, child)
    finally:
        child.stop()
    lab.kafka.delete_topics([target])
    window = between(first, last)
    say(
        f"repair: {window.events:,} events replayed at {window.rate:,.0f} events/s,"
        f" {window.cpu_per_1k:.3f} CPU s per 1k events"
    )
    return window


def watch_repairs(lab: Lab, child: Child) -> tuple[Sample, Sample]:
    """Samples when the first partition is found behind and when the last is repaired, each
    with the events replayed so far."""
    first: Sample | None = None
    deadline = time.monotonic() + STALL_SECONDS + lab.traffic.events / 1000
    while time.monotonic() < deadline:
        if not child.running:
            raise child.failure("exited during the repair")
        log = child.log_path.read_text(errors="replace")
        if first is None and "redis is behind kafka" in log:
            first = sample(lab, child, 0)
        replayed = [int(m) for m in re.findall(r"repaired: replayed (\d+) input records", log)]
        if first is not None and len(replayed) == PARTITIONS:
            return first, sample(lab, child, sum(replayed))
        time.sleep(0.1)
    raise child.failure("did not repair every partition in time")


def memory_run(lab: Lab, devices: int, seed: int) -> Memory:
    """Redis ``used_memory`` growth when ``enricher batch`` stores one device each."""
    source = lab.work / "memory.jsonl"
    say(f"Redis memory: writing one event for each of {devices:,} devices")
    workload.one_event_per_device(source, devices, seed)
    lab.redis.reset()
    before = lab.redis.used_memory()
    say(f"Redis memory: enricher batch --redis-url on {devices:,} devices")
    flags = ["--redis-url", lab.redis_url, "--input-topic", INPUT_TOPIC]
    flags += ["--partitions", str(PARTITIONS)]
    lab.run_batch("bench-memory", source, *flags)
    memory = Memory(devices, before, lab.redis.used_memory())
    source.unlink()
    say(f"Redis memory: {memory.per_device:.1f} bytes per device")
    return memory


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
