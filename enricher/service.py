"""The streaming service: the consume loop around the commit protocol.

:class:`Service` consumes batches, hands each to a :class:`~enricher.checkpoint.Checkpoint`
(the exactly-once protocol, in one place), and on failure backs off and lets the consumer
deliver the rewound batch again. It also answers the consumer group's rebalances (fencing the
partitions it is assigned in Redis, and checking that Redis holds all their committed state),
rebuilds the state Redis lost from the input topic (:mod:`enricher.repair`) and runs the
state-TTL sweep between batches, and keeps the health the probes report.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
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
from enricher.output import Output, Refused, consumer_config, producer_config
from enricher.repair import Discard, Reader, Repair, plan
from enricher.store import Fenced, PartitionStore, StateLost
from enricher.sweeper import Sweeper

log = logging.getLogger("enricher.service")

DLQ_HEADER_PREFIX = HEADER_PREFIX
_BACKOFF_START = 0.2
_BACKOFF_MAX = 10.0
# How long one pass of the loop may spend on a repair before it serves the other partitions.
_REPAIR_SLICE_SECONDS = 0.5
# How long one pass of the loop waits for the committed offsets of newly assigned partitions
# (they wait while a transaction that commits offsets is pending).
_COMMITTED_WAIT_SECONDS = 1.0
_REPAIR_PROGRESS_SECONDS = 10.0


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
        self.repairs: dict[int, Repair] = {}
        """partitions whose state is being rebuilt, in the order found"""
        self.unchecked: dict[int, int | None] = {}
        """partitions assigned whose state was not compared with the committed offset yet:
        how complete Redis said their state was when they were taken"""
        self._dropped: dict[int, int] = {}
        """the first offset consumed of an unchecked partition (consumed, not enriched)"""
        self._paused: set[int] = set()
        self._repair_after = 0.0
        self._progress_logged_at = 0.0
        self._reader: Consumer | None = None
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
                self._check_assigned()
                self._repair()
        finally:
            self.close()
        if self.layout_error:
            raise LayoutChanged(self.layout_error)

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        """Leave the group: unsubscribe, serve the revocations until nothing is assigned, then
        close. (Closing while the cooperative protocol is still handing partitions over can
        hang librdkafka's close, holding the GIL, so that not even the shutdown deadline can
        run: librdkafka issue 4527.)"""
        log.info("leaving the consumer group")
        self.consumer.unsubscribe()
        deadline = time.monotonic() + self.settings.shutdown_timeout / 2
        while self.consumer.assignment() and time.monotonic() < deadline:
            self.consumer.poll(0.1)  # rebalance callbacks; a message here is not committed
        self.consumer.close()
        if self._reader is not None:
            self._reader.close()
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
        detail["repairing"] = sorted(self.repairs)
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
        owned, repairs, unchecked = self.owned, self.repairs, self.unchecked
        if repairs or unchecked:
            for m in messages:
                if m.partition in unchecked:
                    self._dropped.setdefault(m.partition, m.offset)
            messages = [m for m in messages if m.partition in owned and m.partition not in repairs]
            messages = [m for m in messages if m.partition not in unchecked]
        else:
            messages = [m for m in messages if m.partition in owned]
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
            self._lost(error)
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
            self._lost(error)
        except Unavailable as error:
            log.info("sweep postponed: %s", error)

    # -- state repair ----------------------------------------------------------------------

    def _lost(self, error: StateLost) -> None:
        """Redis lost state of owned partitions: take them again (Redis may have lost their
        epochs too) and repair what is behind."""
        log.error("%s; rebuilding it from the input topic", error)
        partitions = [p for p in error.partitions if p in self.owned]
        try:
            taken = self.redis_call(
                "fence", lambda: self.store.fence(partitions, int(time.time() * 1000))
            )
        except Unavailable as unavailable:
            log.warning("cannot take partitions %s again yet: %s", partitions, unavailable)
            return
        for partition, ownership in taken.items():
            owned = self.owned[partition]
            owned.epoch, owned.cache = ownership.epoch, {}
            self._drop_repair(partition)
            try:
                self._plan_repair(partition, ownership.complete, owned.committed)
            except KafkaException as kafka:  # the next write finds the loss again
                log.warning("repair of partition %d not planned yet: %s", partition, kafka)

    def _plan_repair(self, partition: int, complete: int | None, committed: int) -> None:
        """Start a repair of the partition if its state is behind its committed offset."""
        if committed < 0 or (complete is not None and complete >= committed):
            return
        tp = TopicPartition(self.settings.input_topic, partition)
        earliest, _ = self.consumer.get_watermark_offsets(tp, self.kafka_timeout)
        needed = plan(partition, complete, committed, earliest)
        if needed is None:
            return
        found = "missing" if complete is None else "behind"
        log.error(
            "redis is behind kafka on partition %d: state complete up to %s, committed %d;"
            " replaying offsets %d to %d of the input before enriching it",
            partition,
            "nothing (no record: wiped)" if complete is None else complete,
            committed,
            needed.start,
            committed,
        )
        if needed.unreplayable:
            log.error(
                "partition %d: %d input offsets whose state was lost are no longer retained"
                " (from %d, earliest retained %d): devices with events there restart from older"
                " state",
                partition,
                needed.unreplayable,
                needed.start - needed.unreplayable,
                earliest,
            )
            self.metrics.state_repair_unreplayable.inc(needed.unreplayable)
        self.metrics.state_repairs.labels(found=found).inc()
        self.repairs[partition] = Repair(
            needed,
            self.owned[partition].epoch,
            topic=self.settings.input_topic,
            reader=self._repair_reader(),
            store=self.store,
            run=self._replay,
            chunk_size=self.settings.batch_size,
            replayed=self.metrics.state_repair_events.inc,
        )
        self.metrics.state_repairing.set(len(self.repairs))

    def _repair_reader(self) -> Consumer:
        if self._reader is None:
            config = consumer_config(self.settings)
            config["enable.partition.eof"] = True
            config.pop("statistics.interval.ms", None)
            self._reader = Consumer(config, logger=logging.getLogger("enricher.kafka"))
        return self._reader

    def _replay(self, messages: list[InputMessage], owned: OwnedPartition, reader: Reader) -> None:
        checkpoint = self._checkpoint(messages, {messages[0].partition: owned}, Discard(), reader)
        try:
            checkpoint.run()
        except BaseException:
            checkpoint.abort()
            raise

    def _repair(self) -> None:
        """Pause the partitions under repair, and replay the first repair for a while."""
        if not self.repairs or time.monotonic() < self._repair_after:
            return
        if not self._hold(list(self.repairs)):
            return
        repair = next(iter(self.repairs.values()))
        partition = repair.partition
        deadline = time.monotonic() + _REPAIR_SLICE_SECONDS
        try:
            while not repair.step():
                if time.monotonic() > deadline or self.stopping.is_set():
                    self._report_progress(repair)
                    return
        except Fenced as error:
            log.warning("repair fenced: %s", error)
            self._drop_repair(partition)
            self.owned.pop(partition, None)
            return
        except StateLost as error:
            self._lost(error)
            return
        except (Unavailable, KafkaException, redis.RedisError) as error:
            if isinstance(error, KafkaException) and error.args[0].fatal():
                raise
            log.warning("repair of partition %d postponed: %s", partition, error)
            self._repair_after = time.monotonic() + _BACKOFF_MAX / 2
            return
        self._repaired(repair)

    def _report_progress(self, repair: Repair) -> None:
        now = time.monotonic()
        if now < self._progress_logged_at + _REPAIR_PROGRESS_SECONDS:
            return
        self._progress_logged_at = now
        done, total = repair.progress
        log.info(
            "repairing partition %d: %d of %d offsets replayed (%d records)",
            repair.partition,
            done,
            total,
            repair.events,
        )

    def _repaired(self, repair: Repair) -> None:
        """Serve the repaired partition again, from its committed offset."""
        partition, end = repair.partition, repair.plan.end
        self._drop_repair(partition)
        owned = self.owned.get(partition)
        if owned is not None:
            owned.cache = {}
            self._serve_from(partition, end)
        log.warning(
            "partition %d repaired: replayed %d input records up to offset %d",
            partition,
            repair.events,
            end,
        )

    def _drop_repair(self, partition: int) -> None:
        repair = self.repairs.pop(partition, None)
        if repair is not None:
            repair.close()
        self.metrics.state_repairing.set(len(self.repairs))

    def _check_assigned(self) -> None:
        """Compare how complete the state of newly assigned partitions is with the group's
        committed offsets: repair what is behind, serve the others. They are paused meanwhile,
        and what was consumed of them is consumed again."""
        if not self.unchecked:
            return
        partitions = list(self.unchecked)
        if not self._hold(partitions):
            return
        try:
            committed = self._committed(partitions)
        except KafkaException as error:
            log.info("committed offsets of partitions %s not known yet: %s", partitions, error)
            return
        for partition in partitions:
            owned = self.owned.get(partition)
            if owned is not None:
                try:
                    self._plan_repair(partition, self.unchecked[partition], committed[partition])
                except KafkaException as error:
                    log.info("partition %d not checked yet: %s", partition, error)
                    continue
                owned.committed = committed[partition]
            del self.unchecked[partition]
            dropped = self._dropped.pop(partition, None)
            if owned is None or partition in self.repairs:
                continue
            if dropped is None:
                self._resume(partition)
            else:
                self._serve_from(partition, dropped)

    def _hold(self, partitions: list[int]) -> bool:
        """Pause the partitions not paused yet; False if the consumer cannot (yet)."""
        fresh = [p for p in partitions if p not in self._paused]
        if fresh:
            topic = self.settings.input_topic
            try:
                self.consumer.pause([TopicPartition(topic, p) for p in fresh])
            except KafkaException as error:
                log.info("partitions %s not paused yet: %s", fresh, error)
                return False
            self._paused.update(fresh)
        return True

    def _serve_from(self, partition: int, offset: int) -> None:
        """Consume a paused partition again, from ``offset``."""
        self.consumer.seek(TopicPartition(self.settings.input_topic, partition, offset))
        self._resume(partition)

    def _resume(self, partition: int) -> None:
        self.consumer.resume([TopicPartition(self.settings.input_topic, partition)])
        self._paused.discard(partition)

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
            self._drop_repair(partition)
            self.unchecked[partition] = ownership.complete
            self._dropped.pop(partition, None)
        self.metrics.assigned.set(len(self.owned))
        epochs = {p: o.epoch for p, o in taken.items()}
        log.info("assigned partitions %s (epochs %s)", numbers, epochs)

    def _committed(self, partitions: Iterable[int]) -> dict[int, int]:
        """The group's committed offset of each partition (-1: none)."""
        topic = self.settings.input_topic
        wanted = [TopicPartition(topic, p) for p in partitions]
        found = self.consumer.committed(wanted, timeout=_COMMITTED_WAIT_SECONDS)
        return {tp.partition: max(tp.offset, -1) for tp in found}

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "revoke")

    def _on_lost(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "lost")

    def _release(self, partitions: list[TopicPartition], kind: str) -> None:
        numbers = [tp.partition for tp in partitions]
        for partition in numbers:
            self.owned.pop(partition, None)
            self._drop_repair(partition)
            self.unchecked.pop(partition, None)
            self._dropped.pop(partition, None)
            self._paused.discard(partition)
        self.output.forget_partitions(numbers)
        self.metrics.forget_partitions(numbers)
        self.metrics.rebalances.labels(kind=kind).inc()
        self.metrics.assigned.set(len(self.owned))
        log.info("%s partitions %s", "lost" if kind == "lost" else "released", numbers)
