"""Session events on the wire (``schemas/session_event.avsc``): Avro and JSON."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import REPO, START_MS, event_id, facts

from enricher import session_events as events
from enricher.codecs import session_events
from enricher.session import SessionConfig, SessionEngine, StartCause, Timeouts
from enricher.session_events import Detection, EndCause, Kind, SessionEnd, SessionEvent

PROPERTIES = settings(max_examples=200, derandomize=True, database=None, deadline=None)
DEVICE = "device-1"
SCHEMA_FILE = REPO / "schemas" / "session_event.avsc"
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def samples() -> dict[str, SessionEvent]:
    """Records as the lifecycle module makes them: fg 60 s, bg 15 s; the device goes to the
    background at 5 s and comes back at 30 s, which starts session 2."""
    at = SessionEngine(SessionConfig(salt="test-salt", timeouts=Timeouts.from_seconds(60, 15)))
    first = at.advance(DEVICE, None, facts(1, START_MS))
    second = at.advance(DEVICE, first.state, facts(2, START_MS + 5_000, "background"))
    third = at.advance(DEVICE, second.state, facts(3, START_MS + 30_000, "foreground"))
    by_next_event, started_again = events.on_step(DEVICE, second.state, third)
    _, by_watermark = events.declare_ended(DEVICE, third.state, START_MS + 120_000)
    return {
        "started": events.started(DEVICE, first),
        "started_after_timeout": started_again,
        "ended_by_next_event": by_next_event,
        "ended_by_watermark": by_watermark,
    }


SAMPLES = samples()


@pytest.fixture(params=sorted(SAMPLES))
def sample(request: pytest.FixtureRequest) -> SessionEvent:
    record: SessionEvent = SAMPLES[request.param]
    return record


def test_samples_are_of_both_kinds_and_both_detections() -> None:
    assert [record.kind for record in SAMPLES.values()] == [
        Kind.STARTED,
        Kind.STARTED,
        Kind.ENDED,
        Kind.ENDED,
    ]
    detections = [r.end.detected_by for r in SAMPLES.values() if r.end is not None]
    assert detections == [Detection.NEXT_EVENT, Detection.WATERMARK]


# --- the record -----------------------------------------------------------------------------------


def test_record_of_a_start() -> None:
    record = SAMPLES["started_after_timeout"]
    first = SAMPLES["started"]
    assert session_events.as_record(record) == {
        "kind": "session_started",
        "device_id": DEVICE,
        "user_id": first.user_id,
        "session_id": record.session_id,
        "session_index": 2,
        "previous_session_id": first.session_id,
        "first_event_id": event_id(3),
        "first_event_time": START_MS + 30_000,
        "start_cause": "background_timeout",
        "end": None,
    }
    assert session_events.as_record(first)["start_cause"] == "new_device"
    assert session_events.as_record(first)["previous_session_id"] is None


def test_record_of_an_end_by_the_next_event() -> None:
    record = SAMPLES["ended_by_next_event"]
    assert session_events.as_record(record) == {
        "kind": "session_ended",
        "device_id": DEVICE,
        "user_id": record.user_id,
        "session_id": SAMPLES["started"].session_id,
        "session_index": 1,
        "previous_session_id": None,
        "first_event_id": event_id(1),
        "first_event_time": START_MS,
        "start_cause": None,
        "end": {
            "last_event_time": START_MS + 5_000,
            "duration_ms": 5_000,
            "event_count": 2,
            "foreground_transitions": 0,
            "background_transitions": 1,
            "in_background": True,
            "cause": "background_timeout",
            "detected_by": "next_event",
            "watermark": None,
            "next_session_id": SAMPLES["started_after_timeout"].session_id,
            "revision": 0,
        },
    }


def test_record_of_an_end_by_the_watermark() -> None:
    record = session_events.as_record(SAMPLES["ended_by_watermark"])
    assert record["kind"] == "session_ended"
    assert record["session_index"] == 2
    assert record["start_cause"] is None
    assert record["end"] == {
        "last_event_time": START_MS + 30_000,
        "duration_ms": 0,
        "event_count": 1,
        "foreground_transitions": 1,
        "background_transitions": 0,
        "in_background": False,
        "cause": "foreground_timeout",
        "detected_by": "watermark",
        "watermark": START_MS + 120_000,
        "next_session_id": None,
        "revision": 0,
    }


# --- Avro and JSON --------------------------------------------------------------------------------


def test_avro_round_trip(sample: SessionEvent) -> None:
    data = session_events.encode_avro(sample)
    assert isinstance(data, bytes)
    assert session_events.decode_avro(data) == session_events.as_record(sample)


def test_json_round_trip(sample: SessionEvent) -> None:
    data = session_events.encode_json(sample)
    assert isinstance(data, bytes)
    assert session_events.decode_json(data) == session_events.as_record(sample)


def test_avro_is_readable_with_the_schema_file_alone(sample: SessionEvent) -> None:
    """A consumer holding only ``schemas/session_event.avsc`` reads what the enricher wrote,
    times as fastavro gives them: UTC datetimes."""
    schema = fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))
    read = fastavro.schemaless_reader(io.BytesIO(session_events.encode_avro(sample)), schema)
    assert isinstance(read, dict)
    expected = session_events.as_record(sample)
    expected["first_event_time"] = fastavro_time(expected["first_event_time"])
    if expected["end"] is not None:
        end = expected["end"]
        end["last_event_time"] = fastavro_time(end["last_event_time"])
        if end["watermark"] is not None:
            end["watermark"] = fastavro_time(end["watermark"])
    assert read == expected


def fastavro_time(time_ms: int) -> datetime:
    """What fastavro reads back for a ``timestamp-millis``."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=time_ms)


def test_json_times_are_iso_strings() -> None:
    started = json.loads(session_events.encode_json(SAMPLES["started"]))
    assert started["first_event_time"] == "2026-01-01T00:00:00.000Z"
    assert started["end"] is None
    by_next = json.loads(session_events.encode_json(SAMPLES["ended_by_next_event"]))
    assert by_next["first_event_time"] == "2026-01-01T00:00:00.000Z"
    assert by_next["end"]["last_event_time"] == "2026-01-01T00:00:05.000Z"
    assert by_next["end"]["watermark"] is None
    assert by_next["end"]["duration_ms"] == 5_000
    by_watermark = json.loads(session_events.encode_json(SAMPLES["ended_by_watermark"]))
    assert by_watermark["first_event_time"] == "2026-01-01T00:00:30.000Z"
    assert by_watermark["end"]["last_event_time"] == "2026-01-01T00:00:30.000Z"
    assert by_watermark["end"]["watermark"] == "2026-01-01T00:02:00.000Z"
    # Everything else is as in the record.
    record = session_events.as_record(SAMPLES["ended_by_watermark"])
    assert {k: v for k, v in by_watermark.items() if k not in ("first_event_time", "end")} == {
        k: v for k, v in record.items() if k not in ("first_event_time", "end")
    }


def test_json_is_compact_utf8() -> None:
    data = session_events.encode_json(SAMPLES["ended_by_next_event"])
    assert b" " not in data
    assert json.loads(data.decode("utf-8"))["kind"] == "session_ended"


# --- the schema -----------------------------------------------------------------------------------


def named_types(schema: Any) -> Iterator[dict[str, Any]]:
    """Every named type (record, enum) in a schema, depth first."""
    if isinstance(schema, list):
        for branch in schema:
            yield from named_types(branch)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum"):
            yield schema
        for item in schema.get("fields", []):
            yield from named_types(item["type"])
        if schema.get("type") not in ("record", "enum"):
            yield from named_types(schema.get("type"))


def schema_json() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return schema


def test_schema_file_parses_and_is_the_one_the_codec_uses() -> None:
    schema = schema_json()
    parsed = fastavro.parse_schema(schema)
    assert isinstance(parsed, dict)
    assert parsed["name"] == "enricher.avro.SessionEvent"
    assert schema == session_events.SCHEMA_JSON


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("SessionEventKind", Kind),
        ("StartCause", StartCause),
        ("EndCause", EndCause),
        ("Detection", Detection),
    ],
)
def test_schema_enum_symbols_are_the_enum_values(name: str, values: type[Enum]) -> None:
    enums = {t["name"]: t for t in named_types(schema_json()) if t["type"] == "enum"}
    assert set(enums) == {"SessionEventKind", "StartCause", "EndCause", "Detection"}
    assert enums[name]["symbols"] == [member.value for member in values]


def test_schema_fields_are_the_record_fields() -> None:
    records = {t["name"]: t for t in named_types(schema_json()) if t["type"] == "record"}
    ended = session_events.as_record(SAMPLES["ended_by_watermark"])
    assert [f["name"] for f in records["SessionEvent"]["fields"]] == list(ended)
    assert [f["name"] for f in records["SessionEnd"]["fields"]] == list(ended["end"])


# --- random records -------------------------------------------------------------------------------

times = st.integers(min_value=0, max_value=MAX_TIME_MS)
counts = st.integers(min_value=0, max_value=2**31 - 1)
texts = st.text(max_size=40)


@st.composite
def session_events_(draw: st.DrawFn) -> SessionEvent:
    kind = draw(st.sampled_from(Kind))
    first_ms = draw(times)
    end: SessionEnd | None = None
    if kind is Kind.ENDED:
        by_watermark = draw(st.booleans())
        end = SessionEnd(
            last_event_ms=draw(st.integers(min_value=first_ms, max_value=MAX_TIME_MS)),
            event_count=draw(counts),
            foreground_transitions=draw(counts),
            background_transitions=draw(counts),
            in_background=draw(st.booleans()),
            cause=draw(st.sampled_from(EndCause)),
            detected_by=Detection.WATERMARK if by_watermark else Detection.NEXT_EVENT,
            watermark_ms=draw(times) if by_watermark else None,
            next_session_id=None if by_watermark else draw(texts),
            revision=draw(counts),
        )
    return SessionEvent(
        kind=kind,
        device_id=draw(texts),
        user_id=draw(texts),
        session_id=draw(texts),
        session_index=draw(st.integers(min_value=1, max_value=2**31 - 1)),
        previous_session_id=draw(st.none() | texts),
        first_event_id=draw(texts),
        first_event_ms=first_ms,
        start_cause=draw(st.sampled_from(StartCause)) if kind is Kind.STARTED else None,
        end=end,
    )


@PROPERTIES
@given(session_events_())
def test_random_records_round_trip(event: SessionEvent) -> None:
    record = session_events.as_record(event)
    assert session_events.decode_avro(session_events.encode_avro(event)) == record
    assert session_events.decode_json(session_events.encode_json(event)) == record
    text = json.loads(session_events.encode_json(event))
    assert ISO_TIME.fullmatch(text["first_event_time"])
    if event.end is not None:
        assert record["end"]["duration_ms"] == event.end.last_event_ms - event.first_event_ms
        assert record["end"]["duration_ms"] >= 0
        assert ISO_TIME.fullmatch(text["end"]["last_event_time"])
        watermark = text["end"]["watermark"]
        assert watermark is None or ISO_TIME.fullmatch(watermark)
