"""Session events on the wire: ``schemas/session_event.avsc``, as Avro or JSON.

The topic uses the output topic's format family: Avro (schemaless, or in the Confluent wire
format under the subject ``<topic>-value``) or JSON with the same field names, where times are
ISO 8601 strings as in the ``client_session`` entity.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import orjson

from enricher.codecs import avro
from enricher.entities import iso_millis
from enricher.session_events import SessionEvent

SCHEMA_JSON = avro.load_schema("session_event.avsc")
SCHEMA = fastavro.parse_schema(SCHEMA_JSON)
_TIME_FIELDS = ("first_event_time", "last_event_time", "watermark")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def as_record(event: SessionEvent, time: Callable[[int], Any] = int) -> dict[str, Any]:
    """The record of ``session_event.avsc``: times in epoch milliseconds, or as ``time``
    makes them."""
    end = event.end
    return {
        "kind": event.kind.value,
        "device_id": event.device_id,
        "user_id": event.user_id,
        "session_id": event.session_id,
        "session_index": event.session_index,
        "previous_session_id": event.previous_session_id,
        "first_event_id": event.first_event_id,
        "first_event_time": time(event.first_event_ms),
        "start_cause": event.start_cause.value if event.start_cause else None,
        "end": None
        if end is None
        else {
            "last_event_time": time(end.last_event_ms),
            "duration_ms": end.last_event_ms - event.first_event_ms,
            "event_count": end.event_count,
            "foreground_transitions": end.foreground_transitions,
            "background_transitions": end.background_transitions,
            "in_background": end.in_background,
            "cause": end.cause.value,
            "detected_by": end.detected_by.value,
            "watermark": None if end.watermark_ms is None else time(end.watermark_ms),
            "next_session_id": end.next_session_id,
            "revision": end.revision,
        },
    }


def encode_avro(event: SessionEvent) -> bytes:
    return avro.write_record(as_record(event), SCHEMA)


def encode_json(event: SessionEvent) -> bytes:
    """Compact UTF-8 JSON, times as ISO 8601 strings."""
    return orjson.dumps(as_record(event, iso_millis))


def decode_avro(data: bytes) -> dict[str, Any]:
    """A record read back, times in epoch milliseconds (for consumers and tests)."""
    record = avro.read_record(data, SCHEMA)
    _map_times(record, _epoch_millis)
    return record


def decode_json(data: bytes) -> dict[str, Any]:
    """A JSON record read back, times in epoch milliseconds (for consumers and tests)."""
    record: dict[str, Any] = json.loads(data)

    _map_times(
        record, lambda text: _epoch_millis(datetime.strptime(text, _ISO).replace(tzinfo=UTC))
    )
    return record


_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"


def _epoch_millis(moment: datetime) -> int:
    return (moment - _EPOCH) // _MILLISECOND


def _map_times(record: dict[str, Any], convert: Callable[[Any], Any]) -> None:
    for part in (record, record.get("end") or {}):
        for name in _TIME_FIELDS:
            if part.get(name) is not None:
                part[name] = convert(part[name])
