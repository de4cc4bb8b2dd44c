"""The Redis state store against a real Redis: fencing, snapshots, expiry, partitioning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from stack import Stack

from enricher import generate
from enricher.codecs import tracker
from enricher.ids import IdDeriver
from enricher.partitioning import kafka_partition
from enricher.session import SessionState
from enricher.store import ClockQuery, Fenced, FileModeStore, PartitionStore, PartitionWrite

pytestmark = pytest.mark.integration
IDS = IdDeriver("salt")


def state(device: str, index: int, last_ms: int) -> SessionState:
    first = "c6ef3124-b53a-4b13-a233-0088f79dcbcb"
    return SessionState(
        user_id=IDS.user_id(device),
        session_id=IDS.session_id(device, index, first),
        session_index=index,
        previous_session_id=None,
        event_index=1,
        first_event_id=first,
        first_event_ms=last_ms,
        last_event_ms=last_ms,
        in_background=False,
        background_index=0,
        foreground_index=0,
    )


@pytest.fixture
def store(stack: Stack) -> PartitionStore:
    return PartitionStore(stack.redis(), stack.redis_prefix(), "raw", IDS)


def test_a_new_owner_fences_out_the_old_one(store: PartitionStore) -> None:
    old = store.fence([0, 1])
    new = store.fence([0])
    assert new[0] == old[0] + 1
    record = store.codec.pack(state("d", 1, 1000), 10, None)
    with pytest.raises(Fenced) as fenced:
        store.save(
            {0: PartitionWrite(old[0], {"d": record}), 1: PartitionWrite(old[1], {"d": record})}
        )
    assert fenced.value.partitions == [0]
    assert store.load({0: (0, ["d"])}).states == {0: {}}
    assert store.load({1: (11, ["d"])}).states == {1: {"d": state("d", 1, 1000)}}
    store.save({0: PartitionWrite(new[0], {"d": record})})
    assert store.load({0: (11, ["d"])}).states == {0: {"d": state("d", 1, 1000)}}


def test_a_replayed_batch_starts_from_the_snapshot(store: PartitionStore) -> None:
    epoch = store.fence([3])[3]
    before, after = state("d", 1, 1000), state("d", 2, 9000)
    store.save({3: PartitionWrite(epoch, {"d": store.codec.pack(after, 57, before)})})
    assert store.load({3: (50, ["d"])}).states[3] == {"d": before}
    assert store.load({3: (57, ["d"])}).states[3] == {"d": before}
    assert store.load({3: (58, ["d"])}).states[3] == {"d": after}
    store.save({3: PartitionWrite(epoch, {"new": store.codec.pack(after, 60, None)})})
    assert store.load({3: (60, ["new"])}).states[3] == {}


def test_the_sweep_expires_quiet_devices_only(store: PartitionStore) -> None:
    epoch = store.fence([2])[2]
    now_ms = int(time.time() * 1000)
    records = {
        f"old-{i}": store.codec.pack(state(f"old-{i}", 1, now_ms - 10 * 86_400_000), 1, None)
        for i in range(700)
    }
    records |= {
        f"new-{i}": store.codec.pack(state(f"new-{i}", 1, now_ms), 1, None) for i in range(300)
    }
    store.save({2: PartitionWrite(epoch, records)})
    cursor, deleted = 0, 0
    for _ in range(100):
        result = store.sweep({2: (epoch, cursor)}, now_ms - 86_400_000, 200)
        cursor, count = result[2]
        deleted += count
        if cursor == 0:
            break
    assert deleted == 700
    remaining = store.load({2: (2, list(records))}).states[2]
    assert sorted(remaining) == sorted(f"new-{i}" for i in range(300))
    with pytest.raises(Fenced):
        store.sweep({2: (epoch - 1, 0)}, now_ms, 10)


def test_the_sweep_drops_the_renew_counters_of_devices_without_state(
    store: PartitionStore,
) -> None:
    epoch = store.fence([5])[5]
    now_ms = int(time.time() * 1000)
    records = {
        "old": store.codec.pack(state("old", 1, now_ms - 10 * 86_400_000), 1, None),
        "new": store.codec.pack(state("new", 1, now_ms), 1, None),
    }
    store.save({5: PartitionWrite(epoch, records)})
    for device in ("old", "new", "never-seen"):
        store.request_renew(5, device)
    assert store.sweep({5: (epoch, 0)}, now_ms - 86_400_000, 200) == {5: (0, 1)}
    renews = store.client.hgetall(store.keys(5).renews)
    assert renews == {b"new": b"1"}


def test_file_mode_finds_devices_where_the_service_keeps_them(stack: Stack) -> None:
    topics = stack.new_topics("store", partitions=6)
    devices = [f"device-{i}" for i in range(40)]
    stack.produce(
        topics.input,
        [(d, b"{}") for d in devices],
        transactional=False,
        partitioner="murmur2_random",
    )
    consumer = Consumer(
        stack.kafka_config(**{"group.id": "store-check", "auto.offset.reset": "earliest"})
    )
    consumer.subscribe([topics.input])
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while len(seen) < len(devices) and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            seen[(message.key() or b"").decode()] = message.partition() or 0
    consumer.close()
    assert seen == {d: kafka_partition(d.encode(), 6) for d in devices}

    prefix = stack.redis_prefix()
    file_store = FileModeStore(
        PartitionStore(stack.redis(), prefix, topics.input, IDS), partitions=6
    )
    file_store.save({d: state(d, 4, 5000) for d in devices})
    service_view = PartitionStore(stack.redis(), prefix, topics.input, IDS)
    for device, partition in seen.items():
        assert service_view.load({partition: (0, [device])}).states[partition] == {
            device: state(device, 4, 5000)
        }


def test_batch_runs_continue_each_others_sessions_through_redis(
    stack: Stack, tmp_path: Path
) -> None:
    items = list(generate.events(generate.Traffic(events=4000, devices=150, seed=3)))
    lines = [tracker.dump({"key": key, "event": event}) + b"\n" for key, event in items]
    whole, first, second = (tmp_path / name for name in ("whole", "first", "second"))
    whole.write_bytes(b"".join(lines))
    first.write_bytes(b"".join(lines[:2500]))
    second.write_bytes(b"".join(lines[2500:]))
    redis_flags = ["--redis-url", stack.redis_url, "--input-topic", "raw", "--partitions", "6"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICHER_")}
    env["ENRICHER_REDIS_KEY_PREFIX"] = stack.redis_prefix()

    def batch(source: Path, *flags: str) -> list[bytes]:
        out = source.with_suffix(".out")
        command = [sys.executable, "-m", "enricher", "batch", "--salt", "s"]
        command += ["--input", str(source), "--output", str(out), *flags]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return out.read_bytes().splitlines()

    continued = batch(first, *redis_flags) + batch(second, *redis_flags)
    assert continued == batch(whole)
    assert stack.redis().exists(f"{env['ENRICHER_REDIS_KEY_PREFIX']}{{raw:0}}:devices")


def test_renew_requests_are_counted_beside_the_state(store: PartitionStore) -> None:
    assert store.latest(4, "d") == (None, 0)
    assert store.request_renew(4, "d") == 1
    assert store.request_renew(4, "d") == 2
    epoch = store.fence([4])[4]
    store.save({4: PartitionWrite(epoch, {"d": store.codec.pack(state("d", 2, 7000), 9, None)})})
    record, renews = store.latest(4, "d")
    assert record is not None
    assert (record.state, renews) == (state("d", 2, 7000), 2)
    states, counts, _ = store.load({4: (10, ["d"])}, {4: ["d", "other"]})
    assert states == {4: {"d": state("d", 2, 7000)}}
    assert counts == {4: {"d": 2}}


def test_the_clock_and_the_expiries_follow_the_snapshot_rule(store: PartitionStore) -> None:
    epoch = store.fence([5])[5]
    a = replace(state("a", 1, 1000), expires_ms=5000)
    b = replace(state("b", 1, 2000), expires_ms=20_000)

    def expiring(
        start: int, batch_clock: int | None, limit: int = 10
    ) -> tuple[int | None, int | None, dict[str, SessionState | None]]:
        """The partition's clocks, and the committed states of the devices found."""
        query = ClockQuery(start, batch_clock, lateness_ms=1000, limit=limit)
        found = store.load({}, None, {5: query}).expiring[5]
        states = {
            device: None if data is None else store.codec.state_before(device, data, start)
            for device, data in found.records.items()
        }
        return found.committed_ms, found.clock_ms, states

    assert expiring(0, None) == (None, None, {})
    assert expiring(0, 10_000) == (None, 10_000, {})
    records = {"a": store.codec.pack(a, 3, None), "b": store.codec.pack(b, 2, None)}
    scores = {"a": a.expires_ms, "b": b.expires_ms}
    store.save({5: PartitionWrite(epoch, records, (10_000, 3, None), scores)})
    # Replaying the batch that wrote offsets up to 3: neither its clock nor its states count.
    assert expiring(0, 10_000) == (None, 10_000, {"a": None})
    assert expiring(0, None) == (None, None, {})
    # The next batch: the clock only moves forward; the watermark is the clock minus lateness.
    assert expiring(4, 8_000) == (10_000, 10_000, {"a": a})
    assert expiring(4, 21_000) == (10_000, 21_000, {"a": a})
    assert expiring(4, 22_000) == (10_000, 22_000, {"a": a, "b": b})
    assert expiring(4, 22_000, limit=1) == (10_000, 22_000, {"a": a})

    ended = replace(a, ended=True, ends_declared=1)
    write = PartitionWrite(
        epoch, {"a": store.codec.pack(ended, 9, a)}, (22_000, 9, 10_000), {}, ["b"]
    )
    store.save({5: write})
    assert expiring(5, None) == (10_000, 10_000, {"a": a})
    assert expiring(10, None) == (22_000, 22_000, {"a": ended})
    with pytest.raises(Fenced):
        store.save({5: write._replace(epoch=epoch - 1)})
