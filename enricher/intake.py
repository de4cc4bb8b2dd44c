"""Consumed messages and their admission: which become events, which dead letters, and why.

Pure: :class:`MessageDecoder` turns an :class:`InputMessage` into the device id and the event,
or the :class:`~enricher.errors.BadInput` that sends the message to the dead-letter topic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from confluent_kafka import Message

from enricher.codecs.tracker import TrackerEvent
from enricher.deadletter import Headers, record_size
from enricher.enrich import check_not_ahead
from enricher.errors import BadInput

Decoded = tuple[str, TrackerEvent] | BadInput


class InputMessage(NamedTuple):
    """The parts of a consumed Kafka message the service uses, read once. (A named tuple: one
    is built per message, at a fraction of a frozen dataclass's cost.)"""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp_ms: int

    @classmethod
    def of(cls, message: Message) -> InputMessage:
        """The parts of a message as a consumer without deserializers hands them over (bytes
        or None for the key and value; a list or None for the headers), built in C: the
        named tuple's own constructor is a Python function, and one is built per message."""
        return _new_message(
            (
                message.topic(),
                message.partition(),
                message.offset(),
                message.key(),
                message.value(),
                message.headers(),
                message.timestamp()[1],
            )
        )


_new_message = cast(
    Callable[[tuple[Any, ...]], InputMessage], functools.partial(tuple.__new__, InputMessage)
)


class MessageDecoder:
    """Decodes messages with the input format's decoder, within the service's limits."""

    def __init__(
        self,
        decode: Callable[[bytes], TrackerEvent],
        max_message_bytes: int,
        max_ahead_ms: int,
        refused: Callable[[int, int], str | None] = lambda _partition, _offset: None,
    ) -> None:
        self.decode = decode
        self.max_message_bytes = max_message_bytes
        self.max_ahead_ms = max_ahead_ms
        self.refused = refused
        """why Kafka refused the enriched record of an input (partition, offset), if it did"""

    def __call__(self, message: InputMessage) -> Decoded:
        key, value = message.key, message.value
        try:
            refused = self.refused(message.partition, message.offset)
            if refused is not None:
                raise BadInput("not_producible", f"Kafka refused the enriched record: {refused}")
            if not key:
                raise BadInput("missing_key", "the record has no key (the device id)")
            if value is None:
                raise BadInput("not_json", "the record has no value")
            headers = message.headers
            size = len(key) + len(value) if not headers else record_size(key, value, headers)
            if size > self.max_message_bytes:
                raise BadInput(
                    "oversize",
                    f"{size} bytes (key, value and headers) > {self.max_message_bytes}",
                )
            try:
                device = key.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput("invalid_key", "the key is not UTF-8 text") from None
            event = self.decode(value)
            reference_ms = message.timestamp_ms
            if reference_ms > 0 and event.time_ms - reference_ms > self.max_ahead_ms:
                check_not_ahead(event.time_ms, reference_ms, self.max_ahead_ms)
            return device, event
        except BadInput as error:
            return error
