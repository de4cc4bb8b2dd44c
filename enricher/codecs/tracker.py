"""The Snowplow tracker protocol, as trackers send it: a flat JSON object of strings.

Decoding validates everything the enricher relies on, once, and raises
:class:`~enricher.errors.BadInput` for anything else. Encoding keeps every input field as it
was and puts the enricher's entities into the event's contexts, in the encoding the input
used (``co`` stays JSON, ``cx`` stays base64url, none becomes ``co``); an event with both
has the contexts of both merged into ``co``, and its ``cx`` removed.

The JSON nested in fields (``co``, ``cx``, ``ue_pr``, ``ue_px``) must be JSON any consumer
reads back: no ``NaN``, ``Infinity`` or number beyond a double's range (``invalid_number``),
and no deeper than :data:`MAX_DEPTH` (``too_deep``). The fields themselves must be Unicode
text, names included (no lone surrogate): Avro and UTF-8 consumers could not carry them.

JSON goes through orjson where it reads and writes exactly what the standard library does,
only faster, and through the standard library everywhere else: what orjson refuses (lone
surrogates, ``NaN``), and nested JSON (contexts, self-describing events) that may hold a
float or an integer beyond 64 bits (orjson would read the integer as a float, and writes
floats differently).

The usual event, a flat object of Unicode strings, is read first by msgspec, typed as
``dict[str, str]``: it checks that every value is a string while it parses, where orjson
needs a second pass over the values. What msgspec reads at all, it reads as orjson
does (a property test holds them equal); anything else it refuses (a value of another type,
a lone surrogate, bytes that are not UTF-8), and then the general path above reads it and
says why it is bad, as before.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, cast

import msgspec
import orjson

from enricher.entities import (
    BACKGROUND_EVENT_SCHEMA,
    CONTEXTS_SCHEMA,
    FOREGROUND_EVENT_SCHEMA,
    SelfDescribing,
)
from enricher.errors import BadInput, Reason
from enricher.session import EventFacts, Lifecycle

ContextsField = Literal["co", "cx"]
_CONTEXTS_FIELDS: tuple[ContextsField, ...] = ("co", "cx")

# A JSON number with a fraction or an exponent, or of 19 digits or more, is in the text (or
# the inside of a string merely looks so: then the standard library reads it, never wrongly).
_INEXACT_NUMBER = re.compile(r"[:\[,]\s*-?[0-9]+(?:[.eE]|[0-9]{18})")
_is_uuid = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}").fullmatch
_MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last instant ISO-8601 can write
_TIMESTAMP_FIELDS = ("dtm", "ttm", "stm")
MAX_DEPTH = 254
"""The deepest nesting of arrays and objects in the JSON of ``co``, ``cx``, ``ue_pr`` and
``ue_px`` (the outermost counts as 1): deeper is ``too_deep``. 254 is the deepest orjson
writes (its serializer refuses a 255th level), and the contexts the enricher writes are
exactly as deep as the deepest it read (never less than the 4 levels of its own entity in
the envelope), so everything accepted can be written; a lower limit would refuse events that
enrich fine. The parsers alone would read up to about 1000 levels (orjson 1024, the standard
library its recursion limit, which depends on the call stack), so without a limit of its own
the codec accepted contexts it could not write, and its answer on a deep one depended on
the stack it ran on. No tracker sends more than a dozen levels."""
_UNREAD = object()
LIFECYCLE_SCHEMAS = {
    BACKGROUND_EVENT_SCHEMA: Lifecycle.BACKGROUND,
    FOREGROUND_EVENT_SCHEMA: Lifecycle.FOREGROUND,
}
"""The self-describing events that move a device between foreground and background"""


class TrackerEvent(NamedTuple):
    """A validated tracker-protocol event: its fields as they arrived, what the rules read of
    it (the attributes of :class:`~enricher.session.EventFacts`, so the engine takes the event
    itself), and its contexts. A named tuple: one is built per event."""

    fields: dict[str, str]
    event_id: str
    time_ms: int
    lifecycle: Lifecycle | None
    app_id: str | None
    contexts: list[SelfDescribing]
    contexts_field: ContextsField | None
    exact_contexts: bool = True
    """the contexts hold no float and no integer beyond 64 bits: orjson writes them as the
    standard library does"""
    envelope: Any = None
    """the record the event came in, for a format that writes the event back into it (a
    collector payload)"""
    anonymous: bool = False
    """the tracker asked for anonymous tracking (a collector request's ``SP-Anonymous``)"""

    @property
    def facts(self) -> EventFacts:
        return EventFacts(self.event_id, self.time_ms, self.lifecycle, self.app_id)


_new_event = cast(
    Callable[[tuple[Any, ...]], TrackerEvent], functools.partial(tuple.__new__, TrackerEvent)
)
"""builds an event from all its fields in order, in C: the named tuple's own constructor is a
Python function, and one event is built per input record"""


_read_fields = msgspec.json.Decoder(dict[str, str]).decode


def decode(data: bytes) -> TrackerEvent:
    """Decode one tracker-protocol event from JSON bytes."""
    try:
        fields = _read_fields(data)
    except msgspec.DecodeError:  # not an object of Unicode strings: the general way says why
        value, unicode = load(data)
        return from_fields(value, unicode=unicode)
    return from_strings(fields)


def load(data: bytes) -> tuple[Any, bool]:
    """The JSON value in ``data``, and whether its strings are known to be Unicode text: true
    when orjson read it; else the standard library did, which also reads what orjson refuses
    (lone surrogates, escaped or as CESU-8 bytes, ``NaN``, integers beyond 64 bits)."""
    try:
        return orjson.loads(data), True
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data), False
    except (ValueError, RecursionError) as error:  # also: too deep, too many integer digits
        raise BadInput("not_json", str(error)) from None


def is_unicode(text: str) -> bool:
    """Whether ``text`` is Unicode text, which UTF-8 can carry (no lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def from_fields(value: object, *, unicode: bool = True) -> TrackerEvent:
    """Validate a decoded tracker-protocol object. Unless ``unicode`` (its reader guarantees
    Unicode text, as orjson and Avro do), every field name and value is checked to be."""
    if not unicode and isinstance(value, dict):
        for name, text in value.items():
            if not is_unicode(name):
                raise BadInput("not_json", f"field name {name[:64]!r} holds a lone surrogate")
            if isinstance(text, str) and not is_unicode(text):
                raise BadInput(
                    "not_json", f"field {name[:64]!r} holds a lone surrogate (not Unicode)"
                )
    if not isinstance(value, dict):
        raise BadInput("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    # One pass in C (joining accepts only strings); the loop that names the culprit only if
    # that fails.
    try:
        "".join(value.values())
    except TypeError:
        for name, field_value in value.items():
            if not isinstance(field_value, str):
                raise BadInput(
                    "non_string_field",
                    f"field {name[:64]!r} is {type(field_value).__name__}, not a string",
                ) from None
    return from_strings(value)


def from_strings(fields: dict[str, str]) -> TrackerEvent:
    """Validate an object already known to hold Unicode strings only (as msgspec's reading
    as ``dict[str, str]`` guarantees): what :func:`from_fields` checks beyond that."""
    event_id = fields.get("eid")
    if not event_id:
        raise BadInput("missing_event_id", "no 'eid' field")
    if not _is_uuid(event_id):
        raise BadInput("invalid_event_id", f"'eid' is not a UUID: {event_id[:64]!r}")

    # Both co and cx: the contexts of both (co's first), written back to co alone.
    contexts_field: ContextsField | None = None
    contexts: list[SelfDescribing] = []
    exact = True
    if "co" in fields or "cx" in fields:
        for field in _CONTEXTS_FIELDS:
            if field in fields:
                value, exact_here = _json_field(fields, field, "invalid_contexts")
                contexts = contexts + _contexts(value) if contexts else _contexts(value)
                exact = exact and exact_here
                contexts_field = contexts_field or field

    lifecycle: Lifecycle | None = None
    raw = fields.get("ue_pr")
    if raw is not None or "ue_px" in fields:
        # What _json_field does, without its calls, for the usual ue_pr: read by orjson, and
        # with too few brackets to be too deep. Every other case through _json_field.
        unstruct: Any = _UNREAD
        if raw is not None and raw.count("[") + raw.count("{") <= MAX_DEPTH:
            try:
                unstruct = orjson.loads(raw)
            except orjson.JSONDecodeError:
                unstruct = _UNREAD
        if unstruct is _UNREAD:
            name = "ue_pr" if raw is not None else "ue_px"
            unstruct, _ = _json_field(fields, name, "invalid_ue", exact=False)
        inner = unstruct.get("data") if isinstance(unstruct, dict) else None
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if not isinstance(schema, str):
            raise BadInput("invalid_ue", "self-describing event has no data.schema")
        if fields.get("e") == "ue":
            lifecycle = LIFECYCLE_SCHEMAS.get(schema)

    # Rule 6's usual case inline: a valid device-created time.
    text = fields.get("dtm")
    if text and text.isascii() and text.isdigit() and len(text) <= 15:
        time_ms = int(text)
        if time_ms > _MAX_TIME_MS:
            time_ms = _event_time(fields)
    else:
        time_ms = _event_time(fields)

    # Every field in order, the envelope and the anonymous flag as the tracker protocol has them.
    return _new_event(
        (
            fields,
            event_id,
            time_ms,
            lifecycle,
            fields.get("aid"),
            contexts,
            contexts_field,
            exact,
            None,
            False,
        )
    )


def encode(event: TrackerEvent, entities: list[SelfDescribing]) -> bytes:
    """The event's JSON bytes with ``entities`` added to its contexts."""
    return dump(with_entities(event, entities))


def with_entities(
    event: TrackerEvent,
    entities: list[SelfDescribing],
    *,
    unicode: bool = False,
) -> dict[str, str]:
    """The event's fields with ``entities`` added to its contexts, in the input's encoding
    (an event with both ``co`` and ``cx`` gets them merged into ``co``, and no ``cx``).

    The contexts may hold lone surrogates (JSON escapes can write them): in ``co`` they stay
    characters, which :func:`dump` writes back as the same escapes, unless ``unicode`` asks
    for Unicode text (an Avro string must be), where they are written as JSON escapes
    inside ``co``: the same JSON value."""
    if not entities:
        return event.fields
    envelope = {"schema": CONTEXTS_SCHEMA, "data": merge_entities(event.contexts, entities)}
    payload = orjson.dumps(envelope).decode() if event.exact_contexts else _compact(envelope)
    out = dict(event.fields)
    if event.contexts_field == "cx":
        out["cx"] = base64.urlsafe_b64encode(_utf8(payload)).decode().rstrip("=")
    else:
        if unicode and not event.exact_contexts and not is_unicode(payload):
            # Outside strings JSON text is ASCII: every lone surrogate is inside a string.
            payload = _utf8(payload).decode()
        out["co"] = payload
        out.pop("cx", None)
    return out


def merge_entities(
    existing: list[SelfDescribing], entities: list[SelfDescribing]
) -> list[SelfDescribing]:
    """Existing contexts plus ``entities``; an entity replaces the tracker's copy of its schema
    (same vendor and name, any version)."""
    ours = {schema_family(entity["schema"]) for entity in entities}
    return [c for c in existing if schema_family(c.get("schema")) not in ours] + entities


def dump(fields: Mapping[str, Any], *, line: bool = False) -> bytes:
    """Compact, deterministic JSON bytes of a flat object of strings; a ``line`` ends in a
    newline (written by orjson with the rest: no copy to append it)."""
    try:
        return orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE if line else None)
    except orjson.JSONEncodeError:  # a lone surrogate
        return _utf8(_compact(fields)) + b"\n" if line else _utf8(_compact(fields))


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
    value, read_by_orjson = _nested_json(raw, name, reason, exact)
    # No deeper than its count of brackets: the walk only for the rare text with many.
    if raw.count("[") + raw.count("{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise BadInput(
            "too_deep", f"'{name}' nests arrays and objects more than {MAX_DEPTH} levels deep"
        )
    return value, read_by_orjson


def _nested_json(raw: str, name: str, reason: Reason, exact: bool) -> tuple[Any, bool]:
    if not (exact and _INEXACT_NUMBER.search(raw)):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:  # also NaN, 1e400, lone surrogates, deeper than 1024
            pass
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float), False
    except _NonFinite as number:
        raise BadInput(
            "invalid_number",
            f"'{name}' holds {number}, which is no JSON number (NaN, Infinity or beyond"
            " the range of a double)",
        ) from None
    except RecursionError:
        raise BadInput(
            "too_deep", f"'{name}' nests arrays and objects more than {MAX_DEPTH} levels deep"
        ) from None
    except ValueError as error:  # also: too many integer digits
        raise BadInput(reason, f"'{name}' is not valid JSON: {error}") from None


class _NonFinite(Exception):
    """A number JSON cannot carry, met by the standard library's parser."""


def _no_constant(text: str) -> float:
    """``NaN``, ``Infinity``, ``-Infinity``: the standard library reads them, JSON has none."""
    raise _NonFinite(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: beyond a double, the parser would make it infinity
        raise _NonFinite(text[:32])
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays and objects more than ``limit`` levels deep."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


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
        if not text:
            continue
        if text.isascii() and text.isdigit() and len(text) <= 15:
            time_ms = int(text)
            if time_ms <= _MAX_TIME_MS:
                return time_ms
        raise BadInput("invalid_timestamp", f"'{name}' is not epoch milliseconds: {text[:32]!r}")
    raise BadInput("missing_timestamp", "none of 'dtm', 'ttm', 'stm' is present")
