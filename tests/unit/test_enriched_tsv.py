"""The enriched-event TSV codec: Snowplow Enrich's records, read and written back."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    APPLICATION_ENTITY,
    CLIENT_SESSION,
    SCREEN,
    SCREEN_ENTITY,
    SCREEN_VIEW,
    START_MS,
    UNSTRUCT,
    Json,
    compact,
    event_id,
    self_describing,
)

from enricher.codecs import enriched_tsv
from enricher.codecs.enriched_tsv import FIELDS, INDEX, ContextsColumn
from enricher.errors import BadInput

PROPERTIES = settings(max_examples=200, derandomize=True, database=None, deadline=None)
EID = event_id(1)
EPOCH = datetime(1970, 1, 1)
# 2026-01-01 00:00:00.000 UTC, and the same instant as Enrich writes it.
START = "2026-01-01 00:00:00.000"
CONTEXTS_1_0_0 = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0"
CONTEXTS_1_0_1 = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1"
UA_PARSER = "iglu:com.snowplowanalytics.snowplow/ua_parser_context/jsonschema/1-0-0"
UA_ENTITY: Json = {
    "schema": UA_PARSER,
    "data": {"useragentFamily": "Mobile Safari", "osFamily": "iOS", "deviceFamily": "iPhone"},
}
OUR_ENTITY: Json = {
    "schema": CLIENT_SESSION,
    "data": {"sessionIndex": 7, "sessionId": event_id(9), "storageMechanism": "SQLITE"},
}
SCREEN_VIEW_EVENT: Json = self_describing(SCREEN_VIEW, {"name": "Kasse", "id": event_id(2)})
FIELD_COUNT_REASON: str = "invalid_field_count"
COLUMNS: tuple[ContextsColumn, ...] = ("contexts", "derived_contexts")

# A screen view as Enrich writes it for a mobile tracker: the fields set, every other empty.
MOBILE_SCREEN_VIEW: dict[str, str] = {
    "app_id": "shop-ios",
    "platform": "mob",
    "etl_tstamp": "2026-01-01 00:00:01.250",
    "collector_tstamp": "2026-01-01 00:00:00.900",
    "dvce_created_tstamp": START,
    "event": "unstruct",
    "event_id": EID,
    "name_tracker": "ios-tracker",
    "v_tracker": "ios-6.0.8",
    "v_collector": "ssc-3.2.0-kafka",
    "v_etl": "snowplow-enrich-kafka-5.1.0",
    "user_ipaddress": "203.0.113.9",
    "domain_userid": event_id(3),
    "domain_sessionidx": "4",
    "network_userid": event_id(4),
    "geo_country": "DE",
    "geo_latitude": "52.52",
    "geo_longitude": "13.405",
    "contexts": compact(self_describing(CONTEXTS_1_0_0, [SCREEN_ENTITY, APPLICATION_ENTITY])),
    "unstruct_event": compact(self_describing(UNSTRUCT, SCREEN_VIEW_EVENT)),
    "useragent": "ShopApp/2.4.1 (iPhone; iOS 17.5; Scale/3.00)",
    "br_cookies": "1",
    "os_timezone": "Europe/Berlin",
    "dvce_screenwidth": "1179",
    "dvce_sent_tstamp": "2026-01-01 00:00:00.400",
    "derived_contexts": compact(self_describing(CONTEXTS_1_0_1, [UA_ENTITY])),
    "domain_sessionid": event_id(5),
    "derived_tstamp": "2025-12-31 23:59:59.900",
    "event_vendor": "com.snowplowanalytics.mobile",
    "event_name": "screen_view",
    "event_format": "jsonschema",
    "event_version": "1-0-0",
    "event_fingerprint": "b5c2f1a0e8d94c37",
}


def record(values: Mapping[str, str]) -> bytes:
    """An enriched-event record with ``values`` set, every other field empty."""
    unknown = set(values) - set(FIELDS)
    assert not unknown, unknown
    return "\t".join(values.get(name, "") for name in FIELDS).encode()


def fields_of(values: Mapping[str, str]) -> list[str]:
    return [values.get(name, "") for name in FIELDS]


def reason(error: pytest.ExceptionInfo[BadInput]) -> str:
    return error.value.reason


# --- the field list -------------------------------------------------------------------------------


def test_fields_are_snowplows_131_in_order() -> None:
    assert len(FIELDS) == enriched_tsv.FIELD_COUNT == 131
    assert len(set(FIELDS)) == 131
    assert {name: index for index, name in enumerate(FIELDS)} == INDEX
    assert FIELDS[:10] == (
        "app_id",
        "platform",
        "etl_tstamp",
        "collector_tstamp",
        "dvce_created_tstamp",
        "event",
        "event_id",
        "txn_id",
        "name_tracker",
        "v_tracker",
    )
    assert FIELDS[-7:] == (
        "derived_tstamp",
        "event_vendor",
        "event_name",
        "event_format",
        "event_version",
        "event_fingerprint",
        "true_tstamp",
    )
    positions = {
        "dvce_created_tstamp": 4,
        "event_id": 6,
        "geo_latitude": 22,
        "geo_longitude": 23,
        "contexts": 52,
        "unstruct_event": 58,
        "useragent": 77,
        "dvce_sent_tstamp": 119,
        "derived_contexts": 122,
        "domain_sessionid": 123,
        "true_tstamp": 130,
    }
    assert {name: INDEX[name] for name in positions} == positions


# --- reading --------------------------------------------------------------------------------------


def test_a_mobile_screen_view_is_read() -> None:
    fields = enriched_tsv.split(record(MOBILE_SCREEN_VIEW))
    assert len(fields) == 131
    assert {name: fields[INDEX[name]] for name in MOBILE_SCREEN_VIEW} == MOBILE_SCREEN_VIEW
    assert [fields[i] for i, name in enumerate(FIELDS) if name not in MOBILE_SCREEN_VIEW] == [
        ""
    ] * (131 - len(MOBILE_SCREEN_VIEW))
    assert enriched_tsv.event_id(fields) == EID
    assert enriched_tsv.event_time_ms(fields) == START_MS
    assert enriched_tsv.self_describing(fields) == SCREEN_VIEW_EVENT
    assert enriched_tsv.entities(fields, "contexts") == [SCREEN_ENTITY, APPLICATION_ENTITY]
    assert enriched_tsv.entities(fields, "derived_contexts") == [UA_ENTITY]


def test_an_event_of_another_kind_has_no_self_describing_event_nor_entities() -> None:
    fields = fields_of({"event_id": EID, "event": "struct", "se_category": "shop"})
    assert enriched_tsv.self_describing(fields) is None
    assert enriched_tsv.entities(fields, "contexts") == []
    assert enriched_tsv.entities(fields, "derived_contexts") == []


@pytest.mark.parametrize(
    ("created", "true", "sent", "expected"),
    [
        (START, "2026-01-01 00:00:05.000", "2026-01-01 00:00:09.000", START_MS),
        ("", "2026-01-01 00:00:05.000", "2026-01-01 00:00:09.000", START_MS + 5000),
        ("", "", "2026-01-01 00:00:09.000", START_MS + 9000),
        (START, "", "2026-01-01 00:00:09.000", START_MS),
        (START, "2026-01-01 00:00:05.000", "", START_MS),
    ],
)
def test_event_time_is_created_else_true_else_sent(
    created: str, true: str, sent: str, expected: int
) -> None:
    fields = fields_of(
        {"dvce_created_tstamp": created, "true_tstamp": true, "dvce_sent_tstamp": sent}
    )
    assert enriched_tsv.event_time_ms(fields) == expected


def test_event_time_needs_one_of_the_three() -> None:
    # collector_tstamp and derived_tstamp are the pipeline's, not the event's.
    fields = fields_of({"collector_tstamp": START, "derived_tstamp": START, "etl_tstamp": START})
    with pytest.raises(BadInput) as error:
        enriched_tsv.event_time_ms(fields)
    assert reason(error) == "missing_timestamp"


@pytest.mark.parametrize("name", ["dvce_created_tstamp", "true_tstamp", "dvce_sent_tstamp"])
def test_the_first_timestamp_present_must_be_valid(name: str) -> None:
    """As in the tracker protocol: an invalid time is refused, not skipped for the next."""
    values = {"dvce_created_tstamp": "", "true_tstamp": "", "dvce_sent_tstamp": START}
    values[name] = "2026-01-01T00:00:00.000Z"
    with pytest.raises(BadInput) as error:
        enriched_tsv.event_time_ms(fields_of(values))
    assert reason(error) == "invalid_timestamp"
    assert name in error.value.detail


def test_event_id_must_be_a_uuid() -> None:
    assert enriched_tsv.event_id(fields_of({"event_id": EID.upper()})) == EID.upper()
    with pytest.raises(BadInput) as error:
        enriched_tsv.event_id(fields_of({}))
    assert reason(error) == "missing_event_id"
    for bad in ["not-a-uuid", EID[:-1], EID + "0", "{" + EID + "}", EID.replace("-", "")]:
        with pytest.raises(BadInput) as error:
            enriched_tsv.event_id(fields_of({"event_id": bad}))
        assert reason(error) == "invalid_event_id"


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "null",
        "[]",
        '"text"',
        '{"schema":"s","data":"not an event"}',
        '{"schema":"s","data":{"data":{}}}',
        '{"schema":"s","data":{"schema":1,"data":{}}}',
        '{"schema":"s","data":{"schema":"s"}}',
        '{"schema":"s","data":{"schema":"s","data":NaN}}',
        '{"schema":"s","data":{"schema":"s","data":1e400}}',
        '{"schema":"s","data":{"schema":"\\ud800","data":{}}}',
    ],
)
def test_malformed_self_describing_event(text: str) -> None:
    with pytest.raises(BadInput) as error:
        enriched_tsv.self_describing(fields_of({"unstruct_event": text}))
    assert reason(error) == "invalid_ue"


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize(
    "text",
    [
        "{",
        "null",
        "[]",
        f'{{"schema":"{CONTEXTS_1_0_0}"}}',
        '{"data":[]}',
        f'{{"schema":"{CONTEXTS_1_0_0}","data":{{}}}}',
        f'{{"schema":"{CONTEXTS_1_0_0}","data":[1]}}',
        f'{{"schema":"{CONTEXTS_1_0_0}","data":[{{"data":{{}}}}]}}',
        f'{{"schema":"{CONTEXTS_1_0_0}","data":[{{"schema":"{SCREEN_VIEW}"}}]}}',
        f'{{"schema":"{CONTEXTS_1_0_0}","data":[{{"schema":"s","data":Infinity}}]}}',
    ],
)
def test_malformed_contexts(column: ContextsColumn, text: str) -> None:
    fields = fields_of({column: text})
    with pytest.raises(BadInput) as error:
        enriched_tsv.entities(fields, column)
    assert reason(error) == "invalid_contexts"
    with pytest.raises(BadInput) as error:
        enriched_tsv.with_entities(fields, column, [OUR_ENTITY])
    assert reason(error) == "invalid_contexts"


# --- the record's shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 130, 132, 262])
def test_a_record_needs_131_fields(count: int) -> None:
    data = "\t".join(["x"] * count).encode()
    with pytest.raises(BadInput) as error:
        enriched_tsv.split(data)
    assert reason(error) == "invalid_field_count"
    assert f"found {count}" in error.value.detail


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_a_record_holds_no_line_break(ending: str) -> None:
    line = record(MOBILE_SCREEN_VIEW)
    for data in [line + ending.encode(), record({"page_title": f"a{ending}b"})]:
        with pytest.raises(BadInput) as error:
            enriched_tsv.split(data)
        assert reason(error) == "invalid_field_count"


@pytest.mark.parametrize("raw", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_a_record_is_utf8_text(raw: bytes) -> None:
    data = record({"page_title": "x"}).replace(b"x", raw)
    with pytest.raises(BadInput) as error:
        enriched_tsv.split(data)
    assert reason(error) == "invalid_field_count"
    assert "UTF-8" in error.value.detail


def test_empty_fields_and_non_ascii_text_are_kept() -> None:
    values = {"page_title": "Grüße ✓ 😀", "se_label": " spaced ", "useragent": "\x00\x1f"}
    fields = enriched_tsv.split(record(values))
    assert {name: fields[INDEX[name]] for name in values} == values
    assert fields.count("") == 131 - len(values)


# --- timestamps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01 00:00:00", START_MS),
        ("2026-01-01 00:00:00.0", START_MS),
        ("2026-01-01 00:00:00.5", START_MS + 500),
        ("2026-01-01 00:00:00.25", START_MS + 250),
        (START, START_MS),
        ("2026-01-01 00:00:00.123", START_MS + 123),
        ("2026-01-01 00:00:00.1239", START_MS + 123),
        ("2026-01-01 00:00:00.123999", START_MS + 123),
        ("2026-01-01 00:00:00.999999999", START_MS + 999),
        ("1970-01-01 00:00:00.000", 0),
        ("1969-12-31 23:59:59.999", -1),
        ("1969-12-31 23:59:59.9999", -1),
        ("2024-02-29 12:30:45.678", 1_709_209_845_678),
        ("2000-02-29 23:59:59.001", 951_868_799_001),
        ("0001-01-01 00:00:00.000", -62_135_596_800_000),
        ("9999-12-31 23:59:59.999", 253_402_300_799_999),
    ],
)
def test_timestamps_in_every_shape_snowplow_writes(text: str, expected: int) -> None:
    assert enriched_tsv.parse_tstamp(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026-01-01",
        "2026-01-01 00:00",
        "2026-01-01T00:00:00.000",
        "2026-01-01 00:00:00.000Z",
        "2026-01-01 00:00:00.000+00:00",
        "2026-01-01 00:00:00.",
        "2026-01-01 00:00:00.1234567890",
        "2026-01-01 00:00:00,000",
        " 2026-01-01 00:00:00.000",
        "2026-01-01 00:00:00.000 ",
        "2026-01-01  00:00:00.000",
        "2026-1-01 00:00:00.000",
        "26-01-01 00:00:00.000",
        "+2026-01-01 00:00:00.000",
        "12026-01-01 00:00:00.000",
        "2026-00-01 00:00:00.000",
        "2026-13-01 00:00:00.000",
        "2026-01-00 00:00:00.000",
        "2026-01-32 00:00:00.000",
        "2026-02-29 00:00:00.000",
        "2100-02-29 00:00:00.000",
        "2026-04-31 00:00:00.000",
        "2026-01-01 24:00:00.000",
        "2026-01-01 23:60:00.000",
        "2016-12-31 23:59:60.000",
        "0000-01-01 00:00:00.000",
        "1767225600000",
        "２０２６-01-01 00:00:00.000",  # noqa: RUF001 (full-width digits)
        "٢٠٢٦-01-01 00:00:00.000",
        "2026-01-01 00:00:00.000\n",
    ],
)
def test_anything_else_is_an_invalid_timestamp(text: str) -> None:
    with pytest.raises(BadInput) as error:
        enriched_tsv.parse_tstamp(text)
    assert reason(error) == "invalid_timestamp"


@pytest.mark.parametrize(
    ("time_ms", "expected"),
    [
        (START_MS, START),
        (START_MS + 7, "2026-01-01 00:00:00.007"),
        (0, "1970-01-01 00:00:00.000"),
        (-1, "1969-12-31 23:59:59.999"),
        (-62_135_596_800_000, "0001-01-01 00:00:00.000"),
        (253_402_300_799_999, "9999-12-31 23:59:59.999"),
    ],
)
def test_format_tstamp_writes_milliseconds(time_ms: int, expected: str) -> None:
    assert enriched_tsv.format_tstamp(time_ms) == expected


@pytest.mark.parametrize("time_ms", [-62_135_596_800_001, 253_402_300_800_000])
def test_format_tstamp_refuses_what_no_timestamp_can_write(time_ms: int) -> None:
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        enriched_tsv.format_tstamp(time_ms)


@PROPERTIES
@given(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999))
def test_format_then_parse_is_identity(time_ms: int) -> None:
    text = enriched_tsv.format_tstamp(time_ms)
    assert len(text) == 23
    assert enriched_tsv.parse_tstamp(text) == time_ms


@PROPERTIES
@given(st.datetimes(), st.integers(min_value=0, max_value=9), st.text("0123456789", max_size=3))
def test_fraction_digits_below_the_millisecond_are_cut(
    moment: datetime, digits: int, beyond: str
) -> None:
    fraction = (f"{moment.microsecond:06d}" + beyond)[:digits]
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    ) + (f".{fraction}" if fraction else "")
    whole_second = (moment.replace(microsecond=0) - EPOCH) // timedelta(seconds=1)
    expected = whole_second * 1000 + int((fraction + "000")[:3])
    assert enriched_tsv.parse_tstamp(text) == expected


# --- writing --------------------------------------------------------------------------------------


def column_of(data: bytes, column: ContextsColumn) -> Any:
    return json.loads(enriched_tsv.split(data)[INDEX[column]])


def test_derived_contexts_gain_the_entity_and_nothing_else_changes() -> None:
    line = record(MOBILE_SCREEN_VIEW)
    out = enriched_tsv.with_entities(enriched_tsv.split(line), "derived_contexts", [OUR_ENTITY])
    column = INDEX["derived_contexts"]
    before, after = line.split(b"\t"), out.split(b"\t")
    assert len(after) == 131
    assert [f for i, f in enumerate(after) if i != column] == [
        f for i, f in enumerate(before) if i != column
    ]
    expected = self_describing(CONTEXTS_1_0_1, [UA_ENTITY, OUR_ENTITY])
    assert after[column] == orjson.dumps(expected)  # compact
    fields = enriched_tsv.split(out)
    assert enriched_tsv.entities(fields, "derived_contexts") == [UA_ENTITY, OUR_ENTITY]
    assert enriched_tsv.entities(fields, "contexts") == [SCREEN_ENTITY, APPLICATION_ENTITY]
    assert enriched_tsv.event_id(fields) == EID


@pytest.mark.parametrize("column", COLUMNS)
def test_an_empty_column_gets_a_new_envelope(column: ContextsColumn) -> None:
    values = {name: v for name, v in MOBILE_SCREEN_VIEW.items() if name not in COLUMNS}
    out = enriched_tsv.with_entities(fields_of(values), column, [OUR_ENTITY, UA_ENTITY])
    assert column_of(out, column) == self_describing(CONTEXTS_1_0_1, [OUR_ENTITY, UA_ENTITY])
    other = "contexts" if column == "derived_contexts" else "derived_contexts"
    assert enriched_tsv.split(out)[INDEX[other]] == ""


@pytest.mark.parametrize("column", COLUMNS)
def test_the_envelope_keeps_its_schema_and_entities_are_appended(column: ContextsColumn) -> None:
    theirs = {"schema": CLIENT_SESSION, "data": {"sessionIndex": 99}}
    text = json.dumps(self_describing(CONTEXTS_1_0_0, [theirs, SCREEN_ENTITY]))  # not compact
    out = enriched_tsv.with_entities(fields_of({column: text}), column, [OUR_ENTITY])
    assert column_of(out, column) == self_describing(
        CONTEXTS_1_0_0, [theirs, SCREEN_ENTITY, OUR_ENTITY]
    )


def test_nothing_to_add_leaves_the_record_as_it_was() -> None:
    line = record({**MOBILE_SCREEN_VIEW, "contexts": '{ "not": "read" }'})
    assert enriched_tsv.with_entities(enriched_tsv.split(line), "contexts", []) == line


def test_integers_beyond_64_bits_and_floats_keep_their_values() -> None:
    entity = {
        "schema": SCREEN,
        "data": {
            "big": 123456789012345678901234567890,
            "negative": -9223372036854775809,
            "u64": 18446744073709551615,
            "float": 0.1,
            "exponent": 1.5e300,
            "digits in text": "12345678901234567890123",
        },
    }
    text = json.dumps(self_describing(CONTEXTS_1_0_0, [entity]))
    fields = fields_of({"contexts": text})
    assert enriched_tsv.entities(fields, "contexts") == [entity]
    out = enriched_tsv.with_entities(fields, "contexts", [OUR_ENTITY])
    assert column_of(out, "contexts")["data"] == [entity, OUR_ENTITY]


def test_deep_entities_are_written_back_or_refused_as_too_deep() -> None:
    def nested(depth: int) -> Any:
        value: Any = "leaf"
        for _ in range(depth):
            value = [value]
        return value

    # 300 levels: orjson reads it, but writes only 254, so the standard library writes it.
    deep = {"schema": SCREEN, "data": {"v": nested(300)}}
    fields = fields_of({"contexts": json.dumps(self_describing(CONTEXTS_1_0_0, [deep]))})
    out = enriched_tsv.with_entities(fields, "contexts", [OUR_ENTITY])
    assert column_of(out, "contexts")["data"] == [deep, OUR_ENTITY]
    # 1020 levels: orjson reads it; the standard library may lack the stack to write it.
    text = (
        f'{{"schema":"{CONTEXTS_1_0_0}","data":[{{"schema":"{SCREEN}","data":{{"v":'
        + "[" * 1016
        + '"leaf"'
        + "]" * 1016
        + "}}]}"
    )
    fields = fields_of({"contexts": text})
    assert len(enriched_tsv.entities(fields, "contexts")) == 1
    try:
        out = enriched_tsv.with_entities(fields, "contexts", [OUR_ENTITY])
    except BadInput as error:
        assert error.reason == "too_deep"
    else:
        assert enriched_tsv.split(out)[INDEX["contexts"]].startswith(text[:-2])


# --- properties -----------------------------------------------------------------------------------

FIELD_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\t\r\n"))
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8")),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(st.characters(codec="utf-8")), inner, max_size=3)
    ),
    max_leaves=8,
)
ENTITIES = st.lists(
    st.builds(self_describing, st.sampled_from([SCREEN, UA_PARSER, CLIENT_SESSION]), JSON_VALUES),
    max_size=3,
)


@PROPERTIES
@given(
    st.lists(FIELD_TEXT, min_size=131, max_size=131),
    st.sampled_from(COLUMNS),
    st.none() | ENTITIES,
    ENTITIES.filter(bool),
)
def test_with_entities_changes_only_its_column(
    values: list[str], column: ContextsColumn, existing: list[Json] | None, added: list[Json]
) -> None:
    index = INDEX[column]
    values[index] = "" if existing is None else compact(self_describing(CONTEXTS_1_0_0, existing))
    line = "\t".join(values).encode()
    fields = enriched_tsv.split(line)
    assert fields == values
    out = enriched_tsv.with_entities(fields, column, added)
    before, after = line.split(b"\t"), out.split(b"\t")
    assert len(after) == 131
    assert after[:index] == before[:index]
    assert after[index + 1 :] == before[index + 1 :]
    envelope = json.loads(after[index])
    assert envelope["data"] == (existing or []) + added
    assert envelope["schema"] == (CONTEXTS_1_0_1 if existing is None else CONTEXTS_1_0_0)
    assert enriched_tsv.entities(enriched_tsv.split(out), column) == (existing or []) + added


JSONISH = st.sampled_from(
    ["{", "}", "[", "]", '"schema"', '"data"', ":", ",", '"s"', "1", "null", "1e999", "NaN", " "]
)
FUZZ_FIELD = st.text(max_size=12) | st.lists(JSONISH, max_size=12).map("".join)


@PROPERTIES
@given(
    st.binary(max_size=300)
    | st.lists(st.binary(max_size=4), min_size=129, max_size=133).map(b"\t".join)
)
def test_split_of_any_bytes_is_fields_or_bad_input(data: bytes) -> None:
    try:
        fields = enriched_tsv.split(data)
    except BadInput as error:
        assert error.reason == FIELD_COUNT_REASON
    else:
        assert len(fields) == 131
        assert "\t".join(fields).encode() == data


@PROPERTIES
@given(
    st.text(max_size=40)
    | st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]{8,18}", fullmatch=True)
)
def test_parse_tstamp_of_any_text_is_a_time_or_bad_input(text: str) -> None:
    try:
        time_ms = enriched_tsv.parse_tstamp(text)
    except BadInput as error:
        assert error.reason == "invalid_timestamp"
    else:
        assert enriched_tsv.format_tstamp(time_ms)[:19] == text[:19]


@PROPERTIES
@given(
    st.fixed_dictionaries(
        dict.fromkeys(
            (
                "event_id",
                "dvce_created_tstamp",
                "true_tstamp",
                "dvce_sent_tstamp",
                "unstruct_event",
                "contexts",
                "derived_contexts",
            ),
            FUZZ_FIELD,
        )
    ),
    st.sampled_from(COLUMNS),
)
def test_readers_and_writer_of_any_fields_succeed_or_raise_bad_input(
    values: dict[str, str], column: ContextsColumn
) -> None:
    fields = fields_of(values)
    calls: list[Callable[[], object]] = [
        lambda: enriched_tsv.event_id(fields),
        lambda: enriched_tsv.event_time_ms(fields),
        lambda: enriched_tsv.self_describing(fields),
        lambda: enriched_tsv.entities(fields, column),
        lambda: enriched_tsv.with_entities(fields, column, [OUR_ENTITY]),
    ]
    for call in calls:
        with contextlib.suppress(BadInput):
            call()
