"""The Redis state store against a real Redis: fencing, snapshots, expiry, partitioning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from stack import Stack

from enricher import generate
from enricher.codecs import tracker
from enricher.ids import IdDeriver
from enricher.migrate import migrate
from enricher.partitioning import kafka_partition
from enricher.session import SessionState
from enricher.store import (
    ClockQuery,
    Fenced,
    FileModeStore,
    Ownership,
    PartitionStore,
    PartitionWrite,
    StateLost,
)

pytestmark = pytest.mark.integration
IDS = IdDeriver("salt")
# A write that checks nothing of how complete the state is (the tests of that check say so).
ANY_STATE = (-1, 0)


def epochs(taken: Mapping[int, Ownership]) -> dict[int, int]:
    return {p: o.epoch for p, o in taken.items()}


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
    old = epochs(store.fence([0, 1], 1000))
    new = epochs(store.fence([0], 1000))
    assert new[0] == old[0] + 1
    record = store.codec.pack(state("d", 1, 1000), 10, None)
    with pytest.raises(Fenced) as fenced:
        store.save(
            {
                0: PartitionWrite(old[0], {"d": record}, ANY_STATE),
                1: PartitionWrite(old[1], {"d": record}, ANY_STATE),
            }
        )
    assert fenced.value.partitions == [0]
    assert store.load({0: (0, ["d"])}).states == {0: {}}
    assert store.load({1: (11, ["d"])}).states == {1: {"d": state("d", 1, 1000)}}
    store.save({0: PartitionWrite(new[0], {"d": record}, ANY_STATE)})
    assert store.load({0: (11, ["d"])}).states == {0: {"d": state("d", 1, 1000)}}


def test_one_write_of_several_partitions_refuses_each_on_its_own(
    store: PartitionStore,
) -> None:
    taken = epochs(store.fence([10, 11, 12], 1000))
    moved_on = epochs(store.fence([11], 1000))
    record = store.codec.pack(state("d", 1, 1000), 10, None)
    store.save({p: PartitionWrite(e, {}, (-1, 5)) for p, e in taken.items() if p != 11})
    writes = {
        10: PartitionWrite(taken[10], {"d": record}, (5, 11)),
        11: PartitionWrite(taken[11], {"d": record}, ANY_STATE),
        12: PartitionWrite(taken[12], {"d": record}, (8, 11)),  # behind what it needs
    }
    with pytest.raises(Fenced) as fenced:
        store.save(writes)
    assert fenced.value.partitions == [11]
    found = store.load({p: (11, ["d"]) for p in writes}).states
    assert found == {10: {"d": state("d", 1, 1000)}, 11: {}, 12: {}}
    with pytest.raises(StateLost) as lost:
        store.save({**writes, 11: writes[11]._replace(epoch=moved_on[11])})
    assert lost.value.partitions == [12]
    assert "complete up to offset 5, not 8" in str(lost.value)
    assert store.load({11: (11, ["d"])}).states == {11: {"d": state("d", 1, 1000)}}


def test_a_replayed_batch_starts_from_the_snapshot(store: PartitionStore) -> None:
    epoch = store.fence([3], 1000)[3].epoch
    before, after = state("d", 1, 1000), state("d", 2, 9000)
    store.save({3: PartitionWrite(epoch, {"d": store.codec.pack(after, 57, before)}, ANY_STATE)})
    assert store.load({3: (50, ["d"])}).states[3] == {"d": before}
    assert store.load({3: (57, ["d"])}).states[3] == {"d": before}
    assert store.load({3: (58, ["d"])}).states[3] == {"d": after}
    store.save({3: PartitionWrite(epoch, {"new": store.codec.pack(after, 60, None)}, ANY_STATE)})
    assert store.load({3: (60, ["new"])}).states[3] == {}


def test_the_sweep_expires_quiet_devices_only(store: PartitionStore) -> None:
    epoch = store.fence([2], 1000)[2].epoch
    now_ms = int(time.time() * 1000)
    records = {
        f"old-{i}": store.codec.pack(state(f"old-{i}", 1, now_ms - 10 * 86_400_000), 1, None)
        for i in range(700)
    }
    records |= {
        f"new-{i}": store.codec.pack(state(f"new-{i}", 1, now_ms), 1, None) for i in range(300)
    }
    store.save({2: PartitionWrite(epoch, records, ANY_STATE)})
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
    epoch = store.fence([5], 1000)[5].epoch
    now_ms = int(time.time() * 1000)
    records = {
        "old": store.codec.pack(state("old", 1, now_ms - 10 * 86_400_000), 1, None),
        "new": store.codec.pack(state("new", 1, now_ms), 1, None),
    }
    store.save({5: PartitionWrite(epoch, records, ANY_STATE)})
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
    epoch = store.fence([4], 1000)[4].epoch
    store.save(
        {4: PartitionWrite(epoch, {"d": store.codec.pack(state("d", 2, 7000), 9, None)}, ANY_STATE)}
    )
    record, renews = store.latest(4, "d")
    assert record is not None
    assert (record.state, renews) == (state("d", 2, 7000), 2)
    states, counts, _ = store.load({4: (10, ["d"])}, {4: ["d", "other"]})
    assert states == {4: {"d": state("d", 2, 7000)}}
    assert counts == {4: {"d": 2}}


def test_the_clock_and_the_expiries_follow_the_snapshot_rule(store: PartitionStore) -> None:
    epoch = store.fence([5], 1000)[5].epoch
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
    store.save({5: PartitionWrite(epoch, records, ANY_STATE, (10_000, 3, None), scores)})
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
        epoch, {"a": store.codec.pack(ended, 9, a)}, ANY_STATE, (22_000, 9, 10_000), {}, ["b"]
    )
    store.save({5: write})
    assert expiring(5, None) == (10_000, 10_000, {"a": a})
    assert expiring(10, None) == (22_000, 22_000, {"a": ended})
    with pytest.raises(Fenced):
        store.save({5: write._replace(epoch=epoch - 1)})


def test_a_write_refuses_state_redis_lost_and_a_newer_owner_tells_the_two_apart(
    store: PartitionStore,
) -> None:
    meta = store.keys(6).meta
    client = store.client
    taken = store.fence([6], 1000)[6]
    assert taken.complete is None
    record = store.codec.pack(state("d", 1, 1000), 49, None)
    store.save({6: PartitionWrite(taken.epoch, {"d": record}, (-1, 50))})
    again = store.fence([6], 1000)[6]
    assert again == Ownership(taken.epoch + 1, 50)
    store.save({6: PartitionWrite(again.epoch, {}, (50, 80))})  # complete up to what it needs
    with pytest.raises(StateLost, match="complete up to offset 80, not 90"):
        store.save({6: PartitionWrite(again.epoch, {}, (90, 100))})
    client.hset(meta, "epoch", again.epoch - 1)  # Redis came back with an older epoch
    with pytest.raises(StateLost) as lost:
        store.save({6: PartitionWrite(again.epoch, {}, (80, 81))})
    assert lost.value.partitions == [6]
    client.delete(meta)  # flushed
    with pytest.raises(StateLost):
        store.save({6: PartitionWrite(again.epoch, {}, (-1, 81))})
    assert store.load({6: (100, ["d"])}).states == {6: {"d": state("d", 1, 1000)}}


def test_an_epoch_is_never_below_the_time_it_was_taken(store: PartitionStore) -> None:
    assert store.fence([7], 1_700_000_000_000)[7].epoch == 1_700_000_000_000
    assert store.fence([7], 5)[7].epoch == 1_700_000_000_001


def test_a_wipe_drops_devices_expiries_clock_and_completeness_not_epoch_or_renews(
    store: PartitionStore,
) -> None:
    epoch = store.fence([8], 1000)[8].epoch
    store.request_renew(8, "d")
    record = store.codec.pack(state("d", 1, 1000), 3, None)
    store.save({8: PartitionWrite(epoch, {"d": record}, (-1, 4), (5000, 3, None), {"d": 9000})})
    store.wipe(8, epoch)
    keys = store.keys(8)
    assert not store.client.exists(keys.devices, keys.expiries)
    assert store.client.hgetall(keys.meta) == {b"epoch": str(epoch).encode()}
    assert store.latest(8, "d") == (None, 1)
    with pytest.raises(Fenced):
        store.wipe(8, epoch - 1)


def test_the_partition_count_is_recorded_once_per_topic(store: PartitionStore) -> None:
    assert store.partition_count() is None
    store.record_partition_count(12)
    assert store.partition_count() == 12
    other = PartitionStore(store.client, store.prefix, "other", IDS)
    assert other.partition_count() is None


def test_a_migration_moves_each_device_with_its_committed_state_renews_and_expiry(
    store: PartitionStore,
) -> None:
    store.record_partition_count(2)
    devices = [f"device-{n}" for n in range(60)]
    epochs = {p: store.fence([p], 1000)[p].epoch for p in (0, 1)}
    committed = {0: 100, 1: 100}
    expected: dict[str, SessionState] = {}
    by_partition: dict[int, dict[str, bytes]] = {0: {}, 1: {}}
    scores: dict[int, dict[str, int]] = {0: {}, 1: {}}
    for n, device in enumerate(devices):
        before, after = state(device, 1, 1000 + n), state(device, 2, 5000 + n)
        partition = kafka_partition(device.encode(), 2)
        if n % 3 == 0:  # written by a batch that never committed: the snapshot is committed
            packed, expected[device] = store.codec.pack(after, 120, before), before
        elif n % 3 == 1:
            packed, expected[device] = store.codec.pack(after, 90, before), after
        else:  # first seen in a batch that never committed: nothing committed to move
            packed = store.codec.pack(after, 130, None)
        by_partition[partition][device] = packed
        scores[partition][device] = 7000 + n
        store.request_renew(partition, device)
    for partition in (0, 1):
        write = PartitionWrite(
            epochs[partition], by_partition[partition], (-1, 131), None, scores[partition]
        )
        store.save({partition: write})

    done = migrate(store, committed | {2: 40}, 3, 2000)

    assert store.partition_count() == 3
    moved = [d for d in devices if kafka_partition(d.encode(), 3) != kafka_partition(d.encode(), 2)]
    assert done.moved + done.dropped == len(moved) > 0
    assert done.dropped == sum(1 for d in moved if d not in expected)
    for device in devices:
        partition = kafka_partition(device.encode(), 3)
        record, renews = store.latest(partition, device)
        if device in moved and device not in expected:
            assert record is None
            continue
        assert record is not None
        if device in moved:
            assert (record.state, record.offset, record.snapshot) == (expected[device], -1, None)
        assert renews == 1
        score = store.client.zscore(store.keys(partition).expiries, device)
        assert score == 7000 + devices.index(device)
        for other in {0, 1, 2} - {partition}:
            assert store.latest(other, device) == (None, 0)
    # The new partition is complete up to the group's committed offset there, and a running
    # instance of the old layout is fenced out.
    assert store.fence([2], 1000)[2].complete == 40
    with pytest.raises(Fenced):
        store.save({0: PartitionWrite(epochs[0], {}, ANY_STATE)})
