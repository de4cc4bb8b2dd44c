"""The measurements: throughput and latency of the streaming modes, batch-mode runs, and
Redis memory per device. ``docs/benchmark.md`` explains each method."""

from __future__ import annotations

import re
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson

from bench import workload
from bench.baseline import INTERPRETER, Checkout
from bench.children import Child, Children, cpu_seconds
from bench.common import BenchError, clean_environment, say
from bench.reference import Reference
from bench.results import (
    Memory,
    Order,
    OutputCheck,
    RedisUse,
    StreamRun,
    Window,
    duration,
)
from bench.stack import PARTITIONS, CommittedOffsets, Kafka, Redis
from enricher import generate, rekey

INPUT_TOPIC = "bench.input"
INPUTS = workload.Inputs(
    INPUT_TOPIC, "bench.input.random-keys", "bench.input.collector", "bench.input.enriched"
)
DLQ_TOPIC = "bench.dlq"
SALT = "bench-salt"
POLL_SECONDS = 0.5
REPORT_SECONDS = 5.0
STALL_SECONDS = 120.0
WARMUP_SECONDS = 5.0
DRAIN_SECONDS = 60.0
FLOOR_REPEATS = 3
"""runs of the codec floor per round: one lasts a few seconds at most, short enough for a
single scheduling hiccup to move it by a third"""
STREAMING_ARGV = {
    "passthrough": [sys.executable, "-m", "bench.passthrough"],
    "enricher": [sys.executable, "-m", "enricher", "run"],
    "sessions": [sys.executable, "-m", "enricher", "run"],
    "collector": [sys.executable, "-m", "enricher", "run"],
    "hop": [sys.executable, "-m", "enricher", "run"],
    "enriched": [sys.executable, "-m", "enricher", "run"],
    "baseline": [*INTERPRETER, "-m", "enricher", "run"],
}
"""``sessions``: ``enricher run`` publishing the session events topic too; ``collector``: on
the collector's records, in and out; ``hop``: on the JSON keyed at random, the device in
``duid``. Those two move every event to its device's partition first (the re-keying hop).
``enriched``: on Snowplow Enrich's TSV keyed by device, in and out. ``baseline``: ``enricher
run`` as the ``enricher`` mode, from another revision (:mod:`bench.baseline`)."""
REKEYED = {
    "collector": {
        "ENRICHER_INPUT_FORMAT": "snowplow-collector",
        "ENRICHER_OUTPUT_FORMAT": "snowplow-collector",
    },
    "hop": {"ENRICHER_DEVICE_ID": "duid"},
}
"""the settings of the modes behind the re-keying hop"""
MODE_INPUTS = {
    "collector": INPUTS.collector,
    "hop": INPUTS.random_keys,
    "enriched": INPUTS.enriched,
}
FORMAT_SETTINGS = {
    "enriched": {
        "ENRICHER_INPUT_FORMAT": "snowplow-enriched",
        "ENRICHER_OUTPUT_FORMAT": "snowplow-enriched",
        "ENRICHER_DEVICE_ID": "key",
    },
}
"""the settings of a mode on another format, keyed by device (no hop)"""
"""the input of the modes that do not read :data:`INPUT_TOPIC`"""
METRICS_TIMEOUT_SECONDS = 2.0
HTTP_LOG_LINE = re.compile(r"http on (\S+):(\d+) \(/metrics")
PRODUCED_METRIC = re.compile(r"^enricher_records_produced_total (\S+)$", re.MULTILINE)


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
    baseline: Checkout | None = None
    """the revision the ``baseline`` mode runs (``--baseline``)"""

    def start_streaming(
        self, mode: str, name: str, source: str, target: str, process: str = ""
    ) -> Child:
        """``mode`` (a key of :data:`STREAMING_ARGV`) from ``source`` to ``target``; ``name`` is
        its consumer group, transactional id and Redis key prefix, and unless ``process`` is
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
            **REKEYED.get(mode, {}),
            **FORMAT_SETTINGS.get(mode, {}),
        }
        if mode == "sessions":
            env["ENRICHER_SESSION_EVENTS_TOPIC"] = sessions_topic(target)
        if mode == "baseline":
            if self.baseline is None:
                raise BenchError("the baseline mode needs a revision (--baseline)")
            env.update(self.baseline.environment())
        return self.children.start(process or name, STREAMING_ARGV[mode], env)

    def run_batch(
        self,
        name: str,
        source: Path,
        *extra: str,
        module: str = "enricher batch",
        output: Path | None = None,
    ) -> tuple[Window, str]:
        """``enricher batch`` (or ``module``, run as ``python -m``, with the same ``--input``
        and ``--output``) on ``source`` to completion: the whole process as the window, and
        the summary line it printed. The output is kept at ``output`` when it is given."""
        target = output or self.work / f"{name}.out.jsonl"
        argv = [sys.executable, "-m", *module.split(), "--input", str(source)]
        argv += ["--output", str(target)]
        argv += [] if module == "bench.floor" else ["--salt", SALT, *extra]
        env = {**clean_environment(), "ENRICHER_REDIS_KEY_PREFIX": f"{name}:"}
        started = time.monotonic()
        child = self.children.start(name, argv, env)
        code, cpu = child.wait_with_usage()
        elapsed = time.monotonic() - started
        for path in (target, target.with_name(target.name + ".errors.jsonl")):
            if path != output:
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


def run_topics(mode: str, index: int) -> tuple[str, list[str]]:
    """The name (group, transactional id, Redis key prefix) of a throughput run of ``mode``,
    and the topics it writes: its output, and its session events topic or its re-keying
    topic where it has one."""
    name, target = f"bench-{mode}-{index}", f"bench.{mode}-{index}.out"
    if mode == "sessions":
        return name, [target, sessions_topic(target)]
    if mode in REKEYED:
        return name, [target, rekey.by_device_topic(name)]
    return name, [target]


def throughput_run(lab: Lab, mode: str, index: int) -> StreamRun:
    """``mode`` consumes its preloaded input with a new group into a new output topic, with
    a freshly emptied Redis; the window runs from the first commit seen to the last."""
    run = streaming_run(lab, mode, index)
    lab.kafka.delete_topics(run_topics(mode, index)[1])
    return run


def checked_run(
    lab: Lab, mode: str, index: int, reference: Reference
) -> tuple[StreamRun, OutputCheck]:
    """A throughput run whose output topic is then read back and compared, device by device,
    with ``enricher batch``'s output (:mod:`bench.reference`) before its topics go."""
    run = streaming_run(lab, mode, index)
    topics = run_topics(mode, index)[1]
    try:
        check = reference.check(lab.kafka, topics[0], mode, index)
    finally:
        lab.kafka.delete_topics(topics)
    outcome = "the same as" if check.matched else "NOT the same as"
    say(
        f"{mode} run {index}: {check.records:,} records of {check.devices:,} devices read back,"
        f" {outcome} enricher batch's {reference.records:,}, byte for byte"
    )
    return run, check


def hop_run(lab: Lab, index: int) -> tuple[StreamRun, Order]:
    """A throughput run of the re-keying hop on JSON; then its topic read back for the order
    in which each device's events reached the enrichment."""
    run = streaming_run(lab, "hop", index)
    name, topics = run_topics("hop", index)
    order = device_order(lab.kafka, rekey.by_device_topic(name))
    lab.kafka.delete_topics(topics)
    say(
        f"hop run {index}: {order.behind:,} of {order.events:,} events ({order.share:.2%}) of"
        f" {order.devices:,} devices reached the enrichment behind their device's clock, by"
        f" {duration(order.median_behind_ms)} (median), up to {duration(order.max_behind_ms)}"
    )
    return run, order


def streaming_run(lab: Lab, mode: str, index: int) -> StreamRun:
    """A throughput run, its topics left in place. A mode that reads :data:`INPUT_TOPIC` is
    followed by its committed input offsets (one event per record), from the first commit
    seen; a mode behind the re-keying hop by the events it committed to its output, from the
    hop's first commit (:class:`Rekeyed`)."""
    name, topics = run_topics(mode, index)
    lab.kafka.create_topics(topics)
    lab.redis.reset()
    memory_before = lab.redis.used_memory()
    label = f"{mode} run {index}"
    source = MODE_INPUTS.get(mode, INPUT_TOPIC)
    child = lab.start_streaming(mode, name, source, topics[0])
    try:
        with lab.kafka.committed_offsets(name, source) as offsets:
            if mode in REKEYED:
                rekeyed = Rekeyed(offsets, Produced(child))
                samples = follow(lab, child, rekeyed, lab.traffic.events, label)
            else:
                samples = follow(lab, child, offsets, lab.traffic.events, label)
                samples = [s for s in samples if s.events > 0]
    finally:
        child.stop()
    redis = redis_use(lab.redis, memory_before)
    window = measured_window(samples, label)
    say(
        f"{label}: {window.rate:,.0f} events/s,"
        f" {window.cpu_per_1k:.3f} CPU s per 1k events"
        f" ({window.stack_cpu_per_1k:.3f} with the broker and Redis,"
        f" {window.cores_busy:.2f} cores busy),"
        f" {redis.commands / lab.traffic.events:.4f} Redis commands per event"
    )
    return StreamRun(window, redis)


def redis_use(redis: Redis, memory_before: int) -> RedisUse:
    """Redis since the last reset: commands run, memory growth."""
    return RedisUse(calls=redis.command_calls(), memory_bytes=redis.used_memory() - memory_before)


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


def device_order(kafka: Kafka, topic: str) -> Order:
    """Read the re-keying topic back: the events whose device time (``dtm``) is earlier than
    the latest one of the same device before it in its partition."""
    latest: dict[tuple[int, bytes], int] = {}
    late_devices: set[tuple[int, bytes]] = set()
    gaps: list[int] = []
    events = 0
    for partition, key, value in kafka.read_all(topic):
        device = (partition, key)
        dtm = int(orjson.loads(value)["dtm"])
        events += 1
        before = latest.get(device, dtm)
        if dtm < before:
            gaps.append(before - dtm)
            late_devices.add(device)
        else:
            latest[device] = dtm
    return Order(
        events,
        len(gaps),
        len(late_devices),
        statistics.median_low(gaps) if gaps else 0,
        max(gaps, default=0),
    )


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


def batch_run(lab: Lab, source: Path, index: int, output: Path) -> tuple[Window, str]:
    """``enricher batch`` on ``source``, its output kept at ``output`` (the reference the
    streaming modes' output is checked against)."""
    window, summary = lab.run_batch(f"bench-batch-{index}", source, output=output)
    say(
        f"batch run {index}: {window.rate:,.0f} events/s,"
        f" {window.cpu_per_1k:.3f} CPU s per 1k events ({summary})"
    )
    return window, summary


def floor_run(lab: Lab, source: Path, index: int) -> Window:
    """The codec floor (:mod:`bench.floor`) on the file ``enricher batch`` reads: the median
    of :data:`FLOOR_REPEATS` runs, by CPU time."""
    windows = [
        lab.run_batch(f"bench-floor-{index}-{repeat}", source, module="bench.floor")[0]
        for repeat in range(1, FLOOR_REPEATS + 1)
    ]
    window = sorted(windows, key=lambda w: w.cpu_seconds)[FLOOR_REPEATS // 2]
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
    # The input holds the latency runs' events too: committing all of it leaves every
    # partition behind once Redis is emptied, which is what the second instance waits for.
    backlog = sum(lab.kafka.high_watermarks(INPUT_TOPIC))
    child = lab.start_streaming("enricher", name, INPUT_TOPIC, target, f"{name}-first")
    try:
        with lab.kafka.committed_offsets(name, INPUT_TOPIC) as offsets:
            follow(lab, child, offsets, backlog, "repair: the first run")
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
