"""Rebuilding a partition's state from the input topic, after Redis lost some of it.

Every fenced write records, in the partition's meta hash, the input offset the state is
complete up to (the end of the batch written, in the same script). The committed offset of
the consumer group says how far the output went. When Redis holds less than was committed (a
restart from an older snapshot, ``appendfsync everysec`` losing its last second, a failover to
a lagging replica, a flush), the state is behind the output, and enriching from it would
split sessions. The input topic is the changelog: the engine is deterministic, so replaying
the input from where the state is complete up to the committed offset rebuilds exactly the
state the committed output was made from.

A :class:`Repair` replays one partition, a chunk at a time, through the same commit protocol as
a batch (:class:`~enricher.checkpoint.Checkpoint`), with an output that publishes nothing
(:class:`Discard`): the committed output already holds those events, their dead letters and
session events. Each chunk's write is fenced and checked like a batch's, so a zombie cannot
write over the new owner's rebuilt state, and a second loss during the repair is noticed.
Memory is bounded by one chunk.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from confluent_kafka import KafkaError, Message, TopicPartition

from enricher.collaborators import OwnedPartition
from enricher.deadletter import ProducerRecord
from enricher.intake import InputMessage
from enricher.store import PartitionWrite

log = logging.getLogger("enricher.repair")


class Plan(NamedTuple):
    """What to replay of a partition whose state is behind its committed offset."""

    partition: int
    complete: int | None
    """the offset the state in Redis is complete up to (None: no record of it: wiped)"""
    start: int
    """the first offset to replay"""
    end: int
    """the committed offset: the replay stops before it"""
    unreplayable: int
    """offsets between ``complete`` (0 when wiped) and ``start`` the input no longer retains"""


def plan(partition: int, complete: int | None, committed: int, earliest: int) -> Plan | None:
    """The repair a partition needs, or None when its state is complete up to its committed
    offset (``committed`` -1: the group has committed nothing, so nothing can be behind).
    Without a record of how complete the state is, the state is rebuilt from the earliest
    offset the input retains."""
    if committed < 0 or (complete is not None and complete >= committed):
        return None
    wanted = 0 if complete is None else complete
    start = min(max(wanted, earliest), committed)
    return Plan(partition, complete, start, committed, start - wanted)


class Discard:
    """The output of a repair: its records were committed when the events first went through,
    so nothing is published and there is nothing to commit."""

    def begin(self) -> int:
        return 0

    def send(
        self,
        topic: str,
        record: ProducerRecord,
        timestamp_ms: int,
        source: tuple[int, int] | None = None,
    ) -> None:
        return

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Any,
        timestamp_ms: int,
        *,
        source: tuple[int, int] | None = None,
    ) -> None:
        return

    def await_deliveries(self, refusals: int) -> None:
        return

    def commit(self, topic: str, ends: Mapping[int, int], group_metadata: object) -> None:
        return

    def forget(self, sources: Iterable[tuple[int, int]]) -> None:
        return

    def abort(self) -> None:
        return


class RepairStore(Protocol):
    """What a repair uses of :class:`~enricher.store.PartitionStore` besides the checkpoint."""

    def wipe(self, partition: int, epoch: int) -> None: ...

    def save(self, writes: Mapping[int, PartitionWrite]) -> None: ...


class Reader(Protocol):
    """What a repair uses of a ``confluent_kafka.Consumer`` (assigned, not subscribed, with
    ``enable.partition.eof``)."""

    def assign(self, partitions: list[TopicPartition]) -> None: ...

    def unassign(self) -> None: ...

    def consume(self, num_messages: int, timeout: float) -> list[Message]: ...

    def consumer_group_metadata(self) -> object: ...

    def seek(self, partition: TopicPartition) -> None: ...


Run = Callable[[list[InputMessage], OwnedPartition, Reader], None]
"""Runs one chunk through the commit protocol: the checkpoint's steps to its commit, or its
abort (which rewinds the reader) and the error raised again."""


class Status(enum.Enum):
    PENDING = "pending"
    REPLAYING = "replaying"
    DONE = "done"


class Repair:
    """One partition's repair: :meth:`step` replays a chunk at a time until the committed
    offset, then records the state complete up to it. A step that raises (Redis away, fenced,
    state lost again) can be called again: the chunk was aborted and its replay rewound, or
    the owner builds a new repair."""

    def __init__(
        self,
        plan: Plan,
        epoch: int,
        *,
        topic: str,
        reader: Reader,
        store: RepairStore,
        run: Run,
        chunk_size: int,
        replayed: Callable[[int], None],
    ) -> None:
        self.plan = plan
        self.topic = topic
        self.reader = reader
        self.store = store
        self.run = run
        self.chunk_size = chunk_size
        self.replayed = replayed
        """told how many input records each chunk replayed"""
        complete = -1 if plan.complete is None else plan.complete
        self.owned = OwnedPartition(epoch, committed=complete)
        """the partition as the chunks see it: ``committed`` is how complete the state is"""
        self.status = Status.PENDING
        self.events = 0

    @property
    def partition(self) -> int:
        return self.plan.partition

    @property
    def progress(self) -> tuple[int, int]:
        """(offsets replayed, offsets to replay)."""
        plan = self.plan
        done = max(0, self.owned.committed - plan.start) if self.status is not Status.PENDING else 0
        return min(done, plan.end - plan.start), plan.end - plan.start

    def step(self) -> bool:
        """Replay the next chunk; returns whether the repair is done."""
        if self.status is Status.PENDING:
            self._begin()
        if self.status is not Status.REPLAYING:
            return True
        end = self.plan.end
        messages, reached_end = [], False
        for message in self.reader.consume(self.chunk_size, 1.0):
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("replaying partition %d: %s", self.partition, error.str())
                    continue
                reached_end = True
                break
            item = InputMessage.of(message)
            if item.offset >= end:
                reached_end = True
                break
            messages.append(item)
            if item.offset == end - 1:
                reached_end = True
                break
        if messages:
            self.run(messages, self.owned, self.reader)
            self.owned.cache.clear()
            self.events += len(messages)
            self.replayed(len(messages))
        if reached_end:
            self._finish()
        return reached_end

    def _begin(self) -> None:
        plan = self.plan
        if plan.complete is None:
            self.store.wipe(self.partition, self.owned.epoch)
        if plan.start >= plan.end:
            self._finish()
            return
        self.reader.assign([TopicPartition(self.topic, self.partition, plan.start)])
        self.status = Status.REPLAYING

    def _finish(self) -> None:
        """Record the state complete up to the committed offset: the offsets after the last
        replayed record hold no data (transaction markers, or nothing to replay)."""
        if self.owned.committed < self.plan.end:
            write = PartitionWrite(self.owned.epoch, {}, (self.owned.committed, self.plan.end))
            self.store.save({self.partition: write})
            self.owned.committed = self.plan.end
        self.close()
        self.status = Status.DONE

    def close(self) -> None:
        if self.status is Status.REPLAYING:
            self.reader.unassign()
