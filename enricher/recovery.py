"""What a partition goes through before the service enriches it: its state in Redis compared
with the consumer group's committed offset, and repaired from the input topic when Redis lost
some of it (:mod:`enricher.repair`).

A partition is held (paused, its consumed messages set aside) from its assignment until the
comparison is made, outside the rebalance callback (the committed offsets are not answered
while a transaction that commits offsets is pending), and, when its state is behind, until its
repair reaches the committed offset. A write that finds Redis behind while the partition is
served (:class:`~enricher.store.StateLost`) sends it back here. The service's loop calls
:meth:`Recovery.step` between batches: each call checks what was assigned and gives the first
repair half a second, so the other partitions go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaException, TopicPartition

from enricher.checkpoint import Checkpoint
from enricher.collaborators import Consumer as CheckpointConsumer
from enricher.collaborators import OwnedPartition, Publisher, RedisCall
from enricher.config import Settings
from enricher.errors import Unavailable
from enricher.intake import InputMessage
from enricher.metrics import Metrics
from enricher.output import consumer_config
from enricher.repair import Discard, Reader, Repair, plan
from enricher.store import Fenced, PartitionStore, StateLost

log = logging.getLogger("enricher.recovery")

# How long one step may spend on a repair before the loop serves the other partitions.
_REPAIR_SLICE_SECONDS = 0.5
# How long one step waits for the committed offsets of newly assigned partitions.
_COMMITTED_WAIT_SECONDS = 1.0
_PROGRESS_LOG_SECONDS = 10.0
_RETRY_SECONDS = 5.0

NewCheckpoint = Callable[
    [list[InputMessage], dict[int, OwnedPartition], Publisher, CheckpointConsumer], Checkpoint
]


class Recovery:
    """The partitions held between their assignment and being served (see the module)."""

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        store: PartitionStore,
        owned: MutableMapping[int, OwnedPartition],
        metrics: Metrics,
        *,
        redis_call: RedisCall[Any],
        new_checkpoint: NewCheckpoint,
        stopping: threading.Event,
        kafka_timeout: float,
    ) -> None:
        self.settings = settings
        self.topic = settings.input_topic
        self.consumer = consumer
        self.store = store
        self.owned = owned
        self.metrics = metrics
        self.redis = redis_call
        self.new_checkpoint = new_checkpoint
        self.stopping = stopping
        self.kafka_timeout = kafka_timeout
        self.repairs: dict[int, Repair] = {}
        """partitions whose state is being rebuilt, in the order found"""
        self.unchecked: dict[int, int | None] = {}
        """partitions assigned whose state was not compared with the committed offset yet:
        how complete Redis said their state was when they were taken"""
        self._dropped: dict[int, int] = {}
        """the first offset consumed of an unchecked partition (consumed, not enriched)"""
        self._paused: set[int] = set()
        self._retry_at = 0.0
        self._progress_logged_at = 0.0
        self._reader: Consumer | None = None

    @property
    def busy(self) -> bool:
        """Whether any partition is held."""
        return bool(self.repairs or self.unchecked)

    @property
    def repairing(self) -> list[int]:
        return sorted(self.repairs)

    def admit(self, messages: list[InputMessage]) -> list[InputMessage]:
        """The messages of partitions that are served; those of an unchecked partition are
        set aside, to be consumed again from the first of them."""
        unchecked, repairs = self.unchecked, self.repairs
        for m in messages:
            if m.partition in unchecked:
                self._dropped.setdefault(m.partition, m.offset)
        return [m for m in messages if m.partition not in unchecked and m.partition not in repairs]

    def assigned(self, partition: int, complete: int | None) -> None:
        """A partition just taken, its state complete up to ``complete`` (None: no record)."""
        self._drop_repair(partition)
        self.unchecked[partition] = complete
        self._dropped.pop(partition, None)

    def released(self, partition: int) -> None:
        self._drop_repair(partition)
        self.unchecked.pop(partition, None)
        self._dropped.pop(partition, None)
        self._paused.discard(partition)

    def lost(self, error: StateLost) -> None:
        """Redis lost state of owned partitions: take them again (Redis may have lost their
        epochs too) and repair what is behind."""
        log.error("%s; rebuilding it from the input topic", error)
        partitions = [p for p in error.partitions if p in self.owned]
        try:
            taken = self.redis(
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
                self._plan(partition, ownership.complete, owned.committed)
            except KafkaException as kafka:  # the next write finds the loss again
                log.warning("repair of partition %d not planned yet: %s", partition, kafka)

    def step(self) -> None:
        """Check the partitions assigned since, then replay the first repair for a while."""
        self._check_assigned()
        self._repair()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    # -- checking --------------------------------------------------------------------------

    def _check_assigned(self) -> None:
        """Compare how complete the state of newly assigned partitions is with the group's
        committed offsets: repair what is behind, serve the others from where they were
        consumed."""
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
                    self._plan(partition, self.unchecked[partition], committed[partition])
                except KafkaException as error:
                    log.info("partition %d not checked yet: %s", partition, error)
                    continue
                owned.committed = committed[partition]
            del self.unchecked[partition]
            dropped = self._dropped.pop(partition, None)
            if owned is None or partition in self.repairs:
                continue
            self._serve_checked(partition, committed[partition], dropped)

    def _serve_checked(self, partition: int, committed: int, consumed: int | None) -> None:
        """Serve a checked partition: from where it is if nothing of it was consumed since its
        assignment, else from the group's committed offset (read once no transaction that
        commits offsets is pending), whatever offset consumption began at: below it would
        enrich committed input twice, above it would skip input. With no committed offset,
        from where consumption began."""
        if consumed is None:
            self._resume(partition)
            return
        if committed < 0:
            self._serve_from(partition, consumed)
            return
        if consumed != committed:
            log.warning(
                "partition %d: consumed from offset %d since it was assigned, but the group"
                " committed up to %d; serving it from %d",
                partition,
                consumed,
                committed,
                committed,
            )
        self._serve_from(partition, committed)

    def _committed(self, partitions: Iterable[int]) -> dict[int, int]:
        """The group's committed offset of each partition (-1: none)."""
        wanted = [TopicPartition(self.topic, p) for p in partitions]
        found = self.consumer.committed(wanted, timeout=_COMMITTED_WAIT_SECONDS)
        return {tp.partition: max(tp.offset, -1) for tp in found}

    def _plan(self, partition: int, complete: int | None, committed: int) -> None:
        """Start a repair of the partition if its state is behind its committed offset."""
        if committed < 0 or (complete is not None and complete >= committed):
            return
        tp = TopicPartition(self.topic, partition)
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
            topic=self.topic,
            reader=self._repair_reader(),
            store=self.store,
            run=self._replay,
            chunk_size=self.settings.batch_size,
            replayed=self.metrics.state_repair_events.inc,
        )
        self.metrics.state_repairing.set(len(self.repairs))

    # -- repairing -------------------------------------------------------------------------

    def _repair_reader(self) -> Consumer:
        if self._reader is None:
            config = consumer_config(self.settings)
            config["enable.partition.eof"] = True
            config.pop("statistics.interval.ms", None)
            self._reader = Consumer(config, logger=logging.getLogger("enricher.kafka"))
        return self._reader

    def _replay(self, messages: list[InputMessage], owned: OwnedPartition, reader: Reader) -> None:
        checkpoint = self.new_checkpoint(
            messages, {messages[0].partition: owned}, Discard(), reader
        )
        try:
            checkpoint.run()
        except BaseException:
            checkpoint.abort()
            raise

    def _repair(self) -> None:
        """Hold the partitions under repair, and replay the first repair for a while."""
        if not self.repairs or time.monotonic() < self._retry_at:
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
            self.lost(error)
            return
        except (Unavailable, KafkaException, redis.RedisError) as error:
            if isinstance(error, KafkaException) and error.args[0].fatal():
                raise
            log.warning("repair of partition %d postponed: %s", partition, error)
            self._retry_at = time.monotonic() + _RETRY_SECONDS
            return
        self._repaired(repair)

    def _report_progress(self, repair: Repair) -> None:
        now = time.monotonic()
        if now < self._progress_logged_at + _PROGRESS_LOG_SECONDS:
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

    # -- holding ---------------------------------------------------------------------------

    def _hold(self, partitions: list[int]) -> bool:
        """Pause the partitions not paused yet; False if the consumer cannot (yet)."""
        fresh = [p for p in partitions if p not in self._paused]
        if fresh:
            try:
                self.consumer.pause([TopicPartition(self.topic, p) for p in fresh])
            except KafkaException as error:
                log.info("partitions %s not paused yet: %s", fresh, error)
                return False
            self._paused.update(fresh)
        return True

    def _serve_from(self, partition: int, offset: int) -> None:
        """Consume a paused partition again, from ``offset``."""
        self.consumer.seek(TopicPartition(self.topic, partition, offset))
        self._resume(partition)

    def _resume(self, partition: int) -> None:
        self.consumer.resume([TopicPartition(self.topic, partition)])
        self._paused.discard(partition)
