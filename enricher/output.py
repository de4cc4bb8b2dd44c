"""The service's transactional producer, as a batch uses it.

Kafka's settings for the service's clients, and one wrapper over the producer that the commit
protocol (:mod:`enricher.checkpoint`) is handed: produce with a full queue waited out, records
Kafka refuses for good turned into bad input (so they are dead-lettered, never retried
forever), delivery failures noticed before the commit, and the transaction's calls.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from enricher.config import Settings
from enricher.deadletter import ProducerRecord
from enricher.errors import BadInput

log = logging.getLogger("enricher.output")

# Produce errors that retrying the same record cannot fix: the record is dead-lettered.
UNPRODUCIBLE = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError._INVALID_ARG,
    }
)
_ABORT_ATTEMPTS = 5
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
# librdkafka's own limit is on the whole produce request: leave room above the largest record.
_PRODUCE_REQUEST_MARGIN = 100_000


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
        "message.max.bytes": max(1_000_000, settings.max_message_bytes + _PRODUCE_REQUEST_MARGIN),
        # Only failed deliveries call back: the service learns which record failed, and why.
        "delivery.report.only.error": True,
        # The Java clients' partitioner, so a device lands on the same partition number in
        # the output topic as in the input topic written by a JVM collector.
        "partitioner": "murmur2_random",
        **settings.kafka,
    }


def leave_group(consumer: Any, timeout: float) -> None:
    """Unsubscribe, serve the revocations until nothing is assigned (at most ``timeout``
    seconds), then close. (Closing while the cooperative protocol is still handing partitions
    over can hang librdkafka's close, holding the GIL, so that not even the shutdown deadline
    can run: librdkafka issue 4527.)"""
    consumer.unsubscribe()
    deadline = time.monotonic() + timeout
    while consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(0.1)  # rebalance callbacks; a message here is not committed
    consumer.close()


class Refused(RuntimeError):
    """Kafka refused a record of the batch for good: the batch is aborted, and its replay
    dead-letters the input whose enriched record was refused."""


def produce_waiting(producer: Any, topic: str, **record: Any) -> None:
    """``producer.produce``, waiting while its queue is full."""
    while True:
        try:
            producer.produce(topic, **record)
            return
        except BufferError:
            producer.poll(0.1)


DeliveryCallback = Callable[[KafkaError | None, Any], None]


class Output:
    """Produces a batch's records inside its transaction and commits or aborts it.

    ``make_producer`` builds the transactional producer with the callback it is given as its
    default delivery callback, and ``delivery.report.only.error`` (see
    :func:`producer_config`)."""

    def __init__(self, make_producer: Callable[[DeliveryCallback], Producer], timeout: float):
        self.timeout = timeout
        self.refusals = 0
        """records Kafka refused at delivery, since the start"""
        self.unproducible: dict[tuple[int, int], str] = {}
        """input (partition, offset) -> why Kafka refused the record made from it"""
        self.producer = make_producer(self.on_delivery)

    def begin(self) -> int:
        """Begin a transaction; returns the refusal count to pass :meth:`await_deliveries`."""
        self.producer.begin_transaction()
        return self.refusals

    def send(
        self,
        topic: str,
        record: ProducerRecord,
        timestamp_ms: int,
        source: tuple[int, int] | None = None,
    ) -> None:
        """Produce one record; a record the producer refuses for good raises
        :class:`BadInput` (``not_producible``). With ``source`` (the input's partition and
        offset), a refusal at delivery makes :meth:`refused` name that input."""
        headers = record.headers or None  # an empty list costs the binding a conversion
        self.produce(topic, record.key, record.value, headers, timestamp_ms, source=source)

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
        """:meth:`send` without the record around the key, value and headers (a list, or
        None for none): the enriched record of every event goes this way."""
        on_delivery = None if source is None else functools.partial(self._undelivered_from, source)
        try:
            # produce_waiting's loop inline, and the arguments by position: this runs once per
            # event, and the binding parses keywords at about half the cost of the call itself
            # (1.1 us of 3.3). Its order is topic, value, key, partition (-1: the partitioner),
            # callback, on_delivery (an alias), timestamp, headers (test_producers.py).
            while True:
                try:
                    self.producer.produce(
                        topic, value, key, -1, on_delivery, None, timestamp_ms, headers
                    )
                    break
                except BufferError:
                    self.producer.poll(0.1)
        except KafkaException as error:
            if error.args[0].code() not in UNPRODUCIBLE:
                raise
            raise BadInput("not_producible", error.args[0].str()) from None

    def refused(self, partition: int, offset: int) -> str | None:
        """Why Kafka refused the record made from this input, if it did."""
        return self.unproducible.get((partition, offset))

    def forget(self, sources: Iterable[tuple[int, int]]) -> None:
        if not self.unproducible:  # the usual case: nothing to forget, nothing to walk
            return
        for source in sources:
            self.unproducible.pop(source, None)

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        self.unproducible = {k: v for k, v in self.unproducible.items() if k[0] not in gone}

    def on_delivery(self, error: KafkaError | None, message: Any) -> None:
        """A delivery report: only failures arrive (``delivery.report.only.error``)."""
        if error is not None and error.code() not in _PURGED:
            self.refusals += 1
            log.debug("not delivered to %s: %s", message.topic(), error)

    def _undelivered_from(
        self, source: tuple[int, int], error: KafkaError | None, message: Any
    ) -> None:
        self.on_delivery(error, message)
        if error is not None and error.code() in UNPRODUCIBLE:
            log.warning("partition %d offset %d: enriched record refused: %s", *source, error)
            self.unproducible[source] = error.str()

    def await_deliveries(self, refusals: int) -> None:
        """Wait until the producer has delivered the batch's records; raise :class:`Refused`
        as soon as Kafka refuses one, since that transaction can only abort. (Left to
        ``commit_transaction``, a refusal makes it wait out its whole timeout, and the abort
        that follows then conflicts with the commit still in progress.)"""
        deadline = time.monotonic() + self.timeout
        while self.producer.flush(0.05) > 0 and time.monotonic() < deadline:
            if self.refusals != refusals:
                break
        if self.refusals != refusals:
            raise Refused(f"Kafka refused {self.refusals - refusals} record(s) of the batch")

    def commit(self, topic: str, ends: Mapping[int, int], group_metadata: object) -> None:
        """Add the input offsets after ``ends`` (partition -> last offset) and commit."""
        offsets = [TopicPartition(topic, p, end + 1) for p, end in ends.items()]
        self.producer.send_offsets_to_transaction(offsets, group_metadata, self.timeout)
        self.producer.commit_transaction(self.timeout)

    def abort(self) -> None:
        """Abort the transaction. What the producer still holds is purged and the delivery
        reports are served first (the abort waits for them, and only a poll serves them), and
        an abort that times out is resumed, as librdkafka asks; a fatal
        error raises, any other is logged (the next transaction's begin reports a producer
        that cannot go on)."""
        self.producer.purge(in_queue=True, in_flight=False, blocking=True)
        self.producer.flush(self.timeout)
        for attempt in range(1, _ABORT_ATTEMPTS + 1):
            try:
                self.producer.abort_transaction(self.timeout)
                return
            except KafkaException as exception:
                error = exception.args[0]
                if error.fatal():
                    raise
                log.warning("abort failed (attempt %d): %s", attempt, error)
                if not error.retriable():
                    return
