"""The commit protocol of one batch: consume -> enrich -> produce, exactly once.

A :class:`Checkpoint` is handed everything it works with: the output (the transactional
producer), the consumer (its group metadata, and where to rewind), the store, the decoder, the
enricher and encoders, the owned partitions and the batch's session ends. It holds no service.
``docs/exactly-once.md`` explains why each crash point is safe. Its steps:

1. ``begin``: decode the messages; read the committed state of the batch's devices (cache,
   else Redis, using each record's snapshot when the record was written by a batch that never
   committed); begin the Kafka transaction;
2. ``enrich``: in input order, enrich each event and produce the enriched and dead-letter
   records, and the session events each event causes, inside the transaction;
3. ``commit``: declare ended the sessions the partitions' watermarks have passed; write the new
   state to Redis, fenced by each partition's epoch and checked to be complete up to the
   partition's committed offset, each record carrying the state it started from; wait for
   the deliveries; add the input offsets to the transaction and commit it; warm the caches.

``abort`` from any step before the commit completes aborts the transaction and rewinds the
consumer to the batch's first offsets: the replay reads the same snapshots and, with derived
ids, produces byte-identical output. Each step checks the checkpoint's :class:`Status`; a step
out of order raises :class:`IllegalTransition`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import KafkaException, TopicPartition

from enricher.codecs.tracker import TrackerEvent
from enricher.collaborators import (
    Consumer,
    Outcome,
    OwnedPartition,
    Publisher,
    RedisCall,
    Store,
    Topics,
    direct,
)
from enricher.deadletter import ProducerRecord, dead_letter, record_size
from enricher.enrich import Enriched, Enricher
from enricher.errors import BadInput
from enricher.intake import Decoded, InputMessage
from enricher.session import SessionState, StartCause
from enricher.session_ends import BatchSessionEnds, CommittedState, PartitionBatch
from enricher.session_events import SessionEvent
from enricher.store import PartitionWrite

T = TypeVar("T")
log = logging.getLogger("enricher.checkpoint")


class Status(enum.Enum):
    NEW = "new"
    OPEN = "open"
    """states loaded, transaction begun"""
    ENRICHED = "enriched"
    """every message produced as an enriched record or a dead letter"""
    COMMITTED = "committed"
    ABORTED = "aborted"


class IllegalTransition(RuntimeError):
    """A checkpoint step called out of order."""


@dataclass(slots=True)
class _Counts:
    """What the events of a batch added up to, counted in plain integers while they go."""

    produced: int = 0
    background: int = 0
    started: dict[StartCause, int] = field(default_factory=lambda: dict.fromkeys(StartCause, 0))


class Checkpoint:
    """One batch on its way to a commit. The order of its steps is the exactly-once protocol."""

    def __init__(
        self,
        messages: Sequence[InputMessage],
        *,
        output: Publisher,
        consumer: Consumer,
        store: Store,
        decode: Callable[[InputMessage], Decoded],
        enricher: Enricher,
        encode: Callable[[Enriched], bytes],
        encode_session: Callable[[SessionEvent], bytes],
        owned: Mapping[int, OwnedPartition],
        session_ends: BatchSessionEnds,
        topics: Topics,
        max_message_bytes: int,
        redis: RedisCall[Any] = direct,
    ) -> None:
        self.messages = messages
        self.output = output
        self.consumer = consumer
        self.store = store
        self.decode = decode
        self.enricher = enricher
        self.encode = encode
        self.encode_session = encode_session
        self.owned = owned
        self.ends = session_ends
        self.topics = topics
        self.max_message_bytes = max_message_bytes
        self.redis = redis
        self.status = Status.NEW
        self.partitions: dict[int, PartitionBatch] = {}
        for message in messages:
            batch = self.partitions.get(message.partition)
            if batch is None:
                self.partitions[message.partition] = PartitionBatch(message.offset, message.offset)
            else:
                batch.end = message.offset
        self.renews: dict[int, dict[str, int]] = {}
        self.decoded: list[Decoded] = []
        self.outcome = Outcome(consumed=len(messages))
        self.device_times_ms = self.outcome.device_times_ms
        self.kafka_times_ms = self.outcome.kafka_times_ms
        self._in_transaction = False
        self._refusals = 0

    @property
    def starts(self) -> dict[int, int]:
        """Each partition's first offset in the batch."""
        return {p: batch.start for p, batch in self.partitions.items()}

    def _require(self, expected: Status, step: str) -> None:
        if self.status is not expected:
            raise IllegalTransition(f"{step} when {self.status.value}, not {expected.value}")

    def run(self) -> Outcome:
        """Every step to the commit; raises if the batch must be aborted and replayed."""
        self.begin()
        self.enrich()
        self.commit()
        return self.outcome

    def begin(self) -> None:
        """Step 1: decode the messages, load their devices' states, begin the transaction."""
        self._require(Status.NEW, "begin")
        self.decoded = [self.decode(m) for m in self.messages]
        self._load()
        self._refusals = self.output.begin()
        self._in_transaction = True
        self.status = Status.OPEN

    def _load(self) -> None:
        missing: dict[int, set[str]] = {}
        publishes = self.ends.publishes
        for message, item in zip(self.messages, self.decoded, strict=True):
            if isinstance(item, BadInput):
                continue
            partition, (device, event) = message.partition, item
            if publishes:
                self.ends.observe(partition, event.time_ms, message.timestamp_ms)
            starting = self.partitions[partition].starting
            if device in starting:
                continue
            cache = self.owned[partition].cache
            if device in cache:
                starting[device] = cache[device]
                self.outcome.cache_hits += 1
            else:
                starting[device] = None
                missing.setdefault(partition, set()).add(device)
        self.outcome.cache_misses = sum(map(len, missing.values()))
        wanted = {p: (self.partitions[p].start, devices) for p, devices in missing.items()}
        seen = {p: list(batch.starting) for p, batch in self.partitions.items() if batch.starting}
        queries = self.ends.queries(self.starts)
        loaded = self.redis("load", lambda: self.store.load(wanted, seen, queries))
        for partition, states in loaded.states.items():
            self.partitions[partition].starting.update(states)
        self.renews = loaded.renews
        self.ends.loaded(loaded.expiring)

    def enrich(self) -> None:
        """Step 2: every message to the output or the dead-letter topic, in input order."""
        self._require(Status.OPEN, "enrich")
        outcome = self.outcome
        reasons = outcome.dead_lettered
        counts = _Counts()
        enrich_one = self._enrich_one
        for message, item in zip(self.messages, self.decoded, strict=True):
            try:
                if isinstance(item, BadInput):
                    raise item
                enrich_one(message, item[0], item[1], counts)
            except BadInput as error:
                self._dead_letter(message, error)
                reasons[error.reason] = reasons.get(error.reason, 0) + 1
        # Counted per batch, not per event: the loop above only adds to plain integers.
        outcome.produced += counts.produced
        for cause, count in counts.started.items():
            if count:
                outcome.sessions_started[cause.value] = (
                    outcome.sessions_started.get(cause.value, 0) + count
                )
        for visibility, count in (
            ("foreground", counts.produced - counts.background),
            ("background", counts.background),
        ):
            if count:
                by_state = outcome.events_by_state
                by_state[visibility] = by_state.get(visibility, 0) + count
        self.status = Status.ENRICHED

    def _enrich_one(
        self, message: InputMessage, device: str, event: TrackerEvent, counts: _Counts
    ) -> None:
        """Enrich one event and produce it; raises :class:`BadInput` (the state untouched)
        when its enriched record cannot be published."""
        partition = message.partition
        batch = self.partitions[partition]
        states = batch.states
        state = states[device] if device in states else batch.starting[device]
        renews = self.renews.get(partition)
        step, enriched = self.enricher.enrich(
            device, state, event, renews.get(device, 0) if renews else 0
        )
        value = self.encode(enriched)
        key, headers = message.key, message.headers
        size = len(key or b"") + len(value) if not headers else record_size(key, value, headers)
        if size > self.max_message_bytes:
            raise BadInput(
                "oversize", f"the enriched record is {size} bytes > {self.max_message_bytes}"
            )
        self.output.produce(
            self.topics.output,
            key,
            value,
            headers,
            message.timestamp_ms,
            source=(partition, message.offset),
        )
        new_state = step.state
        states[device] = new_state
        batch.offsets[device] = message.offset
        if self.ends.publishes:
            for session_event in self.ends.on_event(device, state, step):
                self._publish(session_event, message.timestamp_ms)
        counts.produced += 1
        if step.started is not None:
            counts.started[step.started] += 1
        if new_state.in_background:
            counts.background += 1
        self.device_times_ms.append(event.time_ms)
        self.kafka_times_ms.append(message.timestamp_ms)

    def _dead_letter(self, message: InputMessage, error: BadInput) -> None:
        letter = dead_letter(
            ProducerRecord(message.key, message.value, message.headers or []),
            error,
            (message.topic, message.partition, message.offset),
            self.max_message_bytes,
        )
        self.output.send(self.topics.dead_letters, letter, message.timestamp_ms)

    def _publish(self, event: SessionEvent, timestamp_ms: int | None = None) -> None:
        """Produce one session event, keyed by its device, in the batch's transaction."""
        record = ProducerRecord(event.device_id.encode(), self.encode_session(event), [])
        self.output.send(self.topics.session_events, record, timestamp_ms or 0)
        if event.end is not None:
            key = (event.end.cause.value, event.end.detected_by.value)
            ended = self.outcome.sessions_ended
            ended[key] = ended.get(key, 0) + 1

    def commit(self) -> None:
        """Step 3: end what the watermarks passed, write the states, commit the transaction."""
        self._require(Status.ENRICHED, "commit")
        for partition, batch in self.partitions.items():
            committed = self._committed_in(partition, batch)
            for event in self.ends.pass_watermark(partition, batch, committed):
                self._publish(event)
        self.outcome.watermarks_ms = self.ends.watermarks_ms
        self.outcome.sessions_reopened = self.ends.reopened
        self._save()
        self.output.await_deliveries(self._refusals)
        ends = {p: batch.end for p, batch in self.partitions.items()}
        self.output.commit(self.topics.input, ends, self.consumer.consumer_group_metadata())
        self._in_transaction = False
        self.status = Status.COMMITTED
        for partition, batch in self.partitions.items():
            owned = self.owned.get(partition)
            if owned is not None:
                owned.cache.update(batch.states)
                owned.committed = batch.end + 1
        self.output.forget((m.partition, m.offset) for m in self.messages)

    def _committed_in(self, partition: int, batch: PartitionBatch) -> CommittedState:
        """The committed state of a device of the partition, from the cache or from its
        packed record, and whether that record was written by a batch that never committed."""
        cache = self.owned[partition].cache
        codec = self.store.codec

        def committed(device: str, data: bytes | None) -> tuple[SessionState | None, bool]:
            if device in cache:
                return cache[device], False
            if data is None:
                return None, False
            unsettled = codec.offset_of(device, data) >= batch.start
            return codec.state_before(device, data, batch.start), unsettled

        return committed

    def _save(self) -> None:
        codec = self.store.codec
        writes = {}
        for partition, batch in self.partitions.items():
            records = {
                device: codec.pack(state, batch.offsets[device], batch.starting[device])
                for device, state in batch.states.items()
            }
            owned = self.owned[partition]
            write = PartitionWrite(owned.epoch, records, (owned.committed, batch.end + 1))
            writes[partition] = self.ends.write(partition, batch, write)
        self.redis("save", lambda: self.store.save(writes))

    def abort(self) -> bool:
        """Abort the transaction (if begun), drop the caches of the batch's partitions, which
        may hold states the abort undid, and rewind each partition to its first offset.
        Returns whether a transaction was aborted."""
        if self.status in (Status.COMMITTED, Status.ABORTED):
            raise IllegalTransition(f"abort when {self.status.value}")
        self.status = Status.ABORTED
        aborted, self._in_transaction = self._in_transaction, False
        if aborted:
            self.output.abort()
        for partition, batch in self.partitions.items():
            owned = self.owned.get(partition)
            if owned is not None:
                owned.cache.clear()
            try:
                self.consumer.seek(TopicPartition(self.topics.input, partition, batch.start))
            except KafkaException as error:
                log.info("partition %d not rewound (no longer assigned): %s", partition, error)
        return aborted
