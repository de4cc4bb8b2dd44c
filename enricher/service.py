"""The streaming service: consume -> enrich -> produce, exactly once.

The commit protocol lives in :class:`Checkpoint` and nowhere else; ``docs/exactly-once.md``
explains why each crash point is safe. In short, per batch:

1. read the committed state of the batch's devices (cache, else Redis, using each record's
   snapshot when the record was written by a batch that never committed);
2. enrich in input order and produce the output and dead-letter records inside a Kafka
   transaction, and with a session lifecycle topic, the sessions each event started and
   ended, then the ends of the sessions the partitions' watermarks have passed;
3. write the new state to Redis, fenced by the partition's epoch, each record carrying the
   state it started from (and each partition's clock, the value it started from);
4. add the input offsets to the transaction and commit it.

A failure anywhere before 4 completes aborts the transaction and rewinds the consumer to the
batch's first offsets: the replay reads the same snapshots and, with derived ids, produces
byte-identical output.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from enricher import lifecycle
from enricher.config import Settings
from enricher.enrich import Enricher
from enricher.errors import BadInput, Unavailable
from enricher.formats import Codecs
from enricher.lifecycle import SessionEvent
from enricher.metrics import Metrics
from enricher.session import SessionState
from enricher.store import ClockQuery, Expiring, Fenced, PartitionStore, PartitionWrite

log = logging.getLogger("enricher.service")

Headers = list[tuple[str, str | bytes | None]]
DLQ_HEADER_PREFIX = "enricher.error."
_BACKOFF_START = 0.2
_BACKOFF_MAX = 10.0
# At most this many sessions of a partition are checked against its watermark per batch; the
# rest wait for the next batches.
EXPIRING_PER_BATCH = 2000


def consumer_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        # Cooperative rebalancing moves only the partitions that must move: the others keep
        # their warm state cache and are never paused.
        "partition.assignment.strategy": "cooperative-sticky",
        "enable.partition.eof": False,
        "statistics.interval.ms": 5000,
        **settings.kafka,
    }


def producer_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "transactional.id": settings.effective_transactional_id(),
        "transaction.timeout.ms": settings.transaction_timeout_ms,
        "enable.idempotence": True,
        "linger.ms": 5,
        # The Java clients' partitioner, so a device lands on the same partition number in
        # the output topic as in the input topic written by a JVM collector.
        "partitioner": "murmur2_random",
        **settings.kafka,
    }


@dataclass(frozen=True, slots=True)
class InputRecord:
    """The parts of a consumed Kafka message the service uses, read once."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp_ms: int

    @classmethod
    def of(cls, message: Message) -> InputRecord:
        headers = message.headers()
        return cls(
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            key=_as_bytes(message.key()),
            value=_as_bytes(message.value()),
            headers=list(headers.items()) if isinstance(headers, dict) else headers,
            timestamp_ms=message.timestamp()[1],
        )


def _as_bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


@dataclass(slots=True)
class Owned:
    """A partition this instance owns: its fencing epoch, its warm state, its sweep cursor."""

    epoch: int
    committed: int = -1
    cache: dict[str, SessionState] = field(default_factory=dict)
    sweep_cursor: int | None = None


class Sweeper:
    """Expires devices not seen for ``state_ttl_days``, a slice per partition between batches,
    so that a sweep never stalls the stream."""

    SLICE = 500

    def __init__(self, service: Service) -> None:
        self.service = service
        self.ttl_ms = int(service.settings.state_ttl_days * 86_400_000)
        self.interval = service.settings.state_sweep_interval
        self.next_at = time.monotonic()
        self.cutoff_ms = 0

    def step(self) -> None:
        if not self.ttl_ms:
            return
        owned = self.service.owned
        pending = {p: o for p, o in owned.items() if o.sweep_cursor is not None}
        if not pending:
            if time.monotonic() < self.next_at:
                return
            self.next_at = time.monotonic() + self.interval
            self.cutoff_ms = int(time.time() * 1000) - self.ttl_ms
            for state in owned.values():
                state.sweep_cursor = 0
                state.cache = {
                    d: s for d, s in state.cache.items() if s.last_event_ms >= self.cutoff_ms
                }
            pending = dict(owned)
        slices = {p: (o.epoch, o.sweep_cursor or 0) for p, o in pending.items()}
        store = self.service.store
        done = self.service.redis_call(
            "sweep", lambda: store.sweep(slices, self.cutoff_ms, self.SLICE)
        )
        for partition, (cursor, deleted) in done.items():
            pending[partition].sweep_cursor = cursor or None
            if deleted:
                self.service.metrics.expired.inc(deleted)


@dataclass(slots=True)
class Outcome:
    """What a batch produced, for the metrics once it commits."""

    consumed: int = 0
    produced: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    sessions_started: dict[str, int] = field(default_factory=dict)
    events_by_state: dict[str, int] = field(default_factory=dict)
    device_times_ms: list[int] = field(default_factory=list)
    kafka_times_ms: list[int] = field(default_factory=list)
    sessions_ended: dict[tuple[str, str], int] = field(default_factory=dict)
    """by (cause, detected by)"""
    sessions_reopened: int = 0
    watermarks_ms: dict[int, int] = field(default_factory=dict)


class Checkpoint:
    """One batch on its way to a commit. The order of its steps is the exactly-once protocol."""

    def __init__(self, service: Service, messages: list[InputRecord]) -> None:
        self.service = service
        self.messages = messages
        self.starts: dict[int, int] = {}
        self.ends: dict[int, int] = {}
        for message in messages:
            partition, offset = message.partition, message.offset
            self.starts.setdefault(partition, offset)
            self.ends[partition] = offset
        self.states: dict[int, dict[str, SessionState]] = {p: {} for p in self.starts}
        self.offsets: dict[int, dict[str, int]] = {p: {} for p in self.starts}
        self.bases: dict[int, dict[str, SessionState | None]] = {p: {} for p in self.starts}
        self.renews: dict[int, dict[str, int]] = {}
        self.expiring: dict[int, Expiring] = {}
        self.rescored: dict[int, dict[str, int]] = {}
        self.unscored: dict[int, list[str]] = {}
        self.outcome = Outcome(consumed=len(messages))
        self.in_transaction = False

    def run(self) -> None:
        """Steps 1 to 4; raises if the batch must be aborted and replayed."""
        service = self.service
        decoded = [service.decode_message(m) for m in self.messages]
        self.load_states(decoded)
        service.producer.begin_transaction()
        self.in_transaction = True
        for message, item in zip(self.messages, decoded, strict=True):
            try:
                if isinstance(item, BadInput):
                    raise item
                self.enrich(message, item)
            except BadInput as error:
                service.dead_letter(message, error)
                reasons = self.outcome.dead_lettered
                reasons[error.reason] = reasons.get(error.reason, 0) + 1
        for partition, expiring in self.expiring.items():
            self.end_expired(partition, expiring)
        self.save_states()
        offsets = [
            TopicPartition(service.settings.input_topic, p, end + 1) for p, end in self.ends.items()
        ]
        service.producer.send_offsets_to_transaction(
            offsets, service.consumer.consumer_group_metadata(), service.kafka_timeout
        )
        service.producer.commit_transaction(service.kafka_timeout)

    def load_states(self, decoded: list[tuple[str, Any] | BadInput]) -> None:
        service = self.service
        missing: dict[int, set[str]] = {}
        clocks: dict[int, int] = {}
        hits = 0
        for message, item in zip(self.messages, decoded, strict=True):
            if isinstance(item, BadInput):
                continue
            partition, device = message.partition, item[0]
            if service.settings.session_events_topic:
                time_ms = lifecycle.clock_time(item[1].facts.time_ms, message.timestamp_ms)
                if time_ms > clocks.get(partition, time_ms - 1):
                    clocks[partition] = time_ms
            known = self.bases[partition]
            if device in known:
                continue
            cache = service.owned[partition].cache
            if device in cache:
                known[device] = cache[device]
                hits += 1
            else:
                known[device] = None
                missing.setdefault(partition, set()).add(device)
        service.metrics.cache.labels(result="hit").inc(hits)
        service.metrics.cache.labels(result="miss").inc(sum(map(len, missing.values())))
        wanted = {p: (self.starts[p], devices) for p, devices in missing.items()}
        seen = {p: list(devices) for p, devices in self.bases.items() if devices}
        queries = {}
        if service.settings.session_events_topic:
            lateness = service.lateness_ms
            queries = {
                p: ClockQuery(start, clocks.get(p), lateness, EXPIRING_PER_BATCH)
                for p, start in self.starts.items()
            }
        loaded = service.redis_call("load", lambda: service.store.load(wanted, seen, queries))
        for partition, states in loaded.states.items():
            self.bases[partition].update(states)
        self.renews = loaded.renews
        self.expiring = loaded.expiring

    def enrich(self, message: InputRecord, item: tuple[str, Any]) -> None:
        service = self.service
        device, event = item
        partition = message.partition
        states = self.states[partition]
        state = states[device] if device in states else self.bases[partition][device]
        renews = self.renews.get(partition, {}).get(device, 0)
        step, enriched = service.enricher.enrich(device, state, event, renews)
        value = service.encode(enriched)
        states[device] = step.state
        self.offsets[partition][device] = message.offset
        service.producer.produce(
            service.settings.output_topic,
            value=value,
            key=message.key,
            headers=message.headers,
            timestamp=message.timestamp_ms,
        )
        outcome = self.outcome
        if service.settings.session_events_topic:
            for record in lifecycle.on_step(device, state, step):
                self.publish(record, message.timestamp_ms)
            if lifecycle.reopened(state, step):
                outcome.sessions_reopened += 1
        outcome.produced += 1
        if step.started is not None:
            cause = step.started.value
            outcome.sessions_started[cause] = outcome.sessions_started.get(cause, 0) + 1
        visibility = "background" if step.state.in_background else "foreground"
        outcome.events_by_state[visibility] = outcome.events_by_state.get(visibility, 0) + 1
        outcome.device_times_ms.append(event.facts.time_ms)
        outcome.kafka_times_ms.append(message.timestamp_ms)

    def end_expired(self, partition: int, expiring: Expiring) -> None:
        """Declare ended the sessions of ``partition`` its watermark has passed: those of the
        devices of this batch, and those ``expiring`` found among the others."""
        if expiring.clock_ms is None:
            return
        watermark = expiring.clock_ms - self.service.lateness_ms
        self.outcome.watermarks_ms[partition] = watermark
        states, bases = self.states[partition], self.bases[partition]
        for device, state in list(states.items()):
            if lifecycle.expired(state, watermark):
                states[device], record = lifecycle.declare_ended(device, state, watermark)
                self.publish(record)
        cache = self.service.owned[partition].cache
        codec = self.service.store.codec
        self.unscored[partition] = unscored = []
        self.rescored[partition] = rescored = {}
        for device, data in expiring.records.items():
            if device in states:
                continue
            if device in cache:
                committed: SessionState | None = cache[device]
            elif data is None:
                committed = None
            else:
                committed = codec.state_before(device, data, self.starts[partition])
            if committed is None or committed.ended:
                unscored.append(device)
            elif lifecycle.expired(committed, watermark):
                bases[device] = committed
                states[device], record = lifecycle.declare_ended(device, committed, watermark)
                self.offsets[partition][device] = self.ends[partition]
                self.publish(record)
            else:
                rescored[device] = committed.expires_ms

    def publish(self, record: SessionEvent, timestamp_ms: int | None = None) -> None:
        """Produce one lifecycle record, keyed by its device, in the batch's transaction."""
        service = self.service
        service.producer.produce(
            service.settings.session_events_topic,
            value=service.codecs.encode_session(record),
            key=record.device_id.encode(),
            timestamp=timestamp_ms or 0,
        )
        if record.end is not None:
            key = (record.end.cause.value, record.end.detected_by.value)
            ended = self.outcome.sessions_ended
            ended[key] = ended.get(key, 0) + 1

    def save_states(self) -> None:
        service = self.service
        codec = service.store.codec
        writes = {}
        for partition in self.starts:
            states = self.states[partition]
            offsets = self.offsets[partition]
            bases = self.bases[partition]
            records = {
                device: codec.pack(state, offsets[device], bases[device])
                for device, state in states.items()
            }
            write = PartitionWrite(service.owned[partition].epoch, records)
            expiring = self.expiring.get(partition)  # only with the lifecycle topic
            if expiring is not None and expiring.clock_ms is not None:
                scores = dict(self.rescored.get(partition, {}))
                unscored = list(self.unscored.get(partition, []))
                for device, state in states.items():
                    score = _expiry_score(state, bases[device])
                    if score is None:
                        unscored.append(device)
                    else:
                        scores[device] = score
                clock = (expiring.clock_ms, self.ends[partition], expiring.committed_ms)
                write = write._replace(clock=clock, scores=scores, unscored=unscored)
            writes[partition] = write
        service.redis_call("save", lambda: service.store.save(writes))

    def committed(self) -> None:
        """After the commit: warm the caches and count what was published."""
        service = self.service
        for partition, end in self.ends.items():
            owned = service.owned.get(partition)
            if owned is not None:
                owned.cache.update(self.states[partition])
                owned.committed = end + 1
        service.record(self.outcome)


def _expiry_score(state: SessionState, base: SessionState | None) -> int | None:
    """A device's score in the expiries: the earliest expiry of a session not declared ended,
    whether this batch commits (``state``) or not (``base``); None if both are ended."""
    open_expiries = [s.expires_ms for s in (state, base) if s is not None and not s.ended]
    return min(open_expiries) if open_expiries else None


class Service:
    """A long-running enricher instance: one consumer, one transactional producer."""

    def __init__(
        self,
        settings: Settings,
        enricher: Enricher,
        store: PartitionStore,
        codecs: Codecs,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.enricher = enricher
        self.store = store
        self.codecs = codecs
        self.decode, self.encode = codecs.decode, codecs.encode
        self.lateness_ms = round(settings.session_events_lateness * 1000)
        self.metrics = metrics
        self.kafka_timeout = max(10.0, settings.transaction_timeout_ms / 1000)
        self.owned: dict[int, Owned] = {}
        self.stopping = threading.Event()
        self.healthy = {"kafka": False, "redis": False}
        self.on_progress: Callable[[], None] = lambda: None
        self._delay = _BACKOFF_START
        self.sweeper = Sweeper(self)
        metrics.consumer_info.labels(group=settings.group_id, topic=settings.input_topic).set(1)
        consumer_settings = consumer_config(settings)
        consumer_settings["stats_cb"] = self._observe_stats
        consumer_settings["error_cb"] = self._kafka_error
        self.consumer = Consumer(consumer_settings, logger=logging.getLogger("enricher.kafka"))
        self.producer = Producer(
            {**producer_config(settings), "error_cb": self._kafka_error},
            logger=logging.getLogger("enricher.kafka"),
        )

    # -- running ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`; then leave the group cleanly."""
        self.producer.init_transactions(self.kafka_timeout)
        self.consumer.subscribe(
            [self.settings.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info("started", extra={"settings": self.settings.redacted()})
        try:
            while not self.stopping.is_set():
                self.on_progress()
                messages = self.consumer.consume(
                    self.settings.batch_size, self.settings.batch_timeout_ms / 1000
                )
                batch = [InputRecord.of(m) for m in messages if self._usable(m)]
                if batch:
                    self.process(batch)
                self._sweep()
        finally:
            self.close()

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        log.info("leaving the consumer group")
        self.consumer.close()
        self.producer.flush(self.settings.shutdown_timeout)

    def input_partitions(self) -> int:
        """How many partitions the input topic has (device state is kept per partition)."""
        topic = self.settings.input_topic
        metadata = self.consumer.list_topics(topic, timeout=self.kafka_timeout)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        if not partitions:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"no topic {topic}"))
        return len(partitions)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        detail = {"partitions": sorted(self.owned), **self.healthy}
        return bool(self.owned) and all(self.healthy.values()), detail

    # -- one batch -------------------------------------------------------------------------

    def process(self, messages: list[InputRecord]) -> None:
        """Commit one batch, or abort it, rewind, and back off before the next attempt.

        A failed batch is not retried in place: the main loop consumes it again from the
        rewound offsets, so rebalance callbacks keep running while Kafka or Redis is away.
        """
        messages = [m for m in messages if m.partition in self.owned]
        if not messages:
            return
        started = time.monotonic()
        checkpoint = Checkpoint(self, messages)
        try:
            checkpoint.run()
        except Fenced as error:
            log.warning("fenced: another instance owns these partitions now: %s", error)
            self._abort(checkpoint)
            for partition in error.partitions:
                self.owned.pop(partition, None)
            self.consumer.pause(
                [TopicPartition(self.settings.input_topic, p) for p in error.partitions]
            )
            return
        except (Unavailable, KafkaException, redis.RedisError) as error:
            self._abort(checkpoint)
            if isinstance(error, KafkaException) and error.args[0].fatal():
                raise
            log.warning("batch aborted, retrying in %.1fs: %s", self._delay, error)
            self.stopping.wait(self._delay)
            self._delay = min(self._delay * 2, _BACKOFF_MAX)
            return
        self._delay = _BACKOFF_START
        self._set_health("kafka", True)
        checkpoint.committed()
        self.metrics.transactions.labels(outcome="committed").inc()
        self.metrics.batch_size.observe(len(messages))
        self.metrics.batch_duration.observe(time.monotonic() - started)

    def _sweep(self) -> None:
        try:
            self.sweeper.step()
        except Fenced as error:
            log.warning("sweep fenced: %s", error)
            for partition in error.partitions:
                self.owned.pop(partition, None)
        except Unavailable as error:
            log.info("sweep postponed: %s", error)

    def _abort(self, checkpoint: Checkpoint) -> None:
        """Abort the transaction and rewind every partition of the batch to its first offset."""
        if checkpoint.in_transaction:
            self.metrics.transactions.labels(outcome="aborted").inc()
            try:
                self.producer.abort_transaction(self.kafka_timeout)
            except KafkaException as error:
                if error.args[0].fatal():
                    raise
                log.warning("abort failed: %s", error)
        for partition, start in checkpoint.starts.items():
            owned = self.owned.get(partition)
            if owned is not None:
                owned.cache.clear()
            try:
                self.consumer.seek(TopicPartition(self.settings.input_topic, partition, start))
            except KafkaException as error:
                log.info("partition %d not rewound (no longer assigned): %s", partition, error)

    def decode_message(self, message: InputRecord) -> tuple[str, Any] | BadInput:
        key, value = message.key, message.value
        try:
            if not key:
                raise BadInput("missing_key", "the record has no key (the device id)")
            if value is None:
                raise BadInput("not_json", "the record has no value")
            if len(value) > self.settings.max_message_bytes:
                raise BadInput(
                    "oversize", f"{len(value)} bytes > {self.settings.max_message_bytes}"
                )
            try:
                device = key.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput("missing_key", "the key is not UTF-8 text") from None
            return device, self.decode(value)
        except BadInput as error:
            return error

    def dead_letter(self, message: InputRecord, error: BadInput) -> None:
        headers: Headers = list(message.headers or [])
        headers += [
            (DLQ_HEADER_PREFIX + "reason", error.reason.encode()),
            (DLQ_HEADER_PREFIX + "message", error.detail[:1000].encode()),
            (DLQ_HEADER_PREFIX + "topic", message.topic.encode()),
            (DLQ_HEADER_PREFIX + "partition", str(message.partition).encode()),
            (DLQ_HEADER_PREFIX + "offset", str(message.offset).encode()),
        ]
        self.producer.produce(
            self.settings.dlq_topic,
            value=message.value,
            key=message.key,
            headers=headers,
            timestamp=message.timestamp_ms,
        )

    def record(self, outcome: Outcome) -> None:
        m = self.metrics
        m.consumed.inc(outcome.consumed)
        m.produced.inc(outcome.produced)
        for reason, count in outcome.dead_lettered.items():
            m.dead_lettered.labels(reason=reason).inc(count)
        for cause, count in outcome.sessions_started.items():
            m.sessions_started.labels(cause=cause).inc(count)
        for state, count in outcome.events_by_state.items():
            m.events.labels(state=state).inc(count)
        for (cause, detected_by), count in outcome.sessions_ended.items():
            m.sessions_ended.labels(cause=cause, detected_by=detected_by).inc(count)
        m.sessions_reopened.inc(outcome.sessions_reopened)
        for partition, watermark_ms in outcome.watermarks_ms.items():
            m.watermark.labels(partition=str(partition)).set(watermark_ms / 1000)
        now_ms = time.time() * 1000
        device_latency = m.latency.labels(clock="device")
        kafka_latency = m.latency.labels(clock="kafka")
        for time_ms in outcome.device_times_ms:
            device_latency.observe(max(0.0, (now_ms - time_ms) / 1000))
        for time_ms in outcome.kafka_times_ms:
            kafka_latency.observe(max(0.0, (now_ms - time_ms) / 1000))

    # -- Redis and Kafka plumbing ----------------------------------------------------------

    def redis_call(self, operation: str, call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            result = call()
        except redis.RedisError as error:
            self.metrics.redis_errors.labels(operation=operation).inc()
            self._set_health("redis", False, str(error))
            raise Unavailable(f"redis {operation}: {error}") from error
        self.metrics.redis_duration.labels(operation=operation).observe(time.monotonic() - started)
        self._set_health("redis", True)
        return result

    def _set_health(self, service: str, ok: bool, why: str = "") -> None:
        if self.healthy[service] != ok:
            self.healthy[service] = ok
            if ok:
                log.info("%s reachable", service)
            else:
                log.warning("%s unreachable: %s", service, why)

    def _kafka_error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._set_health("kafka", False, error.str())
        else:
            log.info("kafka: %s", error.str())

    def _observe_stats(self, stats_json: str) -> None:
        committed = {p: owned.committed for p, owned in self.owned.items()}
        self.metrics.observe_lag(stats_json, committed)

    def _usable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            self._set_health("kafka", True)
            return True
        if error.fatal():
            raise KafkaException(error)
        log.warning("consume: %s", error.str())
        return False

    def _on_assign(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        self.metrics.rebalances.labels(kind="assign").inc()
        delay = _BACKOFF_START
        while True:
            try:
                epochs = self.redis_call("fence", lambda: self.store.fence(numbers))
                break
            except Unavailable as error:
                if self.stopping.is_set():
                    raise
                log.warning("cannot fence partitions %s yet: %s", numbers, error)
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
        self._set_health("kafka", True)
        # A partition this instance paused when it was fenced stays paused through a
        # reassignment in librdkafka; owning it again means consuming it again.
        try:
            self.consumer.resume(partitions)
        except KafkaException as error:
            log.info("partitions %s not resumed: %s", numbers, error)
        for partition, epoch in epochs.items():
            self.owned[partition] = Owned(epoch)
        self.metrics.assigned.set(len(self.owned))
        log.info("assigned partitions %s (epochs %s)", numbers, epochs)

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "revoke")

    def _on_lost(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "lost")

    def _release(self, partitions: list[TopicPartition], kind: str) -> None:
        numbers = [tp.partition for tp in partitions]
        for partition in numbers:
            self.owned.pop(partition, None)
        self.metrics.forget_partitions(numbers)
        self.metrics.rebalances.labels(kind=kind).inc()
        self.metrics.assigned.set(len(self.owned))
        log.info("%s partitions %s", "lost" if kind == "lost" else "released", numbers)
