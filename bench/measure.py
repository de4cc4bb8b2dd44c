"""The measurements: throughput of the streaming modes, batch mode and its codec floor, the
state repair, and Redis memory per device. ``docs/benchmark.md`` explains each method."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import orjson

from bench import workload
from bench.children import Child
from bench.common import say
from bench.lab import INPUT_TOPIC, MODE_INPUTS, REKEYED, Lab, sessions_topic
from bench.reference import Reference
from bench.results import Memory, Order, OutputCheck, RedisUse, StreamRun, Window, duration
from bench.sampling import (
    STALL_SECONDS,
    Produced,
    Rekeyed,
    Sample,
    between,
    follow,
    measured_window,
    sample,
)
from bench.stack import PARTITIONS, Kafka, Redis
from enricher import rekey

FLOOR_REPEATS = 3
"""runs of the codec floor per round: one lasts a few seconds at most, short enough for a
single scheduling hiccup to move it by a third"""


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
