"""The commit protocol of one batch (:mod:`enricher.checkpoint`), with no broker and no Redis:
the fakes of ``protocol_world.py`` and ``memory_store.py`` (a transactional producer, a
consumer, the store over dicts), and input built from the tracker protocol, so the expected
output comes from the rules, not from the code under test: file mode (:mod:`enricher.batch`)
or the :class:`Enricher` alone on the same events.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from hashlib import sha256
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException, Producer
from memory_store import InMemoryStore
from protocol_world import (
    BATCH_1,
    BATCH_2,
    BATCH_3,
    ENRICHER,
    LATENESS_MS,
    MAX_BYTES,
    TOPICS,
    Produced,
    World,
    as_unavailable,
    kafka_error,
    labels,
    last_offsets,
    message,
    on,
    reference,
    status,
)
from support import (
    UNBOUNDED,
    read_jsonl,
    write_jsonl,
)

from enricher import batch
from enricher.checkpoint import IllegalTransition, Status
from enricher.codecs import session_events
from enricher.collaborators import RedisCall, direct
from enricher.deadletter import record_size
from enricher.errors import Unavailable
from enricher.intake import InputMessage
from enricher.output import Output, Refused
from enricher.session_ends import BatchSessionEnds, NoSessionEnds, SessionEnds
from enricher.store import (
    Fenced,
    PartitionWrite,
)

# --- 1. commit ------------------------------------------------------------------------------------


def test_a_batch_commits_the_enriched_events_the_offsets_the_states_and_warms_the_caches(
    tmp_path: Path,
) -> None:
    world = World(InMemoryStore())
    checkpoint = world.checkpoint(BATCH_1)
    outcome = checkpoint.run()

    assert checkpoint.status is Status.COMMITTED
    [transaction] = world.producer.committed
    assert world.producer.open is None and not world.producer.aborted
    # The output: every event enriched, in input order, with its key, headers and timestamp.
    values, states = reference(BATCH_1)
    assert [r.topic for r in transaction.records] == [TOPICS.output] * len(BATCH_1)
    assert [r.value for r in transaction.records] == values
    assert [(r.key, list(r.headers), r.timestamp) for r in transaction.records] == [
        (m.key, m.headers, m.timestamp_ms) for m in BATCH_1
    ]
    # ... and the same events as file mode enriches them.
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(
        source, [(m.key.decode(), json.loads(m.value)) for m in BATCH_1 if m.key and m.value]
    )
    batch.run(ENRICHER, source, target, batch.MemoryStore(), UNBOUNDED)
    assert [(line["key"].encode(), line["event"]) for line in read_jsonl(target)] == [
        (r.key, json.loads(r.value or b"")) for r in transaction.records
    ]
    # The offsets after each partition's last record, with the consumer's group metadata.
    assert transaction.offsets == [("raw", 0, 15), ("raw", 1, 22)]
    assert transaction.group_metadata is world.consumer.group_metadata
    # The states, fenced by the partitions' epochs, each as of its device's last event.
    assert {p: w.epoch for p, w in world.store.applied} == {0: 1, 1: 1}
    for (partition, device), offset in last_offsets(BATCH_1).items():
        record = world.store.codec.unpack(device, world.store.devices[partition][device])
        assert (record.state, record.offset, record.snapshot) == (states[device], offset, None)
    # The caches, and where each partition is committed.
    assert world.owned[0].cache == {d: states[d] for d in ("dev-a", "dev-b")}
    assert world.owned[1].cache == {"dev-c": states["dev-c"]}
    assert (world.owned[0].committed, world.owned[1].committed) == (15, 22)
    assert world.consumer.seeks == []
    # What the metrics will count.
    assert (outcome.consumed, outcome.produced, outcome.dead_lettered) == (7, 7, {})
    assert outcome.sessions_started == {
        "new_device": 3,
        "background_timeout": 1,
        "foreground_timeout": 1,
    }
    assert (outcome.cache_hits, outcome.cache_misses) == (0, 3)
    assert outcome.events_by_state == {"foreground": 6, "background": 1}
    assert outcome.kafka_times_ms == [m.timestamp_ms for m in BATCH_1]


def test_the_next_batch_starts_from_the_cache_and_snapshots_the_committed_states() -> None:
    world = World(InMemoryStore())
    world.commit(BATCH_1)
    _, before = reference(BATCH_1)
    checkpoint = world.checkpoint(BATCH_2)
    outcome = checkpoint.run()

    # Cached devices are not read from Redis; the new device is.
    assert world.store.loads[-1] == {1: (22, ["dev-d"])}
    assert (outcome.cache_hits, outcome.cache_misses) == (2, 1)
    values, after = reference(BATCH_2, before)
    assert [r.value for r in world.producer.committed[-1].records] == values
    assert world.producer.committed[-1].offsets == [("raw", 0, 17), ("raw", 1, 24)]
    for (partition, device), offset in last_offsets(BATCH_2).items():
        record = world.store.codec.unpack(device, world.store.devices[partition][device])
        assert (record.state, record.offset, record.snapshot) == (
            after[device],
            offset,
            before.get(device),
        )
    # Device b, not in the batch, keeps its record and its cache entry.
    assert world.store.codec.unpack("dev-b", world.store.devices[0]["dev-b"]).offset == 14
    assert world.owned[0].cache == {"dev-a": after["dev-a"], "dev-b": before["dev-b"]}
    assert outcome.sessions_started == {"foreground_timeout": 1, "new_device": 1}


def test_the_producer_is_called_in_protocol_order_and_the_state_is_written_before_the_commit() -> (
    None
):
    producer = MagicMock(spec_set=Producer)
    producer.flush.return_value = 0
    store = InMemoryStore()
    calls_at_save: list[int] = []
    save = store.save

    def saving(writes: Mapping[int, PartitionWrite]) -> None:
        calls_at_save.append(len(producer.method_calls))
        save(writes)

    store.save = saving  # type: ignore[method-assign]
    world = World(store)
    world.output = Output(lambda _on_delivery: producer, timeout=1.0)
    world.commit(BATCH_1)

    names = [name for name, _, _ in producer.method_calls]
    produced = len(BATCH_1)
    assert names == [
        "begin_transaction",
        *["produce"] * produced,
        "flush",
        "send_offsets_to_transaction",
        "commit_transaction",
    ]
    assert calls_at_save == [1 + produced]  # after every record, before the offsets and commit
    positions, metadata, _ = producer.send_offsets_to_transaction.call_args.args
    assert [(tp.topic, tp.partition, tp.offset) for tp in positions] == [
        ("raw", 0, 15),
        ("raw", 1, 22),
    ]
    assert metadata is world.consumer.group_metadata


def test_a_renew_request_is_read_for_a_cached_device_and_honoured_once() -> None:
    world = World(InMemoryStore())
    world.commit(BATCH_1)
    assert world.store.request_renew(0, "dev-a") == 1
    batch_2 = [message(0, 15, "dev-a", 8, 41), message(0, 16, "dev-a", 9, 42)]
    checkpoint = world.checkpoint(batch_2)
    outcome = checkpoint.run()
    assert outcome.cache_hits == 1
    assert outcome.sessions_started == {"renew": 1}
    state = world.owned[0].cache["dev-a"]
    assert (state.renews_applied, state.event_index) == (1, 2)
    stored = world.store.codec.unpack("dev-a", world.store.devices[0]["dev-a"]).state
    assert stored == state


# --- 2. Redis errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("redis_call", "raised"),
    [(direct, redis.ConnectionError), (as_unavailable, Unavailable)],
    ids=["direct", "service-wrapper"],
)
def test_a_redis_error_at_save_aborts_clears_the_batch_caches_and_rewinds(
    redis_call: RedisCall[Any], raised: type[Exception]
) -> None:
    world = World(InMemoryStore(), partitions=(0, 1, 2))
    world.commit([*BATCH_1, message(2, 5, "dev-z", 50, 0)])
    devices_before = {p: dict(d) for p, d in world.store.devices.items()}
    cached_z = dict(world.owned[2].cache)
    world.store.fail_next_save = redis.ConnectionError("Connection refused")

    checkpoint = world.checkpoint(BATCH_2, redis_call=redis_call)
    with pytest.raises(raised):
        checkpoint.run()
    assert status(checkpoint) is Status.ENRICHED
    assert checkpoint.abort() is True

    assert status(checkpoint) is Status.ABORTED
    assert len(world.producer.committed) == 1  # batch 1 only
    [aborted] = world.producer.aborted
    assert len(aborted.records) == len(BATCH_2) and aborted.offsets == []
    assert world.producer.open is None
    assert world.store.devices == devices_before
    assert world.owned[0].cache == {} and world.owned[1].cache == {}
    assert world.owned[2].cache == cached_z  # not in the batch: kept
    assert (world.owned[0].committed, world.owned[1].committed) == (15, 22)
    assert world.consumer.seeks == [("raw", 0, 15), ("raw", 1, 22)]


def test_a_redis_error_at_load_rewinds_and_has_no_transaction_to_abort() -> None:
    world = World(InMemoryStore())
    world.store.fail_next_load = redis.TimeoutError("Timeout reading from socket")
    checkpoint = world.checkpoint(BATCH_1, redis_call=as_unavailable)
    with pytest.raises(Unavailable):
        checkpoint.run()
    assert checkpoint.abort() is False
    assert "begin_transaction" not in world.producer.calls
    assert "abort_transaction" not in world.producer.calls
    assert world.consumer.seeks == [("raw", 0, 10), ("raw", 1, 20)]


def test_an_abort_rewinds_the_partitions_still_assigned_and_skips_the_others() -> None:
    world = World(InMemoryStore())
    world.consumer.assigned = {1}
    world.store.fail_next_save = redis.ConnectionError("gone")
    checkpoint = world.checkpoint(BATCH_1)
    with pytest.raises(redis.ConnectionError):
        checkpoint.run()
    assert checkpoint.abort() is True
    assert world.consumer.seeks == [("raw", 1, 20)]
    assert not world.producer.committed


# --- 3. fencing -----------------------------------------------------------------------------------


def test_a_stale_epoch_raises_fenced_naming_the_partition_and_the_new_owner_replays() -> None:
    store = InMemoryStore()
    zombie = World(store)
    zombie.commit(BATCH_1)
    new_owner = World(store, partitions=(0,))  # partition 0 moved: its epoch bumped

    checkpoint = zombie.checkpoint(BATCH_2)
    with pytest.raises(Fenced) as raised:
        checkpoint.run()
    assert raised.value.partitions == [0]
    # Partition 1's write went through (its script ran); partition 0's did not.
    assert [(p, w.epoch) for p, w in store.applied[-1:]] == [(1, 1)]
    assert store.codec.unpack("dev-a", store.devices[0]["dev-a"]).offset == 13
    assert checkpoint.abort() is True
    assert len(zombie.producer.committed) == 1 and len(zombie.producer.aborted) == 1
    assert zombie.consumer.seeks == [("raw", 0, 15), ("raw", 1, 22)]

    # The new owner replays partition 0 (its cache is cold), the zombie partition 1 alone
    # (whose records of the aborted attempt are at or past the batch start: snapshots).
    new_owner.commit([m for m in BATCH_2 if m.partition == 0])
    zombie.owned.pop(0)
    zombie.commit([m for m in BATCH_2 if m.partition == 1])
    fault_free = World(InMemoryStore())
    fault_free.commit(BATCH_1)
    fault_free.commit(BATCH_2)
    expected = fault_free.producer.committed[-1].records
    assert new_owner.producer.committed[0].records == [r for r in expected if r.key == b"dev-a"]
    assert zombie.producer.committed[-1].records == [r for r in expected if r.key != b"dev-a"]
    assert store.devices == fault_free.store.devices


# --- 4. crash and replay --------------------------------------------------------------------------


def session_ends_on() -> BatchSessionEnds:
    return SessionEnds(LATENESS_MS)


def session_records(records: Iterable[Produced]) -> list[dict[str, Any]]:
    return [session_events.decode_json(r.value or b"") for r in on(TOPICS.session_events, records)]


@pytest.mark.parametrize("ends", [NoSessionEnds, session_ends_on], ids=["no-topic", "topic"])
@pytest.mark.parametrize("after", ["retry-in-place", "abort-restart", "crash-restart"])
@pytest.mark.parametrize("fault", ["partial-save", "commit-fails"])
def test_a_replay_after_a_failed_commit_is_byte_identical_to_a_fault_free_run(
    fault: str, after: str, ends: Callable[[], BatchSessionEnds]
) -> None:
    fault_free = World(InMemoryStore())
    for messages in (BATCH_1, BATCH_2, BATCH_3):
        fault_free.commit(messages, ends())
    expected = fault_free.producer.committed
    if ends is session_ends_on:
        # The case is worth testing: batch 2 ends sessions by the next event and by the
        # watermark, among its own devices and a quiet one (b) the store found.
        ended = {
            (r["device_id"], r["end"]["detected_by"])
            for r in session_records(expected[1].records)
            if r["end"]
        }
        assert ended == {
            ("dev-a", "next_event"),
            ("dev-b", "watermark"),
            ("dev-c", "watermark"),
        }
        # Batch 3: b's new session without a second end of its old one; a's ended by the
        # watermark b's event moved.
        assert [(r["device_id"], r["kind"]) for r in session_records(expected[2].records)] == [
            ("dev-b", "session_started"),
            ("dev-a", "session_ended"),
        ]

    store = InMemoryStore()
    world = World(store)
    world.commit(BATCH_1, ends())
    if fault == "partial-save":
        store.partial_save = {0}
    else:
        world.producer.fail_commit = kafka_error(
            KafkaError._TIMED_OUT, "commit timed out", txn_requires_abort=True
        )
    failed = world.checkpoint(BATCH_2, ends())
    with pytest.raises(redis.ConnectionError if fault == "partial-save" else KafkaException):
        failed.run()
    written = {p for p, _ in store.applied[2:]}
    assert written == ({0} if fault == "partial-save" else {0, 1})
    if after != "crash-restart":
        assert failed.abort() is True
        assert not world.owned[0].cache and not world.owned[1].cache
    if after != "retry-in-place":
        world = World(store)  # a new process: a new producer, cold caches, new epochs

    for messages in (BATCH_2, BATCH_3):
        world.commit(messages, ends())

    replayed = world.producer.committed[-2:]
    assert [t.records for t in replayed] == [t.records for t in expected[1:]]
    assert [t.offsets for t in replayed] == [t.offsets for t in expected[1:]]
    assert store.contents() == fault_free.store.contents()


def test_a_renew_honoured_by_a_lost_attempt_is_honoured_again_by_the_replay_and_only_once() -> None:
    renewed = [message(0, 15, "dev-a", 8, 41), message(0, 16, "dev-a", 9, 42)]
    fault_free = World(InMemoryStore())
    fault_free.commit(BATCH_1)
    fault_free.store.request_renew(0, "dev-a")
    fault_free.commit(renewed)

    store = InMemoryStore()
    world = World(store)
    world.commit(BATCH_1)
    store.request_renew(0, "dev-a")
    world.producer.fail_commit = kafka_error(KafkaError._TIMED_OUT, txn_requires_abort=True)
    failed = world.checkpoint(renewed)
    with pytest.raises(KafkaException):
        failed.run()
    assert failed.outcome.sessions_started == {"renew": 1}
    assert store.codec.unpack("dev-a", store.devices[0]["dev-a"]).state.renews_applied == 1
    assert failed.abort() is True
    restarted = World(store)
    replay = restarted.checkpoint(renewed)
    outcome = replay.run()

    assert outcome.sessions_started == {"renew": 1}
    assert restarted.producer.committed[0].records == fault_free.producer.committed[1].records
    assert store.devices == fault_free.store.devices
    restarted.commit([message(0, 17, "dev-a", 10, 43)])
    assert restarted.owned[0].cache["dev-a"].session_index == 3  # no second renew


def test_a_watermark_end_is_published_when_the_replay_is_cut_differently() -> None:
    """A quiet device's session declared ended by the watermark in a batch that never
    committed must still be declared ended by a committed batch.

    With at most one expiry candidate per batch: batch 1 commits device y1; the first attempt
    at offsets 1-3 (a late first event of y0, then z far later) declares y0 and y1 ended and
    writes y1's record with the attempt's last offset (3), then fails to commit. The replay is
    cut shorter (offset 1 alone: no watermark moves), the next batch (2-3) passes the
    watermark but its one candidate is y0, and so offset 3 commits with y1's record still the
    lost attempt's. From then on, that record is older than every batch start, so its state,
    "ended", reads as committed: y1's ``session_ended`` is never published."""
    y1 = message(0, 0, "dev-y1", 1, 100)
    y0 = message(0, 1, "dev-y0", 2, 95)
    z = [message(0, offset, "dev-z", 10 + offset, 298 + offset) for offset in range(2, 8)]

    def ends() -> BatchSessionEnds:
        return SessionEnds(LATENESS_MS, limit=1)

    fault_free = World(InMemoryStore())
    for messages in ([y1], [y0, z[0], z[1]], *([m] for m in z[2:])):
        fault_free.commit(messages, ends())

    world = World(InMemoryStore())
    world.commit([y1], ends())
    world.producer.fail_commit = kafka_error(KafkaError._TIMED_OUT, txn_requires_abort=True)
    failed = world.checkpoint([y0, z[0], z[1]], ends())
    with pytest.raises(KafkaException):
        failed.run()
    assert failed.abort() is True
    for messages in ([y0], [z[0], z[1]], *([m] for m in z[2:])):
        world.commit(messages, ends())

    def ended(records: Iterable[Produced]) -> set[str]:
        return {r["device_id"] for r in session_records(records) if r["end"]}

    assert ended(fault_free.producer.committed_records) == {"dev-y0", "dev-y1"}
    assert ended(world.producer.committed_records) == {"dev-y0", "dev-y1"}


# --- 5. illegal transitions -----------------------------------------------------------------------


def test_commit_before_enrich_is_illegal() -> None:
    world = World(InMemoryStore())
    checkpoint = world.checkpoint(BATCH_1)
    with pytest.raises(IllegalTransition):
        checkpoint.commit()
    checkpoint.begin()
    with pytest.raises(IllegalTransition, match="commit when open"):
        checkpoint.commit()
    assert not world.store.applied and not world.producer.committed


def test_enrich_before_begin_and_begin_twice_are_illegal() -> None:
    world = World(InMemoryStore())
    checkpoint = world.checkpoint(BATCH_1)
    with pytest.raises(IllegalTransition):
        checkpoint.enrich()
    checkpoint.begin()
    with pytest.raises(IllegalTransition, match="begin when open"):
        checkpoint.begin()
    assert world.producer.calls.count("begin_transaction") == 1
    assert checkpoint.status is Status.OPEN


def test_run_after_abort_is_illegal() -> None:
    world = World(InMemoryStore())
    checkpoint = world.checkpoint(BATCH_1)
    assert checkpoint.abort() is False
    with pytest.raises(IllegalTransition, match="begin when aborted"):
        checkpoint.run()
    assert world.producer.calls == []


def test_abort_after_commit_or_abort_is_illegal() -> None:
    world = World(InMemoryStore())
    checkpoint = world.checkpoint(BATCH_1)
    checkpoint.run()
    with pytest.raises(IllegalTransition, match="abort when committed"):
        checkpoint.abort()
    assert world.owned[0].cache and world.consumer.seeks == []
    again = world.checkpoint(BATCH_2)
    again.begin()
    assert again.abort() is True
    with pytest.raises(IllegalTransition, match="abort when aborted"):
        again.abort()
    assert len(world.producer.aborted) == 1


# --- 6. dead letters ------------------------------------------------------------------------------


def padded(partition: int, offset: int, device: str, number: int, size: int) -> InputMessage:
    """An event whose record (key, value and headers) is ``size`` bytes."""
    bare = message(partition, offset, device, number, 10, extra={"pad": ""})
    pad = "x" * (size - record_size(bare.key, bare.value, bare.headers))
    return message(partition, offset, device, number, 10, extra={"pad": pad})


def test_bad_and_oversize_input_is_dead_lettered_in_the_same_transaction_leaving_no_state() -> None:
    just_fits = padded(0, 4, "dev-f", 5, MAX_BYTES - 20)
    assert record_size(just_fits.key, just_fits.value, just_fits.headers) <= MAX_BYTES
    [grown], _ = reference([just_fits])
    assert record_size(just_fits.key, grown, just_fits.headers) > MAX_BYTES
    messages = [
        message(0, 0, "dev-a", 1, 0),
        message(0, 1, "dev-a", 2, 1, value=b"{not json"),
        message(0, 2, "dev-a", 3, 2),
        padded(0, 3, "dev-e", 4, MAX_BYTES + 1),
        just_fits,
        message(0, 5, None, 6, 3),
    ]
    world = World(InMemoryStore())
    checkpoint = world.checkpoint(messages)
    outcome = checkpoint.run()

    [transaction] = world.producer.committed
    records = transaction.records
    assert [r.topic for r in records] == [
        TOPICS.output,
        TOPICS.dead_letters,
        TOPICS.output,
        TOPICS.dead_letters,
        TOPICS.dead_letters,
        TOPICS.dead_letters,
    ]
    letters = on(TOPICS.dead_letters, records)
    assert [labels(r)["reason"] for r in letters] == [
        b"not_json",
        b"oversize",
        b"oversize",
        b"missing_key",
    ]
    assert [(labels(r)["topic"], labels(r)["partition"], labels(r)["offset"]) for r in letters] == [
        (b"raw", b"0", str(offset).encode()) for offset in (1, 3, 4, 5)
    ]
    not_json, too_large, outgrown, _ = letters
    assert (not_json.key, not_json.value) == (b"dev-a", b"{not json")
    assert not_json.headers[0] == ("trace", b"t2")
    assert labels(too_large)["truncated"] == b"true"
    # The input (cut to fit the limit with room for the labels), not the enriched record.
    assert just_fits.value is not None and outgrown.value is not None
    assert just_fits.value.startswith(outgrown.value)
    assert labels(outgrown)["original_value_sha256"] == sha256(just_fits.value).hexdigest()
    assert transaction.offsets == [("raw", 0, 6)]
    # The bad records leave no state: a's second good event is its second event.
    assert set(world.store.devices[0]) == {"dev-a"}
    assert set(world.owned[0].cache) == {"dev-a"}
    values, states = reference([messages[0], messages[2]])
    assert [r.value for r in on(TOPICS.output, records)] == values
    assert world.owned[0].cache["dev-a"] == states["dev-a"]
    assert world.owned[0].cache["dev-a"].event_index == 2
    assert outcome.produced == 2
    assert outcome.dead_lettered == {"not_json": 1, "oversize": 2, "missing_key": 1}


def test_a_record_the_producer_refuses_for_good_is_dead_lettered_not_aborted() -> None:
    world = World(InMemoryStore())
    world.producer.refuse_produce = lambda record: (
        KafkaError.MSG_SIZE_TOO_LARGE
        if (record.topic, record.key) == (TOPICS.output, b"dev-b")
        else None
    )
    checkpoint = world.checkpoint(BATCH_1)
    outcome = checkpoint.run()

    assert checkpoint.status is Status.COMMITTED and not world.producer.aborted
    [transaction] = world.producer.committed
    letters = on(TOPICS.dead_letters, transaction.records)
    assert [(labels(r)["reason"], labels(r)["offset"]) for r in letters] == [
        (b"not_producible", b"11"),
        (b"not_producible", b"14"),
    ]
    others = [m for m in BATCH_1 if m.key != b"dev-b"]
    values, _ = reference(others)
    assert [r.value for r in on(TOPICS.output, transaction.records)] == values
    assert "dev-b" not in world.store.devices[0] and "dev-b" not in world.owned[0].cache
    assert outcome.dead_lettered == {"not_producible": 2}
    assert outcome.produced == len(others)


def test_any_other_produce_error_aborts_the_batch() -> None:
    world = World(InMemoryStore())
    world.producer.refuse_produce = lambda record: (
        KafkaError._UNKNOWN_TOPIC if record.key == b"dev-c" else None
    )
    checkpoint = world.checkpoint(BATCH_1)
    with pytest.raises(KafkaException):
        checkpoint.run()
    assert checkpoint.status is Status.OPEN and not world.store.applied
    assert checkpoint.abort() is True
    assert not world.producer.committed and len(world.producer.aborted) == 1


def test_a_refusal_at_delivery_aborts_and_the_replay_dead_letters_that_input() -> None:
    too_large = reference(BATCH_1[:2])[0][1]  # dev-c's first event, enriched
    world = World(InMemoryStore())
    world.producer.refuse_delivery = lambda record: (
        KafkaError.MSG_SIZE_TOO_LARGE
        if (record.topic, record.value) == (TOPICS.output, too_large)
        else None
    )
    checkpoint = world.checkpoint(BATCH_1)
    with pytest.raises(Refused):
        checkpoint.run()
    assert checkpoint.abort() is True
    assert not world.producer.committed and world.producer.open is None
    assert world.output.refused(1, 20) is not None  # dev-c's first event

    replay = world.checkpoint(BATCH_1)
    outcome = replay.run()

    [transaction] = world.producer.committed
    [letter] = on(TOPICS.dead_letters, transaction.records)
    assert (labels(letter)["reason"], labels(letter)["partition"], labels(letter)["offset"]) == (
        b"not_producible",
        b"1",
        b"20",
    )
    assert letter.value == BATCH_1[1].value
    others = [m for m in BATCH_1 if m.offset != 20 or m.partition != 1]
    values, states = reference(others)
    assert [r.value for r in on(TOPICS.output, transaction.records)] == values
    assert world.owned[1].cache["dev-c"] == states["dev-c"]
    assert outcome.dead_lettered == {"not_producible": 1}
    assert world.output.unproducible == {}  # forgotten once the batch committed
