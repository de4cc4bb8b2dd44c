"""A world for the commit protocol without a broker or Redis: a transactional producer, a
consumer and a store as fakes, one service instance over them (:class:`World`), and input built
from the tracker protocol (``support.py``), so that expected output comes from the rules.

A :class:`FakeProducer` keeps the records of each transaction and commits or aborts them as a
transactional producer does; the store is :class:`memory_store.InMemoryStore`, which keeps
records, renew counters, epochs, clocks, expiries and how complete each partition's state is as
``PartitionStore`` keeps them in Redis, and fails on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from memory_store import SALT, InMemoryStore
from support import (
    START_MS,
    Kind,
    event_id,
    tracker_event,
)

from enricher import config
from enricher.checkpoint import Checkpoint, Status
from enricher.codecs import tracker
from enricher.codecs.factory import codecs
from enricher.collaborators import OwnedPartition, RedisCall, Topics, direct
from enricher.deadletter import HEADER_PREFIX
from enricher.enrich import Enricher
from enricher.errors import Unavailable
from enricher.intake import InputMessage, MessageDecoder
from enricher.output import DeliveryCallback, Output
from enricher.session import SessionConfig, SessionEngine, SessionState, Timeouts
from enricher.session_ends import BatchSessionEnds, NoSessionEnds

T = TypeVar("T")

FOREGROUND_S, BACKGROUND_S = 60, 15
LATENESS_MS = 1000
MAX_BYTES = 4000
MAX_AHEAD_MS = 86_400_000
TOPICS = Topics("raw", "enriched", "dead-letters", "session-events")
CODECS = codecs(config.Settings())
ENRICHER = Enricher(
    SessionEngine(
        SessionConfig(salt=SALT, timeouts=Timeouts.from_seconds(FOREGROUND_S, BACKGROUND_S))
    )
)

Header = tuple[str, str | bytes | None]


# --- the fakes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Produced:
    """One record as the producer was asked to produce it."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    timestamp: int


@dataclass
class Transaction:
    records: list[Produced] = field(default_factory=list)
    offsets: list[tuple[str, int, int]] = field(default_factory=list)
    group_metadata: object = None


class FakeMessage:
    """What a delivery report hands its callback (only ``topic()`` is read)."""

    def __init__(self, record: Produced) -> None:
        self.record = record

    def topic(self) -> str:
        return self.record.topic


def kafka_error(code: int, reason: str = "", **flags: bool) -> KafkaException:
    return KafkaException(KafkaError(code, reason or f"error {code}", **flags))


class FakeProducer:
    """A transactional producer: records go into the open transaction, which commits or
    aborts as a whole. ``refuse_produce`` makes ``produce`` raise for chosen records,
    ``refuse_delivery`` reports chosen records as failed at the next ``flush`` or ``poll``,
    and ``fail_commit`` makes the next ``commit_transaction`` raise."""

    def __init__(self) -> None:
        self.default_on_delivery: DeliveryCallback | None = None
        self.open: Transaction | None = None
        self.committed: list[Transaction] = []
        self.aborted: list[Transaction] = []
        self.refuse_produce: Callable[[Produced], int | None] = lambda _record: None
        self.refuse_delivery: Callable[[Produced], int | None] = lambda _record: None
        self.fail_commit: KafkaException | None = None
        self.reports: list[tuple[DeliveryCallback, KafkaError, Produced]] = []
        self.calls: list[str] = []

    def attach(self, on_delivery: DeliveryCallback) -> Producer:
        """``Output``'s ``make_producer``."""
        self.default_on_delivery = on_delivery
        return cast(Producer, self)

    def _transaction(self, call: str) -> Transaction:
        if self.open is None:
            raise kafka_error(KafkaError._STATE, f"{call} outside a transaction")
        return self.open

    def begin_transaction(self) -> None:
        self.calls.append("begin_transaction")
        if self.open is not None:
            raise kafka_error(KafkaError._STATE, "a transaction is open already")
        self.open = Transaction()

    def produce(  # noqa: PLR0917 (the binding's signature: Output passes arguments by position)
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        callback: DeliveryCallback | None = None,
        on_delivery: DeliveryCallback | None = None,
        timestamp: int = 0,
        headers: Sequence[Header] | None = None,
    ) -> None:
        """The binding's signature, positions included (test_producers.py holds the real
        one to it)."""
        self.calls.append("produce")
        on_delivery = callback or on_delivery
        transaction = self._transaction("produce")
        record = Produced(topic, key, value, tuple(headers or ()), timestamp)
        refused = self.refuse_produce(record)
        if refused is not None:
            raise kafka_error(refused, "refused at produce")
        transaction.records.append(record)
        failed = self.refuse_delivery(record)
        if failed is not None:
            callback = on_delivery or self.default_on_delivery
            assert callback is not None
            self.reports.append((callback, KafkaError(failed, "refused at delivery"), record))

    def _serve_reports(self) -> int:
        reports, self.reports = self.reports, []
        for callback, error, record in reports:
            callback(error, FakeMessage(record))
        return len(reports)

    def poll(self, timeout: float = -1) -> int:
        return self._serve_reports()

    def flush(self, timeout: float = -1) -> int:
        self.calls.append("flush")
        self._serve_reports()
        return 0

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.calls.append("purge")

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: object, timeout: float = -1
    ) -> None:
        self.calls.append("send_offsets_to_transaction")
        transaction = self._transaction("send_offsets_to_transaction")
        transaction.offsets += [(tp.topic, tp.partition, tp.offset) for tp in positions]
        transaction.group_metadata = group_metadata

    def commit_transaction(self, timeout: float = -1) -> None:
        self.calls.append("commit_transaction")
        transaction = self._transaction("commit_transaction")
        if self.fail_commit is not None:
            error, self.fail_commit = self.fail_commit, None
            raise error
        self.committed.append(transaction)
        self.open = None

    def abort_transaction(self, timeout: float = -1) -> None:
        self.calls.append("abort_transaction")
        self.aborted.append(self._transaction("abort_transaction"))
        self.open = None

    @property
    def committed_records(self) -> list[Produced]:
        return [record for transaction in self.committed for record in transaction.records]


class FakeConsumer:
    """The consumer's group metadata, and where it was rewound; ``assigned`` (if set) limits
    the partitions it can seek, as librdkafka does."""

    def __init__(self, assigned: set[int] | None = None) -> None:
        self.group_metadata = object()
        self.seeks: list[tuple[str, int, int]] = []
        self.assigned = assigned

    def consumer_group_metadata(self) -> object:
        return self.group_metadata

    def seek(self, partition: TopicPartition) -> None:
        if self.assigned is not None and partition.partition not in self.assigned:
            raise kafka_error(KafkaError._UNKNOWN_PARTITION, "not assigned")
        self.seeks.append((partition.topic, partition.partition, partition.offset))


class World:
    """One service instance: its producer and output, its consumer, the partitions it owns
    (fenced in the shared store when it is created, as on assignment)."""

    def __init__(self, store: InMemoryStore, partitions: Iterable[int] = (0, 1)) -> None:
        self.store = store
        self.producer = FakeProducer()
        self.output = Output(self.producer.attach, timeout=1.0)
        self.consumer = FakeConsumer()
        self.owned = {p: OwnedPartition(o.epoch) for p, o in store.fence(partitions).items()}
        self.decode = MessageDecoder(
            CODECS.decode, MAX_BYTES, MAX_AHEAD_MS, refused=self.output.refused
        )

    def checkpoint(
        self,
        messages: Sequence[InputMessage],
        ends: BatchSessionEnds | None = None,
        redis_call: RedisCall[Any] = direct,
    ) -> Checkpoint:
        return Checkpoint(
            messages,
            output=self.output,
            consumer=self.consumer,
            store=self.store,
            decode=self.decode,
            enricher=ENRICHER,
            encode=CODECS.encode,
            encode_session=CODECS.encode_session,
            owned=self.owned,
            session_ends=NoSessionEnds() if ends is None else ends,
            topics=TOPICS,
            max_message_bytes=MAX_BYTES,
            redis=redis_call,
        )

    def commit(
        self, messages: Sequence[InputMessage], ends: BatchSessionEnds | None = None
    ) -> None:
        checkpoint = self.checkpoint(messages, ends)
        checkpoint.run()
        assert checkpoint.status is Status.COMMITTED


def status(checkpoint: Checkpoint) -> Status:
    """The checkpoint's status (read through a call, so that mypy does not narrow it)."""
    return checkpoint.status


def as_unavailable(operation: str, call: Callable[[], T]) -> T:
    """What ``Service.redis_call`` does with a Redis error."""
    try:
        return call()
    except redis.RedisError as error:
        raise Unavailable(f"redis {operation}: {error}") from error


# --- input ----------------------------------------------------------------------------------------


def message(
    partition: int,
    offset: int,
    device: str | None,
    number: int,
    seconds: float,
    *,
    kind: Kind = "screen_view",
    value: bytes | None = None,
    extra: Mapping[str, str] | None = None,
) -> InputMessage:
    """An input record: a tracker event at ``START_MS + seconds``, keyed by the device, with
    a header of its own and a Kafka timestamp half a second after the event."""
    time_ms = START_MS + round(seconds * 1000)
    if value is None:
        value = tracker.dump(tracker_event(event_id(number), time_ms, kind, extra=extra))
    key = None if device is None else device.encode()
    return InputMessage(
        TOPICS.input,
        partition,
        offset,
        key,
        value,
        [("trace", f"t{number}".encode())],
        time_ms + 500,
    )


# Partition 0: devices a and b; partition 1: device c. Device a returns from the background
# after the background timeout, device c after the foreground timeout: new sessions.
BATCH_1 = [
    message(0, 10, "dev-a", 1, 0),
    message(1, 20, "dev-c", 2, 1),
    message(0, 11, "dev-b", 3, 2),
    message(0, 12, "dev-a", 4, 5, kind="background"),
    message(1, 21, "dev-c", 5, 100),
    message(0, 13, "dev-a", 6, 40, kind="foreground"),
    message(0, 14, "dev-b", 7, 3),
]
# Device a after the foreground timeout; c within its session, then new device d far later,
# whose clock passes c's expiry and (partition 0's clock) b's, who is quiet in this batch.
BATCH_2 = [
    message(0, 15, "dev-a", 8, 200),
    message(1, 22, "dev-c", 9, 101),
    message(0, 16, "dev-a", 10, 201),
    message(1, 23, "dev-d", 11, 300),
]
# Device b returns: a new session; batch 2's watermark declared its previous session ended, so
# no second end is published. Its time moves partition 0's watermark past a's expiry.
BATCH_3 = [message(0, 17, "dev-b", 12, 400), message(1, 24, "dev-d", 13, 301)]


def reference(
    messages: Sequence[InputMessage], states: dict[str, SessionState] | None = None
) -> tuple[list[bytes], dict[str, SessionState]]:
    """The enriched values of ``messages`` and the states they leave, by the Enricher alone."""
    states = dict(states or {})
    values = []
    for m in messages:
        assert m.key is not None and m.value is not None
        device = m.key.decode()
        step, enriched = ENRICHER.enrich(device, states.get(device), tracker.decode(m.value))
        states[device] = step.state
        values.append(tracker.encode(enriched.event, enriched.entities))
    return values, states


def on(topic: str, records: Iterable[Produced]) -> list[Produced]:
    return [r for r in records if r.topic == topic]


def labels(record: Produced) -> dict[str, bytes | str | None]:
    return {n[len(HEADER_PREFIX) :]: v for n, v in record.headers if n.startswith(HEADER_PREFIX)}


def last_offsets(messages: Iterable[InputMessage]) -> dict[tuple[int, str], int]:
    return {(m.partition, m.key.decode()): m.offset for m in messages if m.key is not None}
