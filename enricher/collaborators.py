"""What a :class:`~enricher.checkpoint.Checkpoint` is handed besides the batch, and what it
hands back: the owned partitions, the topics, the output, store and consumer it may use (as
protocols, so that tests and the state repair hand it others), the call that runs a Redis
operation, and the outcome of a committed batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from confluent_kafka import TopicPartition

from enricher.deadletter import ProducerRecord
from enricher.records import RecordCodec
from enricher.session import SessionState
from enricher.store import Loaded, PartitionWrite

T = TypeVar("T")


@dataclass(slots=True)
class OwnedPartition:
    """A partition this instance owns: its fencing epoch, the offset committed last (-1: none;
    the state in Redis must be complete up to it), its warm state cache, its state-TTL sweep
    cursor."""

    epoch: int
    committed: int = -1
    cache: dict[str, SessionState] = field(default_factory=dict)
    sweep_cursor: int | None = None


class Topics(NamedTuple):
    input: str
    output: str
    dead_letters: str
    session_events: str


class Publisher(Protocol):
    """What a checkpoint uses of :class:`~enricher.output.Output`: a transaction's records
    and its commit."""

    def begin(self) -> int: ...

    def send(
        self,
        topic: str,
        record: ProducerRecord,
        timestamp_ms: int,
        source: tuple[int, int] | None = None,
    ) -> None: ...

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Any,
        timestamp_ms: int,
        *,
        source: tuple[int, int] | None = None,
    ) -> None: ...

    def await_deliveries(self, refusals: int) -> None: ...

    def commit(self, topic: str, ends: Mapping[int, int], group_metadata: object) -> None: ...

    def forget(self, sources: Iterable[tuple[int, int]]) -> None: ...

    def abort(self) -> None: ...


class Store(Protocol):
    """What a checkpoint uses of :class:`~enricher.store.PartitionStore`."""

    codec: RecordCodec

    def load(
        self,
        wanted: Mapping[int, tuple[int, Any]],
        renews_of: Mapping[int, Any] | None = None,
        clocks: Mapping[int, Any] | None = None,
    ) -> Loaded: ...

    def save(self, writes: Mapping[int, PartitionWrite]) -> None: ...


class Consumer(Protocol):
    """What a checkpoint uses of ``confluent_kafka.Consumer``."""

    def consumer_group_metadata(self) -> object: ...

    def seek(self, partition: TopicPartition) -> None: ...


RedisCall = Callable[[str, Callable[[], T]], T]
"""Runs one Redis operation by name (the service counts and times it, and raises
:class:`~enricher.errors.Unavailable` when Redis fails)"""


def direct(_operation: str, call: Callable[[], T]) -> T:
    return call()


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
    cache_hits: int = 0
    cache_misses: int = 0
