"""The streaming service: the consume loop around the commit protocol.

:class:`Service` consumes batches, hands each to a :class:`~enricher.checkpoint.Checkpoint`
(the exactly-once protocol, in one place), and on failure backs off and lets the consumer
deliver the rewound batch again. It also answers the consumer group's rebalances (fencing the
partitions it is assigned in Redis, and checking that Redis holds all their committed state),
holds a partition until its state is known to be complete, repairing what Redis lost
(:mod:`enricher.recovery`), runs the state-TTL sweep between batches, and keeps the health the
probes report.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from enricher import session_ends
from enricher.checkpoint import Checkpoint
from enricher.codecs.factory import Codecs
from enricher.collaborators import Consumer as CheckpointConsumer
from enricher.collaborators import Outcome, OwnedPartition, Publisher, Topics
from enricher.config import Settings
from enricher.deadletter import HEADER_PREFIX
from enricher.enrich import Enricher
from enricher.errors import Unavailable
from enricher.intake import InputMessage, MessageDecoder
from enricher.metrics import Metrics
from enricher.output import Output, Refused, consumer_config, leave_group, producer_config
from enricher.recovery import Recovery
from enricher.store import Fenced, PartitionStore, StateLost
from enricher.sweeper import Sweeper

log = logging.getLogger("enricher.service")

DLQ_HEADER_PREFIX = HEADER_PREFIX
_BACKOFF_START = 0.2
_BACKOFF_MAX = 10.0


class LayoutChanged(RuntimeError):
    """The input topic's partition count is not the one the state in Redis is placed by."""


def layout_message(topic: str, partitions: int, stored: int) -> str:
    return (
        f"the input topic {topic} has {partitions} partitions, but the device state in Redis is"
        f" placed by {stored}: stop every instance, run `enricher state migrate --partitions"
        f" {partitions}` with the same settings, then start them again"
    )


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
        self.metrics = metrics
        self.kafka_timeout = max(10.0, settings.transaction_timeout_ms / 1000)
        self.owned: dict[int, OwnedPartition] = {}
        self.stopping = threading.Event()
        self.healthy = {"kafka": False, "redis": False}
        self.on_progress: Callable[[], None] = lambda: None
        self._delay = _BACKOFF_START
        self.aborted_batch: dict[int, int] = {}
        """the first offsets of the last batch aborted, while no batch has committed since"""
        self.aborts_in_a_row = 0
        self.partition_count = 0
        """the input's partition count the state is placed by (:meth:`check_layout`)"""
        self.layout_error = ""
        self.topics = Topics(
            settings.input_topic,
            settings.output_topic,
            settings.dlq_topic,
            settings.session_events_topic,
        )
        self.new_session_ends = session_ends.for_settings(
            settings.session_events_topic, round(settings.session_events_lateness * 1000)
        )
        metrics.consumer_info.labels(group=settings.group_id, topic=settings.input_topic).set(1)
        consumer_settings = consumer_config(settings)
        consumer_settings["stats_cb"] = self._observe_stats
        consumer_settings["error_cb"] = self._kafka_error
        self.consumer = Consumer(consumer_settings, logger=logging.getLogger("enricher.kafka"))
        self.output = Output(
            lambda on_delivery: Producer(
                {
                    **producer_config(settings),
                    "error_cb": self._kafka_error,
                    "on_delivery": on_delivery,
                },
                logger=logging.getLogger("enricher.kafka"),
            ),
            self.kafka_timeout,
        )
        self.producer = self.output.producer
        self.decode = MessageDecoder(
            codecs.decode,
            settings.max_message_bytes,
            round(settings.max_event_ahead * 1000),
            self.output.refused,
        )
        self.recovery = Recovery(
            settings,
            self.consumer,
            store,
            self.owned,
            metrics,
            redis_call=self.redis_call,
            new_checkpoint=self._checkpoint,
            stopping=self.stopping,
            kafka_timeout=self.kafka_timeout,
        )
        self.sweeper = Sweeper(
            store,
            self.owned,
            ttl_days=settings.state_ttl_days,
            interval=settings.state_sweep_interval,
            redis=self.redis_call,
            expired=metrics.expired.inc,
        )

    # -- running ---------------------------------------------------------------------------

    def check_layout(self) -> None:
        """Raise :class:`LayoutChanged` unless the input has the partition count the state in
        Redis is placed by (recorded by the first instance that ever ran)."""
        partitions = self.input_partitions()
        stored = self.redis_call("layout", self.store.partition_count)
        if stored is None:
            self.redis_call("layout", lambda: self.store.record_partition_count(partitions))
        elif stored != partitions:
            raise LayoutChanged(layout_message(self.settings.input_topic, partitions, stored))
        self.partition_count = partitions

    def run(self) -> None:
        """Serve until :meth:`stop`; then leave the group cleanly. Raises
        :class:`LayoutChanged` when the input topic gains partitions meanwhile."""
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
                of = InputMessage.of
                batch = [of(m) for m in messages if m.error() is None or self._usable(m)]
                if batch:
                    self._set_health("kafka", True)
                    self.process(batch)
                self._sweep()
                self.recovery.step()
        finally:
            self.close()
        if self.layout_error:
            raise LayoutChanged(self.layout_error)

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        """Leave the group (:func:`~enricher.output.leave_group`), then flush."""
        log.info("leaving the consumer group")
        leave_group(self.consumer, self.settings.shutdown_timeout / 2)
        self.recovery.close()
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
        detail: dict[str, Any] = {"partitions": sorted(self.owned)}
        detail["repairing"] = self.recovery.repairing
        detail.update(self.healthy)
        return bool(self.owned) and all(self.healthy.values()), detail

    def live(self) -> tuple[bool, dict[str, Any]]:
        """Not live once the same batch has been aborted ``max_batch_aborts`` times in a row:
        replaying it is not making progress, and a restart is the next thing to try."""
        ok = self.aborts_in_a_row < self.settings.max_batch_aborts
        return ok, {"batch_aborts_in_a_row": self.aborts_in_a_row}

    # -- one batch -------------------------------------------------------------------------

    def process(self, messages: list[InputMessage]) -> None:
        """Commit one batch, or abort it, rewind, and back off before the next attempt.

        A failed batch is not retried in place: the main loop consumes it again from the
        rewound offsets, so rebalance callbacks keep running while Kafka or Redis is away.
        """
        owned = self.owned
        messages = [m for m in messages if m.partition in owned]
        if self.recovery.busy:
            messages = self.recovery.admit(messages)
        if not messages:
            return
        started = time.monotonic()
        checkpoint = self._checkpoint(messages, self.owned, self.output, self.consumer)
        try:
            outcome = checkpoint.run()
        except Fenced as error:
            log.warning("fenced: another instance owns these partitions now: %s", error)
            self._abort(checkpoint)
            for partition in error.partitions:
                self.owned.pop(partition, None)
            self.consumer.pause(
                [TopicPartition(self.settings.input_topic, p) for p in error.partitions]
            )
            return
        except StateLost as error:
            self._abort(checkpoint)
            self.recovery.lost(error)
            return
        except (Unavailable, Refused, KafkaException, redis.RedisError) as error:
            self._abort(checkpoint)
            if isinstance(error, KafkaException) and error.args[0].fatal():
                raise
            log.warning("batch aborted, retrying in %.1fs: %s", self._delay, error)
            self.stopping.wait(self._delay)
            self._delay = min(self._delay * 2, _BACKOFF_MAX)
            return
        self._delay = _BACKOFF_START
        self.aborted_batch, self.aborts_in_a_row = {}, 0
        self._set_health("kafka", True)
        self.count(outcome)
        self.metrics.transactions.labels(outcome="committed").inc()
        self.metrics.batch_size.observe(len(messages))
        self.metrics.batch_duration.observe(time.monotonic() - started)

    def _checkpoint(
        self,
        messages: list[InputMessage],
        owned: dict[int, OwnedPartition],
        output: Publisher,
        consumer: CheckpointConsumer,
    ) -> Checkpoint:
        return Checkpoint(
            messages,
            output=output,
            consumer=consumer,
            store=self.store,
            decode=self.decode,
            enricher=self.enricher,
            encode=self.codecs.encode,
            encode_session=self.codecs.encode_session,
            owned=owned,
            session_ends=self.new_session_ends(),
            topics=self.topics,
            max_message_bytes=self.settings.max_message_bytes,
            redis=self.redis_call,
        )

    def _sweep(self) -> None:
        try:
            self.sweeper.step()
        except Fenced as error:
            log.warning("sweep fenced: %s", error)
            for partition in error.partitions:
                self.owned.pop(partition, None)
        except StateLost as error:
            self.recovery.lost(error)
        except Unavailable as error:
            log.info("sweep postponed: %s", error)

    def _abort(self, checkpoint: Checkpoint) -> None:
        """Abort the batch, counting how often the same batch failed in a row."""
        if checkpoint.starts == self.aborted_batch:
            self.aborts_in_a_row += 1
        else:
            self.aborted_batch, self.aborts_in_a_row = checkpoint.starts, 1
        if checkpoint.abort():
            self.metrics.transactions.labels(outcome="aborted").inc()

    def count(self, outcome: Outcome) -> None:
        """The metrics of a committed batch."""
        m = self.metrics
        m.cache.labels(result="hit").inc(outcome.cache_hits)
        m.cache.labels(result="miss").inc(outcome.cache_misses)
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
        # Every event's latencies, observed a batch at a time.
        now_ms = time.time() * 1000
        m.latency.observe_ages("device", now_ms, outcome.device_times_ms)
        m.latency.observe_ages("kafka", now_ms, outcome.kafka_times_ms)

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
        if numbers and self.partition_count and max(numbers) >= self.partition_count:
            self.layout_error = layout_message(
                self.settings.input_topic, self.input_partitions(), self.partition_count
            )
            log.error("%s", self.layout_error)
            self.stop()
            return
        delay = _BACKOFF_START
        while True:
            try:
                taken = self.redis_call(
                    "fence", lambda: self.store.fence(numbers, int(time.time() * 1000))
                )
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
        for partition, ownership in taken.items():
            self.owned[partition] = OwnedPartition(ownership.epoch)
            self.recovery.assigned(partition, ownership.complete)
        self.metrics.assigned.set(len(self.owned))
        epochs = {p: o.epoch for p, o in taken.items()}
        log.info("assigned partitions %s (epochs %s)", numbers, epochs)

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "revoke")

    def _on_lost(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "lost")

    def _release(self, partitions: list[TopicPartition], kind: str) -> None:
        numbers = [tp.partition for tp in partitions]
        for partition in numbers:
            self.owned.pop(partition, None)
            self.recovery.released(partition)
        self.output.forget_partitions(numbers)
        self.metrics.forget_partitions(numbers)
        self.metrics.rebalances.labels(kind=kind).inc()
        self.metrics.assigned.set(len(self.owned))
        log.info("%s partitions %s", "lost" if kind == "lost" else "released", numbers)
