"""The collector-record codec: Snowplow's Thrift CollectorPayload, and the events it carries."""

from __future__ import annotations

import struct
import tracemalloc
from dataclasses import FrozenInstanceError, replace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enricher.codecs.collector import (
    COLLECTOR_PAYLOAD_SCHEMA,
    MAX_DEPTH,
    PAYLOAD_DATA_SCHEMA,
    CollectorPayload,
    decode,
    encode,
    events,
    with_events,
)
from enricher.errors import BadInput

PROPERTIES = settings(max_examples=200, derandomize=True, database=None, deadline=None)
Event = dict[str, str]
Value = tuple[int, bytes]
"""A Thrift value in the binary protocol: its type id, and its bytes."""

# --- Golden records, written byte by byte from the binary protocol ------------------------------
#
# A struct is its fields, each a type byte, a big-endian i16 field id and the value, then a stop
# byte (0). A string is a big-endian i32 byte count and UTF-8 bytes; an i64 eight big-endian
# bytes; a list its element type byte, a big-endian i32 count and the elements. Type ids:
# 0x0a i64, 0x0b string, 0x0f list. The collector (Java's Thrift library) writes fields in id
# order and leaves absent optional fields out.

GET_RECORD = (
    # 100 ipAddress: string, id 0x0064, 11 bytes
    b"\x0b\x00\x64" + b"\x00\x00\x00\x0b" + b"203.0.113.9"
    # 200 timestamp: i64, id 0x00c8, 1700000000123 ms = 0x0000018bcfe5687b
    + b"\x0a\x00\xc8" + b"\x00\x00\x01\x8b\xcf\xe5\x68\x7b"
    # 210 encoding: string, id 0x00d2, 5 bytes
    + b"\x0b\x00\xd2" + b"\x00\x00\x00\x05" + b"UTF-8"
    # 220 collector: string, id 0x00dc, 15 bytes
    + b"\x0b\x00\xdc" + b"\x00\x00\x00\x0f" + b"ssc-3.2.0-kafka"
    # 300 userAgent: string, id 0x012c, 70 bytes
    + b"\x0b\x01\x2c" + b"\x00\x00\x00\x46"
    + b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
    # 310 refererUri: string, id 0x0136, 26 bytes ("é" is the two bytes c3 a9)
    + b"\x0b\x01\x36" + b"\x00\x00\x00\x1a" + b"https://shop.example/caf\xc3\xa9"
    # 320 path: string, id 0x0140, 2 bytes
    + b"\x0b\x01\x40" + b"\x00\x00\x00\x02" + b"/i"
    # 330 querystring: string, id 0x014a, 142 bytes
    + b"\x0b\x01\x4a" + b"\x00\x00\x00\x8e"
    + b"e=pv&page=Caf%C3%A9+cr%C3%A8me&url=https%3A%2F%2Fshop.example%2Fcaf%C3%A9&refr="
    + b"&tv=js-3.17.0&aid=shop&eid=5a305bf5-32fc-40d9-b0e8-66052f0f2c95"
    # (no 340 body, no 360 contentType: a GET has neither)
    # 350 headers: list, id 0x015e, of strings (0x0b), 2 elements
    + b"\x0f\x01\x5e" + b"\x0b" + b"\x00\x00\x00\x02"
    + b"\x00\x00\x00\x17" + b"Host: collector.example"
    + b"\x00\x00\x00\x2f" + b"Cookie: sp=c0ffee00-1234-4abc-8def-0123456789ab"
    # 400 hostname: string, id 0x0190, 17 bytes
    + b"\x0b\x01\x90" + b"\x00\x00\x00\x11" + b"collector.example"
    # 410 networkUserId: string, id 0x019a, 36 bytes
    + b"\x0b\x01\x9a" + b"\x00\x00\x00\x24" + b"c0ffee00-1234-4abc-8def-0123456789ab"
    # 31337 schema: string, id 0x7a69, 65 bytes
    + b"\x0b\x7a\x69" + b"\x00\x00\x00\x41"
    + b"iglu:com.snowplowanalytics.snowplow/CollectorPayload/thrift/1-0-0"
    # stop
    + b"\x00"
)  # fmt: skip
GET_PAYLOAD = CollectorPayload(
    ip_address="203.0.113.9",
    timestamp=1_700_000_000_123,
    encoding="UTF-8",
    collector="ssc-3.2.0-kafka",
    user_agent="Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
    referer_uri="https://shop.example/café",
    path="/i",
    querystring=(
        "e=pv&page=Caf%C3%A9+cr%C3%A8me&url=https%3A%2F%2Fshop.example%2Fcaf%C3%A9&refr="
        "&tv=js-3.17.0&aid=shop&eid=5a305bf5-32fc-40d9-b0e8-66052f0f2c95"
    ),
    headers=("Host: collector.example", "Cookie: sp=c0ffee00-1234-4abc-8def-0123456789ab"),
    hostname="collector.example",
    network_user_id="c0ffee00-1234-4abc-8def-0123456789ab",
    schema="iglu:com.snowplowanalytics.snowplow/CollectorPayload/thrift/1-0-0",
)
GET_EVENT = {
    "e": "pv",
    "page": "Café crème",
    "url": "https://shop.example/café",
    "refr": "",
    "tv": "js-3.17.0",
    "aid": "shop",
    "eid": "5a305bf5-32fc-40d9-b0e8-66052f0f2c95",
}

POST_BODY = (
    b'{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4","data":['
    b'{"e":"ue","eid":"7f3b9a52-2d4e-4d1a-9c3e-5b8f0e6a1c2d","p":"mob","tv":"andr-6.0.0",'
    b'"dtm":"1700000000001","stm":"1700000000002"},'
    b'{"e":"pv","eid":"0b6c1d8e-8f0a-4e3b-a6d2-3c9e7f1b5a40","p":"mob","tv":"andr-6.0.0",'
    b'"url":"app://home"}]}'
)
POST_RECORD = (
    # 100 ipAddress: string, id 0x0064, 11 bytes
    b"\x0b\x00\x64" + b"\x00\x00\x00\x0b" + b"2001:db8::7"
    # 200 timestamp: i64, id 0x00c8, 1700000123456 ms = 0x0000018bcfe74a40
    + b"\x0a\x00\xc8" + b"\x00\x00\x01\x8b\xcf\xe7\x4a\x40"
    # 210 encoding: string, id 0x00d2, 5 bytes
    + b"\x0b\x00\xd2" + b"\x00\x00\x00\x05" + b"UTF-8"
    # 220 collector: string, id 0x00dc, 15 bytes
    + b"\x0b\x00\xdc" + b"\x00\x00\x00\x0f" + b"ssc-3.2.0-kafka"
    # 300 userAgent: string, id 0x012c, 13 bytes
    + b"\x0b\x01\x2c" + b"\x00\x00\x00\x0d" + b"okhttp/4.12.0"
    # (no 310 refererUri: a mobile tracker sends none)
    # 320 path: string, id 0x0140, 35 bytes
    + b"\x0b\x01\x40" + b"\x00\x00\x00\x23" + b"/com.snowplowanalytics.snowplow/tp2"
    # (no 330 querystring)
    # 340 body: string, id 0x0154, 318 bytes = 0x013e
    + b"\x0b\x01\x54" + b"\x00\x00\x01\x3e" + POST_BODY
    # 350 headers: list, id 0x015e, of strings (0x0b), 2 elements
    + b"\x0f\x01\x5e" + b"\x0b" + b"\x00\x00\x00\x02"
    + b"\x00\x00\x00\x17" + b"Host: collector.example"
    + b"\x00\x00\x00\x2d" + b"Content-Type: application/json; charset=UTF-8"
    # 360 contentType: string, id 0x0168, 31 bytes
    + b"\x0b\x01\x68" + b"\x00\x00\x00\x1f" + b"application/json; charset=UTF-8"
    # 400 hostname: string, id 0x0190, 17 bytes
    + b"\x0b\x01\x90" + b"\x00\x00\x00\x11" + b"collector.example"
    # 410 networkUserId: string, id 0x019a, 36 bytes
    + b"\x0b\x01\x9a" + b"\x00\x00\x00\x24" + b"0d4e7c1a-9b2f-4c3d-8e5a-6f7b8c9d0e1f"
    # 31337 schema: string, id 0x7a69, 65 bytes
    + b"\x0b\x7a\x69" + b"\x00\x00\x00\x41"
    + b"iglu:com.snowplowanalytics.snowplow/CollectorPayload/thrift/1-0-0"
    # stop
    + b"\x00"
)  # fmt: skip
POST_PAYLOAD = CollectorPayload(
    ip_address="2001:db8::7",
    timestamp=1_700_000_123_456,
    encoding="UTF-8",
    collector="ssc-3.2.0-kafka",
    user_agent="okhttp/4.12.0",
    path="/com.snowplowanalytics.snowplow/tp2",
    body=POST_BODY.decode(),
    headers=("Host: collector.example", "Content-Type: application/json; charset=UTF-8"),
    content_type="application/json; charset=UTF-8",
    hostname="collector.example",
    network_user_id="0d4e7c1a-9b2f-4c3d-8e5a-6f7b8c9d0e1f",
)
POST_EVENTS = [
    {
        "e": "ue",
        "eid": "7f3b9a52-2d4e-4d1a-9c3e-5b8f0e6a1c2d",
        "p": "mob",
        "tv": "andr-6.0.0",
        "dtm": "1700000000001",
        "stm": "1700000000002",
    },
    {
        "e": "pv",
        "eid": "0b6c1d8e-8f0a-4e3b-a6d2-3c9e7f1b5a40",
        "p": "mob",
        "tv": "andr-6.0.0",
        "url": "app://home",
    },
]
GOLDEN = [(GET_RECORD, GET_PAYLOAD), (POST_RECORD, POST_PAYLOAD)]


@pytest.mark.parametrize(("record", "payload"), GOLDEN, ids=["get", "post"])
def test_golden_record_decodes_and_encodes_back_byte_for_byte(
    record: bytes, payload: CollectorPayload
) -> None:
    assert decode(record) == payload
    assert encode(payload) == record


def test_payload_is_frozen_and_slotted() -> None:
    with pytest.raises(FrozenInstanceError):
        GET_PAYLOAD.path = "/x"  # type: ignore[misc]
    assert not hasattr(GET_PAYLOAD, "__dict__")
    assert GET_PAYLOAD.schema == COLLECTOR_PAYLOAD_SCHEMA
    assert (
        PAYLOAD_DATA_SCHEMA == "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
    )


# --- Building records by hand -------------------------------------------------------------------


def header(ttype: int, field_id: int) -> bytes:
    return struct.pack(">bh", ttype, field_id)


def i32(value: int) -> bytes:
    return struct.pack(">i", value)


def string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return i32(len(raw)) + raw


IP = header(11, 100) + string("192.0.2.1")
TIMESTAMP = header(10, 200) + struct.pack(">q", 1_700_000_000_000)
ENCODING = header(11, 210) + string("UTF-8")
COLLECTOR = header(11, 220) + string("ssc-3.2.0-kafka")
SCHEMA = header(11, 31337) + string(COLLECTOR_PAYLOAD_SCHEMA)
REQUIRED = {"ipAddress": IP, "timestamp": TIMESTAMP, "encoding": ENCODING}
REQUIRED |= {"collector": COLLECTOR, "schema": SCHEMA}
MINIMAL_RECORD = b"".join(REQUIRED.values()) + b"\x00"
MINIMAL = CollectorPayload(
    ip_address="192.0.2.1",
    timestamp=1_700_000_000_000,
    encoding="UTF-8",
    collector="ssc-3.2.0-kafka",
)


def record(*fields: bytes) -> bytes:
    return b"".join(fields) + b"\x00"


def test_minimal_record() -> None:
    assert decode(MINIMAL_RECORD) == MINIMAL
    assert encode(MINIMAL) == MINIMAL_RECORD


def test_fields_in_any_order_decode() -> None:
    assert decode(record(*reversed(REQUIRED.values()))) == MINIMAL


def test_a_repeated_field_keeps_its_last_value() -> None:
    again = header(11, 100) + string("198.51.100.2")
    assert decode(record(*REQUIRED.values(), again)).ip_address == "198.51.100.2"


def test_any_collector_payload_1_0_schema_decodes() -> None:
    later = COLLECTOR_PAYLOAD_SCHEMA.replace("1-0-0", "1-0-12")
    assert decode(encode(replace(MINIMAL, schema=later))).schema == later


# --- Round trip ---------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
"""Any text UTF-8 can carry: every code point but the surrogates."""
OPTIONAL_TEXT = st.none() | TEXT


@st.composite
def payloads(draw: st.DrawFn) -> CollectorPayload:
    return CollectorPayload(
        ip_address=draw(TEXT),
        timestamp=draw(st.integers(-(2**63), 2**63 - 1)),
        encoding=draw(TEXT),
        collector=draw(TEXT),
        user_agent=draw(OPTIONAL_TEXT),
        referer_uri=draw(OPTIONAL_TEXT),
        path=draw(OPTIONAL_TEXT),
        querystring=draw(OPTIONAL_TEXT),
        body=draw(OPTIONAL_TEXT),
        headers=draw(st.none() | st.lists(TEXT, max_size=5).map(tuple)),
        content_type=draw(OPTIONAL_TEXT),
        hostname=draw(OPTIONAL_TEXT),
        network_user_id=draw(OPTIONAL_TEXT),
        schema=draw(st.integers(0, 99).map(lambda n: COLLECTOR_PAYLOAD_SCHEMA[:-1] + str(n))),
    )


@PROPERTIES
@given(payloads())
def test_decode_encode_round_trip(payload: CollectorPayload) -> None:
    data = encode(payload)
    assert decode(data) == payload
    assert encode(decode(data)) == data


# --- Fields the codec does not know -------------------------------------------------------------

STRUCT_VALUE = (
    header(11, 1) + string("a")  # string field
    + header(12, 2) + header(8, 1) + i32(7) + b"\x00"  # struct field holding an i32 field
    + header(15, 3) + b"\x0b" + i32(1) + string("b")  # list<string> field
    + b"\x00"
)  # fmt: skip
UNKNOWN_VALUES: dict[str, Value] = {
    "bool": (2, b"\x01"),
    "byte": (3, b"\xff"),
    "double": (4, struct.pack(">d", -1.5)),
    "i16": (6, b"\x80\x00"),
    "i32": (8, b"\x7f\xff\xff\xff"),
    "i64": (10, b"\x00" * 7 + b"\x2a"),
    "string": (11, string("ünknown")),
    "binary": (11, string(b"\xff\xfe\x00")),  # not UTF-8: nobody reads it
    "empty string": (11, string("")),
    "uuid": (16, bytes(range(16))),
    "empty struct": (12, b"\x00"),
    "struct": (12, STRUCT_VALUE),
    "list<i16>": (15, b"\x06" + i32(3) + b"\x00\x01\x00\x02\x00\x03"),
    "set<string>": (14, b"\x0b" + i32(2) + string("x") + string("y")),
    "list<struct>": (15, b"\x0c" + i32(2) + STRUCT_VALUE + b"\x00"),
    "list<list<i32>>": (15, b"\x0f" + i32(2) + b"\x08" + i32(1) + i32(5) + b"\x08" + i32(0)),
    "empty list": (15, b"\x0c" + i32(0)),
    "map<i32,bool>": (13, b"\x08\x02" + i32(2) + i32(1) + b"\x00" + i32(2) + b"\x01"),
    "map<string,struct>": (
        13,
        b"\x0b\x0c" + i32(2) + string("k1") + b"\x00" + string("k2") + STRUCT_VALUE,
    ),
    "map<string,map<i64,list<double>>>": (
        13,
        b"\x0b\x0d"
        + i32(1)
        + string("k")
        + b"\x0a\x0f"
        + i32(1)
        + b"\x00" * 8
        + b"\x04"
        + i32(2)
        + struct.pack(">dd", 0.5, 2.0),
    ),
    "empty map": (13, b"\x0b\x0b" + i32(0)),
}


@pytest.mark.parametrize("position", [0, 2, 5])
@pytest.mark.parametrize("field_id", [1, 101, 32767, -1])
@pytest.mark.parametrize("name", list(UNKNOWN_VALUES))
def test_unknown_fields_of_every_type_are_skipped(name: str, field_id: int, position: int) -> None:
    ttype, value = UNKNOWN_VALUES[name]
    fields = list(REQUIRED.values())
    fields.insert(position, header(ttype, field_id) + value)
    data = record(*fields)
    assert decode(data) == MINIMAL
    assert encode(decode(data)) == MINIMAL_RECORD  # re-encoding leaves unknown fields out


def homogeneous(container: int, items: list[Value]) -> Value:
    """A list or set (``container``) of the items of the first item's type."""
    element_type = items[0][0] if items else 8
    same = [value for ttype, value in items if ttype == element_type]
    return container, bytes([element_type]) + i32(len(same)) + b"".join(same)


def homogeneous_map(pairs: list[tuple[Value, Value]]) -> Value:
    key_type, value_type = (pairs[0][0][0], pairs[0][1][0]) if pairs else (11, 11)
    same = [k + v for (kt, k), (vt, v) in pairs if (kt, vt) == (key_type, value_type)]
    return 13, bytes([key_type, value_type]) + i32(len(same)) + b"".join(same)


def thrift_struct(fields: list[tuple[int, Value]]) -> Value:
    return 12, b"".join(header(ttype, fid) + value for fid, (ttype, value) in fields) + b"\x00"


def extend(children: st.SearchStrategy[Value]) -> st.SearchStrategy[Value]:
    items = st.lists(children, max_size=4)
    return st.one_of(
        items.map(lambda values: homogeneous(15, values)),
        items.map(lambda values: homogeneous(14, values)),
        st.lists(st.tuples(children, children), max_size=3).map(homogeneous_map),
        st.lists(st.tuples(st.integers(-(2**15), 2**15 - 1), children), max_size=4).map(
            thrift_struct
        ),
    )


THRIFT_VALUES: st.SearchStrategy[Value] = st.recursive(
    st.one_of(
        st.booleans().map(lambda v: (2, bytes([v]))),
        st.integers(-128, 127).map(lambda v: (3, struct.pack(">b", v))),
        st.floats().map(lambda v: (4, struct.pack(">d", v))),
        st.integers(-(2**15), 2**15 - 1).map(lambda v: (6, struct.pack(">h", v))),
        st.integers(-(2**31), 2**31 - 1).map(lambda v: (8, i32(v))),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: (10, struct.pack(">q", v))),
        st.binary(max_size=20).map(lambda v: (11, string(v))),
        st.binary(min_size=16, max_size=16).map(lambda v: (16, v)),
    ),
    extend,
    max_leaves=25,
)
KNOWN_IDS = {100, 200, 210, 220, 300, 310, 320, 330, 340, 350, 360, 400, 410, 31337}
UNKNOWN_IDS = st.integers(-(2**15), 2**15 - 1).filter(lambda fid: fid not in KNOWN_IDS)


@PROPERTIES
@given(st.data(), st.lists(st.tuples(UNKNOWN_IDS, THRIFT_VALUES), min_size=1, max_size=4))
def test_arbitrary_unknown_fields_are_skipped(
    data: st.DataObject, unknown: list[tuple[int, Value]]
) -> None:
    fields = list(REQUIRED.values())
    for fid, (ttype, value) in unknown:
        fields.insert(data.draw(st.integers(0, len(fields))), header(ttype, fid) + value)
    assert decode(record(*fields)) == MINIMAL


def test_nesting_up_to_the_limit_is_skipped() -> None:
    structs = header(12, 1) * MAX_DEPTH + b"\x00" * MAX_DEPTH  # MAX_DEPTH structs, nested
    lists = (b"\x0f" + i32(1)) * (MAX_DEPTH - 1) + b"\x08" + i32(1) + i32(9)
    assert decode(record(structs, *REQUIRED.values())) == MINIMAL
    assert decode(record(header(15, 1) + lists, *REQUIRED.values())) == MINIMAL


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_nesting_beyond_the_limit_is_invalid_not_a_recursion_error(depth: int) -> None:
    structs = header(12, 1) * depth + b"\x00" * depth
    lists = header(15, 1) + (b"\x0f" + i32(1)) * (depth - 1) + b"\x08" + i32(0)
    for nested in (structs, lists):
        with pytest.raises(BadInput) as caught:
            decode(record(nested, *REQUIRED.values()))
        assert caught.value.reason == "invalid_thrift"
        assert f"deeper than {MAX_DEPTH}" in caught.value.detail


# --- Records that are not CollectorPayloads -----------------------------------------------------

INVALID: list[tuple[str, bytes, str]] = [
    ("empty", b"", "cut short"),
    ("no stop byte", b"".join(REQUIRED.values()), "cut short"),
    ("half a field header", IP + b"\x0b\x00", "cut short"),
    ("string past the end", header(11, 100) + i32(20) + b"192.0.2.1", "claims 20 bytes"),
    ("negative length", header(11, 100) + i32(-1) + b"\x00", "claims -1 bytes"),
    ("half an i64", IP + header(10, 200) + b"\x00\x00\x01", "cut short"),
    ("trailing bytes", MINIMAL_RECORD + b"\x00", "1 bytes after the end"),
    ("a second record", MINIMAL_RECORD * 2, "bytes after the end"),
    ("ipAddress an i32", record(header(8, 100) + i32(1), *REQUIRED.values()), "not string"),
    ("timestamp a string", record(header(11, 200) + string("1"), IP), "not i64"),
    ("headers a set", record(header(14, 350) + b"\x0b" + i32(0), IP), "not list"),
    ("headers of i32", record(header(15, 350) + b"\x08" + i32(0), IP), "list of i32"),
    ("path a struct", record(header(12, 320) + b"\x00", IP), "not string"),
    ("unknown field type 1 (void)", record(IP, header(1, 7)), "no Thrift type (1)"),
    ("unknown field type 5", record(IP, header(5, 7) + b"\x00"), "no Thrift type (5)"),
    ("unknown field type 0x80", record(IP, b"\x80\x00\x07"), "no Thrift type (128)"),
    ("list of type 9", record(header(15, 7) + b"\x09" + i32(0), IP), "not a Thrift type (9)"),
    ("map to type 0", record(header(13, 7) + b"\x0b\x00" + i32(0), IP), "not a Thrift type (0)"),
    ("querystring not UTF-8", record(header(11, 330) + string(b"e=\xe9"), IP), "not UTF-8"),
    ("surrogate in UTF-8", record(header(11, 300) + string(b"\xed\xa0\x80"), IP), "not UTF-8"),
    ("header not UTF-8", record(header(15, 350) + b"\x0b" + i32(1) + string(b"\xc3")), "UTF-8"),
    (
        "other schema",
        b"".join(v for k, v in REQUIRED.items() if k != "schema")
        + header(11, 31337)
        + string(COLLECTOR_PAYLOAD_SCHEMA.replace("1-0-0", "2-0-0"))
        + b"\x00",
        "not CollectorPayload 1-0-*",
    ),
    (
        "not self-describing",
        b"".join(v for k, v in REQUIRED.items() if k != "schema")
        + header(11, 31337)
        + string("CollectorPayload")
        + b"\x00",
        "not CollectorPayload 1-0-*",
    ),
    *[
        (
            f"no {name}",
            record(*(v for k, v in REQUIRED.items() if k != name)),
            f"no {name}",
        )
        for name in REQUIRED
    ],
]


@pytest.mark.parametrize(("data", "detail"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_records(data: bytes, detail: str) -> None:
    with pytest.raises(BadInput) as caught:
        decode(data)
    assert caught.value.reason == "invalid_thrift"
    assert detail in caught.value.detail
    assert len(caught.value.detail) < 200


HUGE = 0x7FFF_FFFF
FORGED: dict[str, bytes] = {
    "string length": header(11, 100) + i32(HUGE) + b"x" * 100,
    "headers count": record(IP, header(15, 350) + b"\x0b" + i32(HUGE) + string("h") * 100),
    "unknown string length": record(header(11, 7) + i32(HUGE) + b"x" * 100),
    "unknown list<i64> count": record(header(15, 7) + b"\x0a" + i32(HUGE) + b"\x00" * 800),
    "unknown list<struct> count": record(header(15, 7) + b"\x0c" + i32(HUGE) + b"\x00" * 100),
    "unknown map count": record(header(13, 7) + b"\x0b\x0b" + i32(HUGE) + b"\x00" * 800),
    "nested list count": record(header(15, 7) + b"\x0f" + i32(1) + b"\x0f" + i32(HUGE)),
    "negative list count": record(header(15, 7) + b"\x0b" + i32(-5)),
}


@pytest.mark.parametrize("data", FORGED.values(), ids=list(FORGED))
def test_a_forged_length_fails_fast_without_allocating(data: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(BadInput) as caught:
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason == "invalid_thrift"
    assert "claims" in caught.value.detail
    assert peak < 64 * 1024  # a 2 GiB string or a 2-billion-element list would show


def decodes_or_is_invalid(data: bytes) -> None:
    """``data`` decodes to a payload that encodes to a record decoding to it again, or it is
    ``invalid_thrift``: never another exception."""
    try:
        payload = decode(data)
    except BadInput as error:
        assert error.reason == "invalid_thrift"
        assert error.detail
    else:
        assert decode(encode(payload)) == payload


@PROPERTIES
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    decodes_or_is_invalid(data)


@PROPERTIES
@given(st.lists(st.tuples(st.integers(-(2**15), 2**15 - 1), THRIFT_VALUES), max_size=6))
def test_arbitrary_structs(fields: list[tuple[int, Value]]) -> None:
    """Well-formed Thrift of any shape, known field ids included (mostly of the wrong type)."""
    decodes_or_is_invalid(thrift_struct(fields)[1])


@pytest.mark.parametrize(("full", "_payload"), GOLDEN, ids=["get", "post"])
def test_every_truncation_is_invalid(full: bytes, _payload: CollectorPayload) -> None:
    for size in range(len(full)):
        with pytest.raises(BadInput) as caught:
            decode(full[:size])
        assert caught.value.reason == "invalid_thrift"


@PROPERTIES
@given(st.sampled_from([GET_RECORD, POST_RECORD, MINIMAL_RECORD]), st.data())
def test_bit_flips(data: bytes, draw: st.DataObject) -> None:
    flipped = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 3))):
        position = draw.draw(st.integers(0, len(data) - 1))
        flipped[position] ^= 1 << draw.draw(st.integers(0, 7))
    decodes_or_is_invalid(bytes(flipped))


# --- Events -------------------------------------------------------------------------------------


def test_pixel_event_from_the_querystring() -> None:
    assert events(GET_PAYLOAD) == [GET_EVENT]


def test_pixel_querystring_decoding() -> None:
    querystring = "a=x+y%2Bz&b=%E2%82%AC%20%26%3D&c=&d&e=%zz&f=%C3&aid=first&aid=last"
    [event] = events(replace(GET_PAYLOAD, querystring=querystring)) or []
    assert event == {
        "a": "x y+z",  # '+' is a space, '%2B' a plus
        "b": "€ &=",  # percent-escapes are UTF-8
        "c": "",  # blank values are kept
        "d": "",
        "e": "%zz",  # a broken escape is taken as it is
        "f": "\ufffd",  # a byte that is not UTF-8 is the replacement character
        "aid": "last",  # a repeated parameter keeps its last value
    }


def test_tp2_events_from_the_body() -> None:
    assert events(POST_PAYLOAD) == POST_EVENTS


def test_tp2_with_three_events() -> None:
    three = [{"e": "pv", "eid": str(n), "url": f"https://shop.example/{n}"} for n in range(3)]
    body = orjson.dumps({"schema": PAYLOAD_DATA_SCHEMA, "data": three}).decode()
    assert events(replace(POST_PAYLOAD, body=body)) == three


@pytest.mark.parametrize("version", ["1-0-0", "1-0-3", "1-0-4", "1-0-17"])
def test_tp2_payload_data_1_0_any(version: str) -> None:
    body = orjson.dumps({"schema": PAYLOAD_DATA_SCHEMA[:-5] + version, "data": [{"e": "pv"}]})
    assert events(replace(POST_PAYLOAD, body=body.decode())) == [{"e": "pv"}]


@pytest.mark.parametrize(
    "path",
    [None, "/", "/r/tp2", "/com.snowplowanalytics.iglu/v1", "/com.acme/track", "/i/", "/I"],
)
def test_other_paths_carry_no_events(path: str | None) -> None:
    assert events(replace(GET_PAYLOAD, path=path)) is None
    assert events(replace(POST_PAYLOAD, path=path)) is None


def body(document: object) -> str:
    return orjson.dumps(document).decode()


NOT_PAYLOAD_DATA: list[tuple[str, str | None, str]] = [
    ("no body", None, "without a body"),
    ("empty body", "", "not JSON"),
    ("bad JSON", '{"schema": ', "not JSON"),
    ("a lone surrogate", '{"schema": "\\ud800"}', "not JSON"),
    ("a list", body([{"e": "pv"}]), "body is a list, not an object"),
    ("a string", body("e=pv"), "body is 'e=pv', not an object"),
    ("no schema", body({"data": [{"e": "pv"}]}), "schema null"),
    ("other schema", body({"schema": PAYLOAD_DATA_SCHEMA[:-5] + "2-0-0", "data": []}), "1-0-*"),
    (
        "contexts schema",
        body({"schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0"}),
        "is not payload_data",
    ),
    ("schema a number", body({"schema": 1, "data": [{"e": "pv"}]}), "schema a number"),
    ("no data", body({"schema": PAYLOAD_DATA_SCHEMA}), "data is null"),
    ("data an object", body({"schema": PAYLOAD_DATA_SCHEMA, "data": {"e": "pv"}}), "an object"),
    ("empty data", body({"schema": PAYLOAD_DATA_SCHEMA, "data": []}), "empty list"),
    ("event a string", body({"schema": PAYLOAD_DATA_SCHEMA, "data": ["e=pv"]}), "event 0 is"),
    (
        "event a list",
        body({"schema": PAYLOAD_DATA_SCHEMA, "data": [{"e": "pv"}, [["e", "pv"]]]}),
        "event 1 is a list",
    ),
    *[
        (
            f"value {name}",
            body({"schema": PAYLOAD_DATA_SCHEMA, "data": [{"e": "pv", "vid": value}]}),
            f"'vid' is {name}, not a string",
        )
        for name, value in [
            ("a number", 3),
            ("null", None),
            ("a boolean", True),
            ("an object", {"a": "b"}),
            ("a list", ["1"]),
        ]
    ],
]


@pytest.mark.parametrize(
    ("body_", "detail"), [c[1:] for c in NOT_PAYLOAD_DATA], ids=[c[0] for c in NOT_PAYLOAD_DATA]
)
def test_tp2_body_not_payload_data(body_: str | None, detail: str) -> None:
    with pytest.raises(BadInput) as caught:
        events(replace(POST_PAYLOAD, body=body_))
    assert caught.value.reason == "not_payload_data"
    assert detail in caught.value.detail


@pytest.mark.parametrize("querystring", [None, "", "&", "&&"])
def test_pixel_without_parameters_is_not_payload_data(querystring: str | None) -> None:
    with pytest.raises(BadInput) as caught:
        events(replace(GET_PAYLOAD, querystring=querystring))
    assert caught.value.reason == "not_payload_data"


def test_a_long_value_is_cut_in_the_detail() -> None:
    with pytest.raises(BadInput) as caught:
        events(replace(POST_PAYLOAD, body=body({"schema": "x" * 10_000, "data": []})))
    assert len(caught.value.detail) < 200


# --- Carrying other events ----------------------------------------------------------------------

EVENTS = st.dictionaries(TEXT, TEXT, min_size=1, max_size=8)


@PROPERTIES
@given(EVENTS)
def test_pixel_with_events_round_trip(event: Event) -> None:
    payload = with_events(GET_PAYLOAD, [event])
    assert events(payload) == [event]
    assert decode(encode(payload)) == payload
    assert replace(payload, querystring=GET_PAYLOAD.querystring) == GET_PAYLOAD


@PROPERTIES
@given(st.lists(EVENTS, min_size=1, max_size=5))
def test_tp2_with_events_round_trip(new_events: list[Event]) -> None:
    payload = with_events(POST_PAYLOAD, new_events)
    assert events(payload) == new_events
    assert decode(encode(payload)) == payload
    assert replace(payload, body=POST_PAYLOAD.body) == POST_PAYLOAD


def test_with_the_same_events_keeps_the_body() -> None:
    assert with_events(POST_PAYLOAD, POST_EVENTS) == POST_PAYLOAD
    assert encode(with_events(POST_PAYLOAD, POST_EVENTS)) == POST_RECORD


def test_with_events_keeps_the_payload_data_version() -> None:
    old = PAYLOAD_DATA_SCHEMA[:-5] + "1-0-0"
    payload = replace(POST_PAYLOAD, body=body({"schema": old, "data": [{"e": "pv"}]}))
    enriched = with_events(payload, [{"e": "pv", "co": "{}"}])
    assert enriched.body == '{"schema":"' + old + '","data":[{"e":"pv","co":"{}"}]}'


def test_pixel_querystring_is_form_urlencoded() -> None:
    enriched = with_events(GET_PAYLOAD, [{"e": "pv", "page": "Café & co", "x": "a+b=c"}])
    assert enriched.querystring == "e=pv&page=Caf%C3%A9+%26+co&x=a%2Bb%3Dc"


@pytest.mark.parametrize(
    ("payload", "new_events"),
    [
        (GET_PAYLOAD, []),
        (GET_PAYLOAD, [{"e": "pv"}, {"e": "pv"}]),
        (POST_PAYLOAD, []),
        (replace(GET_PAYLOAD, path="/r/tp2"), [{"e": "pv"}]),
        (replace(GET_PAYLOAD, path=None), [{"e": "pv"}]),
    ],
    ids=["pixel-none", "pixel-two", "tp2-none", "redirect", "no-path"],
)
def test_with_events_refuses_what_the_request_cannot_carry(
    payload: CollectorPayload, new_events: list[Event]
) -> None:
    with pytest.raises(ValueError, match="carr"):
        with_events(payload, new_events)


def test_with_events_on_a_body_that_is_not_payload_data() -> None:
    with pytest.raises(BadInput) as caught:
        with_events(replace(POST_PAYLOAD, body="{}"), [{"e": "pv"}])
    assert caught.value.reason == "not_payload_data"
