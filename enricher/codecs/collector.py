"""Snowplow's collector records: one Thrift ``CollectorPayload`` per HTTP request a tracker
sent, as the collector writes it to Kafka, and the tracker-protocol events the request carries.

The enricher reads a record with :func:`decode`, takes its events with :func:`events`, and
writes the record back with the enriched events through :func:`with_events` and :func:`encode`:
every other field (IP address, time, headers, user agent, network user id, ...) leaves exactly
as it arrived, so the pipeline downstream (Snowplow Enrich) sees the request the tracker made.

The record is the struct ``iglu:com.snowplowanalytics.snowplow/CollectorPayload/thrift/1-0-0``
in Thrift's binary protocol. :func:`decode` skips fields it does not know, of any Thrift type
(a newer collector may add some), keeps the last value of a field that occurs twice (as Java's
Thrift library does), and refuses everything else as ``invalid_thrift``: a record cut short, a
length or element count beyond the bytes left, a known field of the wrong type, a missing field
the collector always writes (``schema``, ``ipAddress``, ``timestamp``, ``encoding``,
``collector``; ``path`` is optional in the IDL), a schema other than CollectorPayload 1-0-*,
text that is not UTF-8, containers nested deeper than :data:`MAX_DEPTH`, and bytes after the
end of the struct. :func:`encode` writes the fields in field-id order and leaves absent ones
out, as the collector does, so a record the collector wrote comes back byte for byte; the
schema, declared first in the IDL, has the highest id (31337) and is written last. Fields
:func:`decode` skipped are not written back.

The record has no HTTP method: the path tells the protocol. ``/i``, the pixel (tracker protocol
1), carries one event in its querystring; ``/com.snowplowanalytics.snowplow/tp2`` (tracker
protocol 2) a ``payload_data`` self-describing JSON of events in its body. Other paths carry no
events the enricher reads, and pass through untouched. A querystring parameter given twice
keeps its last value, as Enrich reads it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode

import orjson

from enricher.errors import BadInput

COLLECTOR_PAYLOAD_SCHEMA = "iglu:com.snowplowanalytics.snowplow/CollectorPayload/thrift/1-0-0"
PAYLOAD_DATA_SCHEMA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
"""The current schema of a tracker-protocol-2 body; :func:`with_events` keeps the one the
tracker sent."""
PIXEL_PATH = "/i"
TP2_PATH = "/com.snowplowanalytics.snowplow/tp2"
MAX_DEPTH = 64
"""The deepest nesting of structs, lists, sets and maps in a field :func:`decode` skips (the
record itself is level 0): deeper is ``invalid_thrift``, never a Python recursion error.
thriftpy2 stops at the same depth by default; the collector writes no nesting at all."""

_COLLECTOR_PAYLOAD_1_0 = re.compile(
    r"iglu:com\.snowplowanalytics\.snowplow/CollectorPayload/thrift/1-0-[0-9]+"
)
_PAYLOAD_DATA_1_0 = re.compile(
    r"iglu:com\.snowplowanalytics\.snowplow/payload_data/jsonschema/1-0-[0-9]+"
)

# Thrift type ids, as the binary protocol writes them in one byte.
_STOP = 0
_BOOL = 2
_BYTE = 3
_DOUBLE = 4
_I16 = 6
_I32 = 8
_I64 = 10
_STRING = 11
_STRUCT = 12
_MAP = 13
_SET = 14
_LIST = 15
_UUID = 16
_TYPE_NAMES = {
    _BOOL: "bool",
    _BYTE: "byte",
    _DOUBLE: "double",
    _I16: "i16",
    _I32: "i32",
    _I64: "i64",
    _STRING: "string",
    _STRUCT: "struct",
    _MAP: "map",
    _SET: "set",
    _LIST: "list",
    _UUID: "uuid",
}
_FIXED_SIZES = {_BOOL: 1, _BYTE: 1, _DOUBLE: 8, _I16: 2, _I32: 4, _I64: 8, _UUID: 16}
# The fewest bytes a value of each type takes: an empty string (its length), an empty struct
# (its stop byte), an empty map (key type, value type, count), an empty list or set (element
# type, count). An element count is checked against them before anything is read.
_MIN_SIZES = {**_FIXED_SIZES, _STRING: 4, _STRUCT: 1, _MAP: 6, _SET: 5, _LIST: 5}

_I32_STRUCT = struct.Struct(">i")
_I64_STRUCT = struct.Struct(">q")
_FIELD_ID = struct.Struct(">h")


@dataclass(frozen=True, slots=True)
class CollectorPayload:
    """One HTTP request, as the collector recorded it. The attributes are the IDL's fields in
    field-id order (the order on the wire, so ``schema`` comes last); an optional field the
    request did not have is ``None``."""

    ip_address: str
    timestamp: int
    """When the collector received the request, in milliseconds since the Unix epoch."""
    encoding: str
    collector: str
    user_agent: str | None = None
    referer_uri: str | None = None
    path: str | None = None
    querystring: str | None = None
    body: str | None = None
    headers: tuple[str, ...] | None = None
    content_type: str | None = None
    hostname: str | None = None
    network_user_id: str | None = None
    schema: str = COLLECTOR_PAYLOAD_SCHEMA


class _Field(NamedTuple):
    thrift_id: int
    name: str
    """The name in the IDL, for error details."""
    ttype: int
    header: bytes
    """The field's type byte and big-endian id, as the binary protocol writes them."""


def _field(thrift_id: int, name: str, ttype: int) -> _Field:
    return _Field(thrift_id, name, ttype, bytes([ttype]) + _FIELD_ID.pack(thrift_id))


# In the order of CollectorPayload's attributes: field-id order.
_FIELDS = (
    _field(100, "ipAddress", _STRING),
    _field(200, "timestamp", _I64),
    _field(210, "encoding", _STRING),
    _field(220, "collector", _STRING),
    _field(300, "userAgent", _STRING),
    _field(310, "refererUri", _STRING),
    _field(320, "path", _STRING),
    _field(330, "querystring", _STRING),
    _field(340, "body", _STRING),
    _field(350, "headers", _LIST),
    _field(360, "contentType", _STRING),
    _field(400, "hostname", _STRING),
    _field(410, "networkUserId", _STRING),
    _field(31337, "schema", _STRING),
)
_INDEX_BY_ID = {field.thrift_id: index for index, field in enumerate(_FIELDS)}
_REQUIRED = tuple(
    index
    for index, field in enumerate(_FIELDS)
    if field.name in ("schema", "ipAddress", "timestamp", "encoding", "collector")
)
_values = attrgetter(*CollectorPayload.__dataclass_fields__)


def _invalid(detail: str) -> BadInput:
    return BadInput("invalid_thrift", detail)


def _not_payload_data(detail: str) -> BadInput:
    return BadInput("not_payload_data", detail)


def _type_name(ttype: int) -> str:
    return _TYPE_NAMES.get(ttype, f"unknown ({ttype})")


def _cut_short(data: bytes, pos: int, size: int, what: str) -> BadInput:
    return _invalid(f"cut short: {what} at offset {pos} needs {size} bytes, {len(data) - pos} left")


def _take(data: bytes, pos: int, size: int, what: str) -> int:
    """The offset after ``size`` bytes at ``pos``, which must all be there."""
    end = pos + size
    if end > len(data):
        raise _cut_short(data, pos, size, what)
    return end


def _count(data: bytes, pos: int, unit: int, what: str) -> int:
    """The i32 length or element count at ``pos``: never negative, and never more units of
    ``unit`` bytes than there are bytes after it, so no forged count allocates or loops."""
    start = pos + 4
    if start > len(data):
        raise _cut_short(data, pos, 4, f"{what} size")
    (count,) = _I32_STRUCT.unpack_from(data, pos)
    if count < 0 or count * unit > len(data) - start:
        raise _bad_count(data, pos, count, unit, what)
    return int(count)


def _bad_count(data: bytes, pos: int, count: int, unit: int, what: str) -> BadInput:
    return _invalid(
        f"{what} at offset {pos} claims {count} {'bytes' if unit == 1 else 'elements'}, "
        f"{len(data) - pos - 4} bytes are left"
    )


def _read_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    """The string at ``pos``, and the offset after it."""
    start = pos + 4
    if start > len(data):
        raise _cut_short(data, pos, 4, f"{what} size")
    (length,) = _I32_STRUCT.unpack_from(data, pos)
    end = start + length
    if length < 0 or end > len(data):
        raise _bad_count(data, pos, length, 1, what)
    try:
        return data[start:end].decode(), end
    except UnicodeDecodeError as error:
        raise _invalid(f"{what} at offset {pos} is not UTF-8 (byte {error.start})") from None


def _read_strings(data: bytes, pos: int, what: str) -> tuple[tuple[str, ...], int]:
    _take(data, pos, 1, f"{what} element type")
    if data[pos] != _STRING:
        raise _invalid(f"{what} is a list of {_type_name(data[pos])}, not of string")
    count = _count(data, pos + 1, _MIN_SIZES[_STRING], what)
    pos += 5
    items = []
    for _ in range(count):
        item, pos = _read_string(data, pos, what)
        items.append(item)
    return tuple(items), pos


def _min_size(ttype: int, pos: int) -> int:
    size = _MIN_SIZES.get(ttype)
    if size is None:
        raise _invalid(f"element type at offset {pos} is not a Thrift type ({ttype})")
    return size


def _skip(data: bytes, pos: int, ttype: int, depth: int) -> int:
    """The offset after the value of type ``ttype`` at ``pos``, nested ``depth`` levels deep."""
    size = _FIXED_SIZES.get(ttype)
    if size is not None:
        return _take(data, pos, size, _TYPE_NAMES[ttype])
    if ttype == _STRING:
        return pos + 4 + _count(data, pos, 1, "string")
    if ttype not in (_STRUCT, _MAP, _LIST, _SET):
        raise _invalid(f"value at offset {pos} has no Thrift type ({ttype})")
    if depth > MAX_DEPTH:
        raise _invalid(f"values nested deeper than {MAX_DEPTH} levels")
    if ttype == _STRUCT:
        while True:
            _take(data, pos, 1, "field type")
            field_type = data[pos]
            if field_type == _STOP:
                return pos + 1
            pos = _skip(data, _take(data, pos, 3, "field header"), field_type, depth + 1)
    header = 2 if ttype == _MAP else 1
    _take(data, pos, header, f"{_TYPE_NAMES[ttype]} element types")
    types = tuple(data[pos : pos + header])
    unit = sum(_min_size(element_type, pos) for element_type in types)
    pos += header
    count = _count(data, pos, unit, _TYPE_NAMES[ttype])
    pos += 4
    if all(element_type in _FIXED_SIZES for element_type in types):
        return pos + count * unit
    for _ in range(count):
        for element_type in types:
            pos = _skip(data, pos, element_type, depth + 1)
    return pos


def decode(data: bytes) -> CollectorPayload:
    """The collector record in ``data``; :class:`BadInput` ``invalid_thrift`` if it is not one."""
    values: list[Any] = [None] * len(_FIELDS)
    pos = 0
    end = len(data)
    while True:
        if pos >= end:
            raise _cut_short(data, pos, 1, "field type")
        field_type = data[pos]
        if field_type == _STOP:
            pos += 1
            break
        if pos + 3 > end:
            raise _cut_short(data, pos, 3, "field header")
        (thrift_id,) = _FIELD_ID.unpack_from(data, pos + 1)
        pos += 3
        index = _INDEX_BY_ID.get(thrift_id)
        if index is None:
            pos = _skip(data, pos, field_type, 1)
            continue
        field = _FIELDS[index]
        if field_type != field.ttype:
            raise _invalid(
                f"{field.name} ({thrift_id}) has type {_type_name(field_type)}, "
                f"not {_type_name(field.ttype)}"
            )
        if field_type == _STRING:
            values[index], pos = _read_string(data, pos, field.name)
        elif field_type == _I64:
            _take(data, pos, 8, field.name)
            (values[index],) = _I64_STRUCT.unpack_from(data, pos)
            pos += 8
        else:
            values[index], pos = _read_strings(data, pos, field.name)
    if pos != end:
        raise _invalid(f"{end - pos} bytes after the end of the record")
    for index in _REQUIRED:
        if values[index] is None:
            field = _FIELDS[index]
            raise _invalid(f"no {field.name} ({field.thrift_id})")
    payload = CollectorPayload(*values)
    if not _COLLECTOR_PAYLOAD_1_0.fullmatch(payload.schema):
        raise _invalid(f"schema {_show(payload.schema)} is not CollectorPayload 1-0-*")
    return payload


def encode(payload: CollectorPayload) -> bytes:
    """The record of ``payload``, as the collector writes it."""
    parts: list[bytes] = []
    append = parts.append
    for field, value in zip(_FIELDS, _values(payload), strict=True):
        if value is None:
            continue
        append(field.header)
        if field.ttype == _STRING:
            raw = value.encode()
            append(_I32_STRUCT.pack(len(raw)))
            append(raw)
        elif field.ttype == _I64:
            append(_I64_STRUCT.pack(value))
        else:
            append(bytes([_STRING]))
            append(_I32_STRUCT.pack(len(value)))
            for item in value:
                raw = item.encode()
                append(_I32_STRUCT.pack(len(raw)))
                append(raw)
    append(bytes([_STOP]))
    return b"".join(parts)


def events(payload: CollectorPayload) -> list[dict[str, str]] | None:
    """The tracker-protocol events ``payload`` carries, or ``None`` for a path that carries
    none the enricher reads. :class:`BadInput` ``not_payload_data`` if a pixel request has no
    parameters, or a tracker-protocol-2 body is not a ``payload_data`` of string fields."""
    if payload.path == PIXEL_PATH:
        return [_pixel_event(payload)]
    if payload.path == TP2_PATH:
        return _payload_data(payload)[1]
    return None


def with_events(payload: CollectorPayload, events: list[dict[str, str]]) -> CollectorPayload:
    """``payload`` carrying ``events`` instead of its own, every other field unchanged: a pixel
    request's one event as its querystring, a tracker-protocol-2 request's events as its body,
    under the ``payload_data`` schema it had. ``ValueError`` for a path that carries no events,
    no events, or more than one for a pixel request; :class:`BadInput` ``not_payload_data`` if
    the body it had is not a ``payload_data``."""
    if payload.path == PIXEL_PATH:
        if len(events) != 1:
            raise ValueError(f"a pixel request carries one event, not {len(events)}")
        return replace(payload, querystring=urlencode(events[0], encoding="utf-8"))
    if payload.path == TP2_PATH:
        if not events:
            raise ValueError("a payload_data body carries at least one event")
        schema, _ = _payload_data(payload)
        return replace(payload, body=orjson.dumps({"schema": schema, "data": events}).decode())
    raise ValueError(f"a request to {_show(payload.path)} carries no events")


def _pixel_event(payload: CollectorPayload) -> dict[str, str]:
    # Form-urlencoded: '+' is a space, percent-escapes are UTF-8 (the collector always records
    # UTF-8; bytes that are not become U+FFFD), a malformed escape stays as it is, and a name
    # without '=' has the value ''. dict() keeps the last value of a repeated name, as Enrich.
    querystring = payload.querystring or ""
    event = dict(parse_qsl(querystring, keep_blank_values=True, encoding="utf-8", errors="replace"))
    if not event:
        raise _not_payload_data("a pixel request without querystring parameters")
    return event


def _payload_data(payload: CollectorPayload) -> tuple[str, list[dict[str, str]]]:
    """The schema and the events of a tracker-protocol-2 body."""
    if payload.body is None:
        raise _not_payload_data("a tracker-protocol-2 request without a body")
    try:
        document = orjson.loads(payload.body)
    except orjson.JSONDecodeError as error:
        raise _not_payload_data(f"the body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise _not_payload_data(f"the body is {_show(document)}, not an object")
    schema = document.get("schema")
    if not isinstance(schema, str) or not _PAYLOAD_DATA_1_0.fullmatch(schema):
        raise _not_payload_data(f"the body's schema {_show(schema)} is not payload_data 1-0-*")
    data = document.get("data")
    if not isinstance(data, list):
        raise _not_payload_data(f"the body's data is {_show(data)}, not a list of events")
    if not data:
        raise _not_payload_data("the body's data is an empty list")
    for position, event in enumerate(data):
        if not isinstance(event, dict):
            raise _not_payload_data(f"event {position} is {_show(event)}, not an object")
        for name, value in event.items():
            if not isinstance(value, str):
                raise _not_payload_data(
                    f"event {position}: {_show(name)} is {_show(value)}, not a string"
                )
    return schema, data


def _show(value: object) -> str:
    """``value`` in an error detail: a string quoted and cut to 80 characters, anything else
    (JSON) by its type."""
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an object" if isinstance(value, dict) else "a list"
