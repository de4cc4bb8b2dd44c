"""The Snowplow tracker protocol, as trackers send it: a flat JSON object of strings.

Decoding validates everything the enricher relies on, once, and raises
:class:`~enricher.errors.BadInput` for anything else. Encoding keeps every input field as it
was and puts the enricher's entities into the event's contexts, in the encoding the input
used (``co`` stays JSON, ``cx`` stays base64url, none becomes ``co``).

JSON goes through orjson where it reads and writes exactly what the standard library does,
only faster, and through the standard library everywhere else: what orjson refuses (lone
surrogates, ``NaN``), and nested JSON (contexts, self-describing events) that may hold a
float or an integer beyond 64 bits (orjson would read the integer as a float, and writes
floats differently).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from enricher.entities import (
    BACKGROUND_EVENT_SCHEMA,
    CONTEXTS_SCHEMA,
    FOREGROUND_EVENT_SCHEMA,
    SelfDescribing,
)
from enricher.errors import BadInput
from enricher.session import EventFacts, Lifecycle

ContextsField = Literal["co", "cx"]

# A JSON number with a fraction or an exponent, or of 19 digits or more, is in the text (or
# the inside of a string merely looks so: then the standard library reads it, never wrongly).
_INEXACT_NUMBER = re.compile(r"[:\[,]\s*-?[0-9]+(?:[.eE]|[0-9]{18})")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last instant ISO-8601 can write
_TIMESTAMP_FIELDS = ("dtm", "ttm", "stm")
_LIFECYCLE_SCHEMAS = {
    BACKGROUND_EVENT_SCHEMA: Lifecycle.BACKGROUND,
    FOREGROUND_EVENT_SCHEMA: Lifecycle.FOREGROUND,
}


@dataclass(frozen=True, slots=True)
class TrackerEvent:
    """A validated tracker-protocol event."""

    fields: dict[str, str]
    facts: EventFacts
    contexts: list[SelfDescribing]
    contexts_field: ContextsField | None
    exact_contexts: bool = True
    """the contexts hold no float and no integer beyond 64 bits: orjson writes them as the
    standard library does"""


def decode(data: bytes) -> TrackerEvent:
    """Decode one tracker-protocol event from JSON bytes."""
    try:
        return from_fields(orjson.loads(data))
    except orjson.JSONDecodeError:
        pass
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:  # also: too deep, too many integer digits
        raise BadInput("not_json", str(error)) from None
    if isinstance(value, dict):
        for name, text in value.items():
            if isinstance(text, str) and not _is_unicode(text):
                raise BadInput("not_json", f"field {name!r} holds a lone surrogate (not Unicode)")
    return from_fields(value)


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def from_fields(value: object) -> TrackerEvent:
    """Validate a decoded tracker-protocol object."""
    if not isinstance(value, dict):
        raise BadInput("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    for name, field_value in value.items():
        if not isinstance(field_value, str):
            raise BadInput(
                "non_string_field", f"field {name!r} is {type(field_value).__name__}, not a string"
            )
    fields: dict[str, str] = value

    event_id = fields.get("eid")
    if not event_id:
        raise BadInput("missing_event_id", "no 'eid' field")
    if not _UUID.fullmatch(event_id):
        raise BadInput("invalid_event_id", f"'eid' is not a UUID: {event_id[:64]!r}")

    contexts_field: ContextsField | None = None
    contexts: list[SelfDescribing] = []
    exact = True
    if "co" in fields or "cx" in fields:
        contexts_field = "co" if "co" in fields else "cx"
        value, exact = _json_field(fields, contexts_field, "invalid_contexts")
        contexts = _contexts(value)

    lifecycle: Lifecycle | None = None
    if "ue_pr" in fields or "ue_px" in fields:
        unstruct, _ = _json_field(
            fields, "ue_pr" if "ue_pr" in fields else "ue_px", "invalid_ue", exact=False
        )
        inner = unstruct.get("data") if isinstance(unstruct, dict) else None
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), str):
            raise BadInput("invalid_ue", "self-describing event has no data.schema")
        if fields.get("e") == "ue":
            lifecycle = _LIFECYCLE_SCHEMAS.get(inner["schema"])

    facts = EventFacts(
        event_id=event_id,
        time_ms=_event_time(fields),
        lifecycle=lifecycle,
        app_id=fields.get("aid"),
    )
    return TrackerEvent(fields, facts, contexts, contexts_field, exact)


def encode(event: TrackerEvent, entities: list[SelfDescribing]) -> bytes:
    """The event's JSON bytes with ``entities`` added to its contexts."""
    return dump(with_entities(event, entities))


def with_entities(event: TrackerEvent, entities: list[SelfDescribing]) -> dict[str, str]:
    """The event's fields with ``entities`` added to its contexts, in the input's encoding."""
    if not entities:
        return event.fields
    envelope = {"schema": CONTEXTS_SCHEMA, "data": merge_entities(event.contexts, entities)}
    payload = orjson.dumps(envelope).decode() if event.exact_contexts else _compact(envelope)
    out = dict(event.fields)
    if event.contexts_field == "cx":
        out["cx"] = base64.urlsafe_b64encode(_utf8(payload)).decode().rstrip("=")
    else:
        out["co"] = payload
    return out


def merge_entities(
    existing: list[SelfDescribing], entities: list[SelfDescribing]
) -> list[SelfDescribing]:
    """Existing contexts plus ``entities``; an entity replaces the tracker's copy of its schema
    (same vendor and name, any version)."""
    ours = {schema_family(entity["schema"]) for entity in entities}
    return [c for c in existing if schema_family(c.get("schema")) not in ours] + entities


def dump(fields: Mapping[str, Any]) -> bytes:
    """Compact, deterministic JSON bytes of a flat object of strings."""
    try:
        return orjson.dumps(fields)
    except orjson.JSONEncodeError:  # a lone surrogate
        return _utf8(_compact(fields))


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of JSON text. JSON strings may carry lone surrogates (``"\\ud83d"``, a
    truncated emoji) that UTF-8 cannot: they go out as the same ``\\udXXX`` escapes."""
    return text.encode("utf-8", "backslashreplace")


def schema_family(schema: object) -> str:
    """``iglu:vendor/name/format/1-0-2`` -> ``iglu:vendor/name/format``."""
    return schema.rsplit("/", 1)[0] if isinstance(schema, str) else ""


def _json_field(
    fields: dict[str, str],
    name: str,
    reason: Literal["invalid_contexts", "invalid_ue"],
    *,
    exact: bool = True,
) -> tuple[Any, bool]:
    """The JSON in a field, and whether orjson read it (see the module's docstring); with
    ``exact`` false (the value is only inspected, never written again), orjson reads numbers
    too."""
    raw = fields[name]
    if name.endswith("x"):
        raw = _base64url(raw, name)
    if not (exact and _INEXACT_NUMBER.search(raw)):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(raw), False
    except (ValueError, RecursionError) as error:  # also: too deep, too many integer digits
        raise BadInput(reason, f"'{name}' is not valid JSON: {error}") from None


def _base64url(text: str, name: str) -> str:
    """Decode base64url (trackers omit the padding; the standard alphabet is accepted too)."""
    standard = text.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True).decode()
    except (binascii.Error, ValueError) as error:
        raise BadInput("invalid_base64", f"'{name}' is not base64url: {error}") from None


def _contexts(value: Any) -> list[SelfDescribing]:
    data = value.get("data") if isinstance(value, dict) else None
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise BadInput("invalid_contexts", "contexts must be {'schema': ..., 'data': [objects]}")
    return data


def _event_time(fields: dict[str, str]) -> int:
    """Rule 6: the device-created time, else the true time, else the device-sent time."""
    for name in _TIMESTAMP_FIELDS:
        text = fields.get(name)
        if text is None or text == "":
            continue
        if not (text.isascii() and text.isdigit() and len(text) <= 15) or int(text) > _MAX_TIME_MS:
            raise BadInput(
                "invalid_timestamp", f"'{name}' is not epoch milliseconds: {text[:32]!r}"
            )
        return int(text)
    raise BadInput("missing_timestamp", "none of 'dtm', 'ttm', 'stm' is present")
