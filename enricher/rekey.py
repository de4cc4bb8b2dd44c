"""The re-keying hop: when the device is not the input record's key, every event is first
moved to a partition that owns its device, the way Kafka Streams repartitions.

:class:`Router` turns one input record into what it becomes: records keyed by device for the
internal topic ``<group id>-by-device`` (created with the input's partition count, and
consumed by the enrichment as its input), records passed to the output as they are (collector
requests that carry no events), and dead letters. A collector record is split into one record
per event there, so one bad event is dead-lettered alone and its siblings go on.

:class:`Rekeyer` is the hop's loop, exactly once like the enrichment: each consumed batch is
routed inside one Kafka transaction that also commits the batch's input offsets; any failure
aborts the transaction, rewinds the batch and retries after a backoff. It keeps no state, so a
rebalance needs no fencing beyond the transaction's own (KIP-447: a member of an older group
generation cannot commit).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, NamedTuple

from confluent_kafka import Consumer, KafkaException, TopicPartition

from enricher.codecs import collector, tracker
from enricher.codecs.factory import Decoder
from enricher.deadletter import ProducerRecord, dead_letter, record_size
from enricher.devices import DeviceId
from enricher.errors import BadInput
from enricher.intake import InputMessage
from enricher.metrics import Metrics
from enricher.output import Output, Refused, leave_group

log = logging.getLogger("enricher.rekey")

_BACKOFF_START = 0.2
_BACKOFF_MAX = 10.0


def by_device_topic(group_id: str) -> str:
    """The internal topic of the re-keying hop."""
    return f"{group_id}-by-device"


class Routed(NamedTuple):
    """Where one record (or one event of it) goes: ``device`` (keyed by device, to be
    enriched), ``output`` (as it is), or ``dead_letters`` (with ``error``)."""

    to: str
    record: ProducerRecord
    error: BadInput | None = None


class Router:
    """One input record to the records it becomes (see the module's docstring)."""

    def __init__(
        self, decode: Decoder, device_id: DeviceId, *, splits: bool, max_message_bytes: int
    ) -> None:
        self.decode = decode
        self.device_id = device_id
        self.splits = splits
        """collector records: one record per event"""
        self.max_message_bytes = max_message_bytes

    def __call__(self, message: InputMessage) -> list[Routed]:
        headers = list(message.headers or [])
        original = ProducerRecord(message.key, message.value, headers)
        try:
            if message.value is None:
                raise BadInput("not_json", "the record has no value")
            size = record_size(message.key, message.value, headers)
            if size > self.max_message_bytes:
                raise BadInput("oversize", f"{size} bytes > {self.max_message_bytes}")
            if self.splits:
                return self._split(message.key, message.value, headers)
            device = self.device_id(message.key, self.decode(message.value))
        except BadInput as error:
            return [Routed("dead_letters", original, error)]
        return [Routed("device", ProducerRecord(device.encode(), message.value, headers))]

    def _split(self, key: bytes | None, value: bytes, headers: list[Any]) -> list[Routed]:
        payload = collector.decode(value)
        events = collector.events(payload)
        if events is None:  # not a tracker request: passed through
            return [Routed("output", ProducerRecord(key, value, headers))]
        known = {"nuid": payload.network_user_id} if payload.network_user_id else None
        routed = []
        for fields in events:
            one = collector.encode(collector.with_events(payload, [fields]))
            try:
                device = self.device_id(key, tracker.from_fields(fields), known)
            except BadInput as error:
                routed.append(Routed("dead_letters", ProducerRecord(key, one, headers), error))
                continue
            routed.append(Routed("device", ProducerRecord(device.encode(), one, headers)))
        return routed


class Rekeyer:
    """The hop's consume loop (see the module's docstring)."""

    def __init__(
        self,
        consumer: Consumer,
        output: Output,
        route: Router,
        *,
        input_topic: str,
        topics: dict[str, str],
        batch_size: int,
        batch_timeout: float,
        max_message_bytes: int,
        metrics: Metrics,
        stopping: threading.Event,
    ) -> None:
        self.consumer = consumer
        self.output = output
        self.route = route
        self.input_topic = input_topic
        self.topics = topics
        """``device``, ``output`` and ``dead_letters`` -> topic name"""
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.stopping = stopping
        self._delay = _BACKOFF_START

    def run(self) -> None:
        """Route batches until ``stopping`` is set; then leave the group."""
        self.output.producer.init_transactions(self.output.timeout)
        self.consumer.subscribe([self.input_topic])
        try:
            while not self.stopping.is_set():
                consumed = self.consumer.consume(self.batch_size, self.batch_timeout)
                batch = []
                for message in consumed:
                    error = message.error()
                    if error is None:
                        batch.append(InputMessage.of(message))
                    elif error.fatal():
                        raise KafkaException(error)
                    else:
                        log.warning("consume: %s", error.str())
                if batch:
                    self.process(batch)
        finally:
            leave_group(self.consumer, self.output.timeout / 2)
            self.output.producer.flush(self.output.timeout)

    def process(self, batch: list[InputMessage]) -> None:
        """Route one batch in one transaction with its input offsets, or abort and rewind."""
        starts: dict[int, int] = {}
        ends: dict[int, int] = {}
        for message in batch:
            starts.setdefault(message.partition, message.offset)
            ends[message.partition] = message.offset
        began = False
        try:
            refusals = self.output.begin()
            began = True
            moved, reasons = self._produce(batch)
            self.output.await_deliveries(refusals)
            self.output.commit(self.input_topic, ends, self.consumer.consumer_group_metadata())
        except (KafkaException, Refused) as error:
            if isinstance(error, KafkaException) and error.args[0].fatal():
                raise
            log.warning("re-keying batch aborted, retrying in %.1fs: %s", self._delay, error)
            if began:
                self.output.abort()
            for partition, offset in starts.items():
                try:
                    self.consumer.seek(TopicPartition(self.input_topic, partition, offset))
                except KafkaException as seek_error:
                    log.info("partition %d not rewound: %s", partition, seek_error)
            self.stopping.wait(self._delay)
            self._delay = min(self._delay * 2, _BACKOFF_MAX)
            return
        self._delay = _BACKOFF_START
        self.metrics.rekey_consumed.inc(len(batch))
        self.metrics.rekeyed.inc(moved)
        for reason, count in reasons.items():
            self.metrics.dead_lettered.labels(reason=reason).inc(count)

    def _produce(self, batch: list[InputMessage]) -> tuple[int, dict[str, int]]:
        """Produce where each record goes; a record Kafka refuses for good (now, or at
        delivery in an earlier attempt of the batch) is dead-lettered instead."""
        moved, reasons = 0, dict[str, int]()
        for message in batch:
            position = (message.partition, message.offset)
            source = (message.topic, *position)
            refused = self.output.refused(*position)
            if refused is None:
                routes = self.route(message)
            else:
                original = ProducerRecord(message.key, message.value, message.headers or [])
                why = BadInput("not_producible", f"Kafka refused its record: {refused}")
                routes = [Routed("dead_letters", original, why)]
            for routed in routes:
                error = routed.error
                if error is None:
                    try:
                        self.output.send(
                            self.topics[routed.to], routed.record, message.timestamp_ms, position
                        )
                        moved += routed.to == "device"
                        continue
                    except BadInput as refusal:
                        error = refusal
                letter = dead_letter(routed.record, error, source, self.max_message_bytes)
                reasons[error.reason] = reasons.get(error.reason, 0) + 1
                self.output.send(self.topics["dead_letters"], letter, message.timestamp_ms)
        self.output.forget((m.partition, m.offset) for m in batch)
        return moved, reasons
