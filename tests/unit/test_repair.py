"""Noticing that Redis lost state, and rebuilding it from the input (:mod:`enricher.repair`),
with no broker and no Redis: the fakes of ``protocol_world.py``, a reader that replays a list
of records as the input topic would, and the fault-free run of the same batches as the
reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_store import InMemoryStore
from protocol_world import (
    BATCH_1,
    BATCH_2,
    BATCH_3,
    CODECS,
    ENRICHER,
    LATENESS_MS,
    MAX_BYTES,
    TOPICS,
    World,
    message,
)
from support import Kind

from enricher.checkpoint import Checkpoint, Status
from enricher.collaborators import OwnedPartition
from enricher.intake import InputMessage
from enricher.records import LATEST
from enricher.repair import Discard, Plan, Reader, Repair, Run, plan
from enricher.session import SessionState
from enricher.session_ends import BatchSessionEnds, NoSessionEnds, SessionEnds
from enricher.store import Fenced, StateLost

# --- the plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("complete", "committed", "earliest", "expected"),
    [
        (120, 120, 0, None),  # complete up to the committed offset
        (150, 120, 0, None),  # ahead: a batch wrote, its transaction has not committed (yet)
        (None, -1, 0, None),  # the group never committed: nothing can be behind
        (80, 120, 0, Plan(3, 80, 80, 120, 0)),  # behind: replay from where it is complete
        (80, 120, 100, Plan(3, 80, 100, 120, 20)),  # the input lost 80..99 to retention
        (None, 120, 0, Plan(3, None, 0, 120, 0)),  # no record: rebuild from scratch
        (None, 120, 30, Plan(3, None, 30, 120, 30)),
        (80, 120, 500, Plan(3, 80, 120, 120, 40)),  # nothing retained up to the commit
    ],
)
def test_a_repair_is_planned_only_for_state_behind_the_committed_offset(
    complete: int | None, committed: int, earliest: int, expected: Plan | None
) -> None:
    assert plan(3, complete, committed, earliest) == expected


# --- noticing the loss ----------------------------------------------------------------------------


def test_a_store_rolled_back_to_before_a_committed_batch_fails_the_next_write_as_lost() -> None:
    store = InMemoryStore()
    world = World(store)
    before = store.snapshot()
    world.commit(BATCH_1)
    store.restore(before)  # an older snapshot, epochs included

    checkpoint = world.checkpoint(BATCH_2)
    with pytest.raises(StateLost) as raised:
        checkpoint.run()
    assert raised.value.partitions == [0, 1]
    checkpoint.abort()
    assert not world.producer.committed[1:]  # nothing of batch 2 was published


@pytest.mark.parametrize(("change", "raised"), [(-1, StateLost), (1, Fenced)])
def test_an_epoch_that_went_back_is_lost_state_and_a_newer_one_is_a_new_owner(
    change: int, raised: type[Exception]
) -> None:
    store = InMemoryStore()
    world = World(store)
    world.commit(BATCH_1)
    store.meta[0]["epoch"] += change
    with pytest.raises(raised) as error:
        world.checkpoint(BATCH_2).run()
    assert isinstance(error.value, Fenced | StateLost)
    assert error.value.partitions == [0]


def test_a_flushed_store_fails_the_next_write_as_lost() -> None:
    store = InMemoryStore()
    world = World(store)
    world.commit(BATCH_1)
    for kept in store.devices, store.meta, store.expiries, store.renews:
        kept.clear()
    with pytest.raises(StateLost):
        world.checkpoint(BATCH_2).run()


def test_the_owner_that_takes_a_partition_again_gets_an_epoch_above_a_zombies() -> None:
    store = InMemoryStore()
    zombie = store.fence([0], now_ms=1_000)[0].epoch
    owner = store.fence([0], now_ms=2_000)[0].epoch
    store.meta[0]["epoch"] = 5  # Redis lost both fences
    again = store.fence([0], now_ms=3_000)[0].epoch
    assert zombie < owner < again


# --- the repair -----------------------------------------------------------------------------------


class Record:
    """A consumed message, as confluent-kafka hands it over."""

    def __init__(self, item: InputMessage | None) -> None:
        self.item = item

    def error(self) -> KafkaError | None:
        return KafkaError(KafkaError._PARTITION_EOF) if self.item is None else None

    def topic(self) -> str:
        assert self.item is not None
        return self.item.topic

    def partition(self) -> int:
        assert self.item is not None
        return self.item.partition

    def offset(self) -> int:
        assert self.item is not None
        return self.item.offset

    def key(self) -> bytes | None:
        assert self.item is not None
        return self.item.key

    def value(self) -> bytes | None:
        assert self.item is not None
        return self.item.value

    def headers(self) -> Any:
        assert self.item is not None
        return self.item.headers

    def timestamp(self) -> tuple[int, int]:
        assert self.item is not None
        return (1, self.item.timestamp_ms)


class TopicReader:
    """The input topic's records, read from an assigned position, then end-of-partition."""

    def __init__(self, records: Sequence[InputMessage]) -> None:
        self.records = records
        self.partition: int | None = None
        self.position = 0

    def assign(self, partitions: list[TopicPartition]) -> None:
        [tp] = partitions
        self.partition, self.position = tp.partition, tp.offset

    def unassign(self) -> None:
        self.partition = None

    def seek(self, partition: TopicPartition) -> None:
        self.position = partition.offset

    def consumer_group_metadata(self) -> object:
        return None

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        assert self.partition is not None
        ahead = [
            r for r in self.records if r.partition == self.partition and r.offset >= self.position
        ][:num_messages]
        if not ahead:
            return [Record(None)]
        self.position = ahead[-1].offset + 1
        return [Record(r) for r in ahead]


def ends_for(on: bool) -> BatchSessionEnds:
    return SessionEnds(LATENESS_MS) if on else NoSessionEnds()


def replayer(world: World, ends: bool) -> Run:
    """What the service runs a repair's chunk with: the checkpoint, publishing nothing."""

    def run(messages: list[InputMessage], into: OwnedPartition, reader: Reader) -> None:
        checkpoint = Checkpoint(
            messages,
            output=Discard(),
            consumer=reader,
            store=world.store,
            decode=world.decode,
            enricher=ENRICHER,
            encode=CODECS.encode,
            encode_session=CODECS.encode_session,
            owned={messages[0].partition: into},
            session_ends=ends_for(ends),
            topics=TOPICS,
            max_message_bytes=MAX_BYTES,
        )
        checkpoint.run()
        assert checkpoint.status is Status.COMMITTED

    return run


def repair(
    world: World, partitions: Sequence[int], records: Sequence[InputMessage], chunk: int, ends: bool
) -> list[Repair]:
    """What the service does on assignment and on :class:`StateLost`: take the partitions
    (again), plan, and replay each repair to its end through the commit protocol, publishing
    nothing."""
    store = world.store
    taken = store.fence(partitions, now_ms=10**12)
    done = []
    for partition, ownership in taken.items():
        owned = world.owned[partition]
        owned.epoch, owned.cache = ownership.epoch, {}
        needed = plan(partition, ownership.complete, owned.committed, 0)
        if needed is None:
            continue

        replayed: list[int] = []
        job = Repair(
            needed,
            ownership.epoch,
            topic=TOPICS.input,
            reader=TopicReader(records),
            store=store,
            run=replayer(world, ends),
            chunk_size=chunk,
            replayed=replayed.append,
        )
        span = needed.end - needed.start
        assert job.progress == (0, span)
        while not job.step():
            assert 0 < job.progress[0] < span
        assert job.progress == (span, span)
        assert sum(replayed) == job.events
        done.append(job)
    return done


def committed_states(store: InMemoryStore) -> dict[str, SessionState | None]:
    return {
        device: store.codec.state_before(device, data, LATEST)
        for records in store.devices.values()
        for device, data in records.items()
    }


def test_a_repair_replays_from_where_the_state_is_complete_and_the_run_goes_on_unchanged() -> None:
    batches = [BATCH_1, BATCH_2, BATCH_3]
    records = [m for b in batches for m in b]
    reference_store = InMemoryStore()
    reference = World(reference_store)
    for batch in batches:
        reference.commit(batch)

    store = InMemoryStore()
    world = World(store)
    world.commit(BATCH_1)
    snapshot = store.snapshot()
    world.commit(BATCH_2)
    store.restore(snapshot)  # Redis restarts from an older snapshot
    checkpoint = world.checkpoint(BATCH_3)
    with pytest.raises(StateLost) as lost:
        checkpoint.run()
    checkpoint.abort()
    [first, second] = repair(world, lost.value.partitions, records, chunk=1, ends=False)
    # Each partition replays batch 2's share: from batch 1's end to the committed offset.
    assert (first.plan.start, first.plan.end, first.events) == (15, 17, 2)
    assert (second.plan.start, second.plan.end, second.events) == (22, 24, 2)
    world.commit(BATCH_3)

    assert world.producer.committed_records == reference.producer.committed_records
    assert committed_states(store) == committed_states(reference_store)
    assert {p: m["complete"] for p, m in store.meta.items()} == {0: 18, 1: 25}


def test_a_wiped_partition_is_rebuilt_from_the_earliest_offset() -> None:
    records = [*BATCH_1, *BATCH_2]
    reference_store = InMemoryStore()
    reference = World(reference_store)
    reference.commit(BATCH_1)
    reference.commit(BATCH_2)

    store = InMemoryStore()
    world = World(store)
    world.commit(BATCH_1)
    store.devices.pop(0)
    store.meta[0].clear()  # epoch and record of completeness gone: a flush of its keys
    checkpoint = world.checkpoint(BATCH_2)
    with pytest.raises(StateLost) as lost:
        checkpoint.run()
    checkpoint.abort()
    [job] = repair(world, lost.value.partitions, records, chunk=3, ends=False)
    assert (job.plan.complete, job.plan.start, job.plan.end, job.events) == (None, 0, 15, 5)
    world.commit(BATCH_2)
    assert committed_states(store) == committed_states(reference_store)


def test_a_repair_is_fenced_like_a_batch() -> None:
    store = InMemoryStore()
    world = World(store, partitions=[0])
    world.commit([m for m in BATCH_1 if m.partition == 0])
    world.owned[0].committed = 30  # as if later batches committed, and Redis lost them
    needed = plan(0, 15, 30, 0)
    assert needed is not None
    store.fence([0], now_ms=10**13)  # a new owner

    records = [message(0, offset, "dev-z", offset, offset) for offset in range(15, 30)]
    job = Repair(
        needed,
        world.owned[0].epoch,
        topic=TOPICS.input,
        reader=TopicReader(records),
        store=store,
        run=replayer(world, ends=False),
        chunk_size=5,
        replayed=lambda _: None,
    )
    with pytest.raises(Fenced):
        job.step()
    assert "dev-z" not in store.devices[0]


# --- the property ---------------------------------------------------------------------------------


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[list[InputMessage]], int, int, int, bool]:
    """Events of a few devices on two partitions, cut into batches; the batch after which Redis
    was snapshotted, the batch before which it was restored from that snapshot, the repair's
    chunk size, and whether the session events topic is on."""
    count = draw(st.integers(6, 40))
    devices = ["dev-a", "dev-b", "dev-c", "dev-d"]
    partition_of = {"dev-a": 0, "dev-b": 0, "dev-c": 1, "dev-d": 1}
    offsets = {0: 100, 1: 200}
    seconds = 0.0
    items = []
    for number in range(count):
        device = draw(st.sampled_from(devices))
        seconds += draw(st.sampled_from([1, 30, 400, 2000]))
        partition = partition_of[device]
        kinds: list[Kind] = ["screen_view", "screen_view", "background", "foreground"]
        kind = draw(st.sampled_from(kinds))
        items.append(message(partition, offsets[partition], device, number, seconds, kind=kind))
        offsets[partition] += 1
    cuts = sorted(draw(st.sets(st.integers(1, count - 1), min_size=2, max_size=6)))
    batches = [items[a:b] for a, b in zip([0, *cuts], [*cuts, count], strict=True)]
    snapshot_after = draw(st.integers(0, len(batches) - 2))
    rollback_at = draw(st.integers(snapshot_after + 1, len(batches)))
    return batches, snapshot_after, rollback_at, draw(st.integers(1, 8)), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(streams())
def test_a_rollback_at_any_point_repaired_at_any_chunk_size_changes_no_output_and_no_state(
    case: tuple[list[list[InputMessage]], int, int, int, bool],
) -> None:
    batches, snapshot_after, rollback_at, chunk, ends = case
    records = [m for batch in batches for m in batch]
    reference_store = InMemoryStore()
    reference = World(reference_store)
    for batch in batches:
        reference.commit(batch, ends_for(ends))

    store = InMemoryStore()
    world = World(store)
    snapshot = store.snapshot()
    repairs = 0
    for index, batch in enumerate(batches):
        if index == rollback_at:
            store.restore(snapshot)
        checkpoint = world.checkpoint(batch, ends_for(ends))
        try:
            checkpoint.run()
        except StateLost as lost:
            checkpoint.abort()
            repairs += len(repair(world, lost.partitions, records, chunk, ends))
            world.commit(batch, ends_for(ends))
        if index == snapshot_after:
            snapshot = store.snapshot()
    if rollback_at == len(batches):
        store.restore(snapshot)
    # The next assignment finds whatever no write found.
    repairs += len(repair(world, [0, 1], records, chunk, ends))

    lost_writes = any(batches[snapshot_after + 1 : rollback_at])
    assert (repairs > 0) == lost_writes
    assert world.producer.committed_records == reference.producer.committed_records
    assert committed_states(store) == committed_states(reference_store)
