"""The tracker-protocol JSON codec and the Avro codec."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable

import fastavro
import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    APPLICATION_ENTITY,
    APPLICATION_LIFECYCLE,
    BACKGROUND,
    CLIENT_SESSION,
    CONTEXTS,
    FOREGROUND,
    REPO,
    SCREEN,
    SCREEN_ENTITY,
    SCREEN_VIEW,
    START_MS,
    UNSTRUCT,
    Fields,
    Json,
    Kind,
    b64url,
    b64url_decode,
    compact,
    contexts_envelope,
    contexts_of,
    entity_of,
    event_id,
    tracker_event,
    unstruct,
)

from enricher.codecs import avro, tracker
from enricher.codecs.tracker import ContextsField
from enricher.enrich import Enricher, EntityOptions
from enricher.errors import REASONS, BadInput
from enricher.session import Lifecycle, SessionConfig, SessionEngine

PROPERTIES = settings(max_examples=200, derandomize=True, database=None, deadline=None)
EID = event_id(1)
OUR_ENTITY: Json = {"schema": CLIENT_SESSION, "data": {"sessionIndex": 7, "note": "ours"}}
BASE64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def decode(fields: object) -> tracker.TrackerEvent:
    return tracker.decode(json.dumps(fields).encode())


def enrich_one(fields: Fields, options: EntityOptions | None = None) -> Fields:
    """One event through the enricher, as the JSON codec writes it."""
    enricher = Enricher(SessionEngine(SessionConfig(salt="s")), options)
    event = decode(fields)
    _, enriched = enricher.enrich("device-1", None, event)
    out: Fields = json.loads(tracker.encode(event, enriched.entities))
    return out


# --- JSON: fields and contexts --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["screen_view", "struct", "page_view", "background"])
def test_every_input_field_is_kept(kind: Kind) -> None:
    fields = tracker_event(EID, START_MS, kind, extra={"uid": "ü-ser 1", "duid": "d", "x": ""})
    out = enrich_one(fields)
    assert list(out)[: len(fields)] == list(fields)  # same fields, same order, co appended
    assert {k: v for k, v in out.items() if k != "co"} == fields
    assert set(out) - set(fields) == {"co"}


def test_no_contexts_becomes_co() -> None:
    fields = tracker_event(EID, START_MS)
    out = enrich_one(fields)
    assert "cx" not in out
    envelope = json.loads(out["co"])
    assert envelope["schema"] == CONTEXTS
    assert [entity["schema"] for entity in envelope["data"]] == [CLIENT_SESSION]


def test_co_stays_json_with_other_entities_first_in_order() -> None:
    fields = tracker_event(EID, START_MS, entities=[SCREEN_ENTITY, APPLICATION_ENTITY])
    out = enrich_one(fields)
    assert "cx" not in out
    entities = json.loads(out["co"])["data"]  # plain JSON, no base64
    assert entities[:2] == [SCREEN_ENTITY, APPLICATION_ENTITY]
    assert entities[2]["schema"] == CLIENT_SESSION
    assert len(entities) == 3


def test_cx_stays_base64url_without_padding() -> None:
    # Entities whose encoding needs padding and both URL-safe characters.
    entity = {"schema": "iglu:com.acme/x/jsonschema/1-0-0", "data": {"v": "??>>~~ÿÿ"}}
    fields = tracker_event(EID, START_MS, entities=[entity], contexts_field="cx")
    out = enrich_one(fields)
    assert "co" not in out
    cx = out["cx"]
    assert set(cx) <= BASE64URL
    assert len(cx) % 4 != 0  # unpadded (the padded length would be a multiple of 4)
    assert "-" in cx or "_" in cx
    assert contexts_of(out)[0] == entity
    assert [e["schema"] for e in contexts_of(out)] == [entity["schema"], CLIENT_SESSION]
    assert {k: v for k, v in out.items() if k != "cx"} == {
        k: v for k, v in fields.items() if k != "cx"
    }


THEIR_SESSION: Json = {
    "schema": "iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-1",
    "data": {"userId": "tracker", "sessionId": "tracker", "sessionIndex": 99},
}


@pytest.mark.parametrize(
    ("in_co", "in_cx"),
    [
        ([SCREEN_ENTITY], [APPLICATION_ENTITY]),
        ([SCREEN_ENTITY, THEIR_SESSION], [APPLICATION_ENTITY]),
        ([SCREEN_ENTITY], [THEIR_SESSION, APPLICATION_ENTITY]),
        ([], [APPLICATION_ENTITY, THEIR_SESSION]),
        ([SCREEN_ENTITY, {"schema": SCREEN, "data": {"x": 1.5}}], [APPLICATION_ENTITY]),
    ],
    ids=["plain", "theirs-in-co", "theirs-in-cx", "co-empty", "floats"],
)
def test_co_and_cx_both_are_merged_into_co(in_co: list[Json], in_cx: list[Json]) -> None:
    """Both present: the contexts of both are read (co's, then cx's), the tracker's own
    client_session is replaced as ever, and all of it goes to co; cx is removed, so a
    consumer that reads cx first cannot miss the entity."""
    fields = tracker_event(EID, START_MS, entities=in_co)
    fields["x"] = "after co"
    fields["cx"] = b64url(contexts_envelope(in_cx))
    fields["y"] = "after cx"
    event = decode(fields)
    both = [e for e in in_co + in_cx if e is not THEIR_SESSION]
    assert event.contexts == in_co + in_cx
    out = enrich_one(fields)
    assert "cx" not in out
    assert list(out) == [name for name in fields if name != "cx"]  # co stays where it was
    assert contexts_of(out)[:-1] == both
    assert [e["schema"] for e in contexts_of(out)[-1:]] == [CLIENT_SESSION]
    assert {k: v for k, v in out.items() if k != "co"} == {
        k: v for k, v in fields.items() if k not in ("co", "cx")
    }
    # The Avro payload is the same map; without entities to add, the event is untouched.
    enricher = Enricher(SessionEngine(SessionConfig(salt="s")))
    _, enriched = enricher.enrich("device-1", None, event)
    assert avro.decode_enriched(avro.encode(enriched))["payload"] == out
    assert tracker.with_entities(event, []) == fields
    # Keeping the tracker's entities looks at both fields too (nothing added: untouched).
    kept = enrich_one(fields, EntityOptions(keep_tracker_entities=True))
    if THEIR_SESSION in in_co + in_cx:
        assert kept == fields
    else:
        assert contexts_of(kept)[:-1] == in_co + in_cx


@pytest.mark.parametrize("version", ["1-0-0", "1-0-1", "1-0-2"])
@pytest.mark.parametrize("field", ["co", "cx"])
def test_tracker_client_session_is_replaced(version: str, field: ContextsField) -> None:
    theirs = {
        "schema": f"iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/{version}",
        "data": {"userId": "tracker", "sessionId": "tracker", "sessionIndex": 99},
    }
    fields = tracker_event(
        EID, START_MS, entities=[SCREEN_ENTITY, theirs, APPLICATION_ENTITY], contexts_field=field
    )
    out = enrich_one(fields)
    entities = contexts_of(out)
    assert entities[:2] == [SCREEN_ENTITY, APPLICATION_ENTITY]
    assert [e["schema"] for e in entities[2:]] == [CLIENT_SESSION]
    assert entities[2]["data"]["sessionIndex"] == 1


def test_merge_keeps_order_and_replaces_any_version() -> None:
    existing: list[Json] = [
        SCREEN_ENTITY,
        {"schema": "iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-1"},
        {"data": "no schema"},
        APPLICATION_ENTITY,
    ]
    merged = tracker.merge_entities(existing, [OUR_ENTITY])
    assert merged == [SCREEN_ENTITY, {"data": "no schema"}, APPLICATION_ENTITY, OUR_ENTITY]
    assert tracker.merge_entities(existing, []) == existing


def test_no_entities_leaves_event_untouched() -> None:
    fields = tracker_event(EID, START_MS, entities=[SCREEN_ENTITY], contexts_field="cx")
    event = decode(fields)
    assert tracker.with_entities(event, []) == fields
    assert json.loads(tracker.encode(event, [])) == fields


def test_encode_is_compact_unescaped_json() -> None:
    fields = tracker_event(EID, START_MS, extra={"ti": "Grüße ✓ 😀"})
    event = decode(fields)
    out = tracker.encode(event, [OUR_ENTITY])
    assert "Grüße ✓ 😀".encode() in out
    assert b", " not in out
    assert b": " not in out


@pytest.mark.parametrize("field", ["co", "cx"])
def test_lone_surrogates_inside_contexts_survive_encoding(field: ContextsField) -> None:
    """A JSON string may hold a lone surrogate (a truncated emoji); UTF-8 cannot. Inside the
    contexts the event is still enriched, and written back with the same escape."""
    entity = {"schema": "iglu:com.acme/x/jsonschema/1-0-0", "data": {"t": "ab\ud83d"}}
    fields = tracker_event(EID, START_MS)
    # As JavaScript's JSON.stringify writes it: the lone surrogate as an ASCII escape.
    escaped = json.dumps(json.loads(contexts_envelope([entity])))
    if field == "cx":
        fields["cx"] = b64url(escaped)
    else:
        fields["co"] = escaped
    event = tracker.decode(json.dumps(fields).encode())
    out = tracker.encode(event, [OUR_ENTITY])
    assert field == "cx" or b"\\ud83d" in out
    assert contexts_of(json.loads(out)) == [entity, OUR_ENTITY]


@pytest.mark.parametrize("field", ["co", "cx"])
def test_lone_surrogates_inside_contexts_go_to_avro_as_escapes(field: ContextsField) -> None:
    """An Avro string must be Unicode: the contexts' lone surrogate is written as its JSON
    escape inside the payload's co, the same JSON value as the JSON codec writes."""
    entity = {"schema": "iglu:com.acme/x/jsonschema/1-0-0", "data": {"t": "ab\ud83d", "f": 0.5}}
    escaped = json.dumps(json.loads(contexts_envelope([entity])))
    fields = {**tracker_event(EID, START_MS), field: b64url(escaped) if field == "cx" else escaped}
    event = tracker.decode(json.dumps(fields).encode())
    _, enriched = Enricher(SessionEngine(SessionConfig(salt="s"))).enrich("d", None, event)
    payload = avro.decode_enriched(avro.encode(enriched))["payload"]
    as_json = json.loads(tracker.encode(event, enriched.entities))
    assert all(tracker.is_unicode(text) for text in payload.values())
    assert contexts_of(payload) == contexts_of(as_json)
    assert contexts_of(payload)[0] == entity


def test_a_lone_surrogate_in_a_field_is_bad_input() -> None:
    """A top-level field must be Unicode text: Avro and UTF-8 consumers could not carry it."""
    fields = tracker_event(EID, START_MS, extra={"ti": "title \ud83d"})
    with pytest.raises(BadInput) as error:
        tracker.decode(json.dumps(fields).encode())
    assert error.value.reason == "not_json"
    assert "'ti'" in error.value.detail


# --- JSON: what decoding finds --------------------------------------------------------------------


def url_safe_payload(schema: str) -> str:
    """A ``ue_px`` for ``schema`` whose base64url really uses ``-`` and ``_``."""
    for n in range(200):
        text = unstruct(schema, {"pad": "~" * n + "?>ÿ"})
        encoded = b64url(text)
        if "-" in encoded and "_" in encoded and len(encoded) % 4:
            return encoded
    raise AssertionError("no payload exercises the URL-safe alphabet")


@pytest.mark.parametrize(
    ("schema", "expected"),
    [(BACKGROUND, Lifecycle.BACKGROUND), (FOREGROUND, Lifecycle.FOREGROUND), (SCREEN_VIEW, None)],
)
def test_lifecycle_from_ue_px(schema: str, expected: Lifecycle | None) -> None:
    fields = {"e": "ue", "eid": EID, "dtm": str(START_MS), "ue_px": url_safe_payload(schema)}
    assert "+" not in fields["ue_px"]
    assert "/" not in fields["ue_px"]
    assert decode(fields).facts.lifecycle is expected
    fields.pop("ue_px")
    fields["ue_pr"] = unstruct(schema, {})
    assert decode(fields).facts.lifecycle is expected


def test_facts() -> None:
    fields = tracker_event(event_id(9), START_MS + 5, "background", aid="shop")
    facts = decode(fields).facts
    assert facts.event_id == event_id(9)
    assert facts.time_ms == START_MS + 5
    assert facts.app_id == "shop"
    assert facts.lifecycle is Lifecycle.BACKGROUND
    assert decode(tracker_event(EID, 1, aid=None)).facts.app_id is None


def test_uppercase_event_id_is_accepted() -> None:
    assert decode({"eid": EID.upper(), "dtm": "1"}).facts.event_id == EID.upper()


@pytest.mark.parametrize(
    ("stamps", "expected"),
    [
        ({"dtm": "3", "ttm": "2", "stm": "1"}, 3),
        ({"ttm": "2", "stm": "1"}, 2),
        ({"stm": "1"}, 1),
        ({"stm": "1", "dtm": "3"}, 3),
        ({"dtm": "0"}, 0),
        ({"dtm": "253402300799999"}, 253_402_300_799_999),
    ],
)
def test_timestamp_fallback(stamps: dict[str, str], expected: int) -> None:
    assert decode({"eid": EID, **stamps}).facts.time_ms == expected


def test_contexts_are_decoded() -> None:
    for field in ("co", "cx"):
        fields = tracker_event(
            EID, START_MS, entities=[SCREEN_ENTITY, APPLICATION_ENTITY], contexts_field=field
        )
        event = decode(fields)
        assert event.contexts == [SCREEN_ENTITY, APPLICATION_ENTITY]
        assert event.contexts_field == field
    assert decode(tracker_event(EID, START_MS)).contexts_field is None


# --- JSON: bad input ------------------------------------------------------------------------------

GOOD: Fields = {"e": "pv", "eid": EID, "dtm": "1767225600000"}


def deep(levels: int, leaf: object = "leaf") -> str:
    """JSON text of ``levels`` arrays and objects, alternating, around ``leaf`` (as text: the
    standard library cannot write the deepest)."""
    opening = "".join("[" if level % 2 else '{"k":' for level in range(levels))
    closing = "".join("]" if level % 2 else "}" for level in reversed(range(levels)))
    return opening + json.dumps(leaf) + closing


def nested(field: str, depth: int, leaf: object = "leaf") -> str:
    """A valid ``co``/``cx``/``ue_pr``/``ue_px`` whose JSON nests exactly ``depth`` levels
    (the envelopes included: contexts 3, a self-describing event 2)."""
    if field in ("co", "cx"):
        return in_field(field, deep(depth - 3, leaf))
    return in_field(field, deep(depth - 2, leaf), ue=True)


def in_field(field: str, data: str, *, ue: bool = False) -> str:
    """A ``co``/``cx`` with one entity of ``data`` (JSON text), or a ``ue_pr``/``ue_px``."""
    if ue:
        text = f'{{"schema":"{UNSTRUCT}","data":{{"schema":"{SCREEN_VIEW}","data":{data}}}}}'
    else:
        text = f'{{"schema":"{CONTEXTS}","data":[{{"schema":"{SCREEN}","data":{data}}}]}}'
    return b64url(text) if field.endswith("x") else text


def encoded(field: str, number: str, *, ue: bool = False) -> str:
    """A ``co``/``cx`` (or ``ue_pr``/``ue_px``) holding ``number`` as written."""
    return in_field(field, f'{{"n":{number}}}', ue=ue)


def with_(**changes: str | None) -> bytes:
    fields: dict[str, str] = dict(GOOD)
    for name, value in changes.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return json.dumps(fields).encode()


BAD_INPUT: list[tuple[str, bytes]] = [
    ("not_json", b"{"),
    ("not_json", b""),
    ("not_json", b"\xff\xfe\xfa"),
    ("not_json", b'{"eid": "x",}'),
    ("not_json", b"[" * 100_000),  # deeper than the parser's recursion limit
    ("not_json", b"1" * 5_000),  # more digits than Python converts
    ("not_an_object", b"[]"),
    ("not_an_object", b'"eid"'),
    ("not_an_object", b"null"),
    ("non_string_field", b'{"eid": "%s", "dtm": 1767225600000}' % EID.encode()),
    ("non_string_field", b'{"eid": "%s", "dtm": "1", "x": null}' % EID.encode()),
    ("non_string_field", b'{"eid": "%s", "dtm": "1", "co": {}}' % EID.encode()),
    ("missing_event_id", with_(eid=None)),
    ("missing_event_id", with_(eid="")),
    ("invalid_event_id", with_(eid="not-a-uuid")),
    ("invalid_event_id", with_(eid=EID.replace("-", ""))),
    ("invalid_event_id", with_(eid=EID + "0")),
    ("invalid_event_id", with_(eid=" " + EID)),
    ("missing_timestamp", with_(dtm=None)),
    ("invalid_timestamp", with_(dtm="abc")),
    ("invalid_timestamp", with_(dtm="12a")),
    ("invalid_timestamp", with_(dtm="-1")),
    ("invalid_timestamp", with_(dtm="1.5")),
    ("invalid_timestamp", with_(dtm=" 1")),
    ("invalid_timestamp", with_(dtm="\uff11\uff12")),  # fullwidth digits
    ("invalid_timestamp", with_(dtm="253402300800000")),  # after 9999-12-31
    ("invalid_timestamp", with_(dtm="0" * 16)),  # more than 15 digits
    ("invalid_timestamp", with_(dtm="9" * 16)),
    ("invalid_timestamp", with_(dtm=None, stm="x")),
    ("invalid_timestamp", with_(dtm="x", ttm="1")),  # a bad dtm is not skipped
    ("invalid_ue", with_(e="ue", ue_pr="{")),
    ("invalid_ue", with_(e="ue", ue_pr="[]")),
    ("invalid_ue", with_(e="ue", ue_pr='{"schema": "x"}')),
    ("invalid_ue", with_(e="ue", ue_pr='{"schema": "x", "data": {"data": {}}}')),
    ("invalid_ue", with_(e="ue", ue_pr='{"schema": "x", "data": {"schema": 1}}')),
    ("invalid_ue", with_(e="ue", ue_px=b64url("{"))),
    ("too_deep", with_(e="ue", ue_pr="[" * 100_000)),
    ("invalid_contexts", with_(co="{")),
    ("invalid_contexts", with_(co="")),
    ("invalid_contexts", with_(co='{"schema": "x"}')),
    ("invalid_contexts", with_(co='{"schema": "x", "data": {}}')),
    ("invalid_contexts", with_(co='{"schema": "x", "data": [1]}')),
    ("invalid_contexts", with_(co="[]")),
    ("invalid_contexts", with_(cx=b64url("not json"))),
    ("too_deep", with_(co="[" * 100_000)),
    ("invalid_contexts", with_(co=contexts_envelope([SCREEN_ENTITY]), cx=b64url("not json"))),
    ("invalid_contexts", with_(co="[]", cx=b64url(contexts_envelope([SCREEN_ENTITY])))),
    ("invalid_base64", with_(cx="!!!!")),
    ("invalid_base64", with_(cx="a")),  # no length is 1 mod 4
    ("invalid_base64", with_(cx="ab cd")),
    ("invalid_base64", with_(cx=b64url(b"\xff\xfe"))),  # not UTF-8 inside
    ("invalid_base64", with_(e="ue", ue_px="%%%")),
    ("invalid_base64", with_(co=contexts_envelope([SCREEN_ENTITY]), cx="!!!")),
    # A lone surrogate in a field's name: Avro and UTF-8 consumers cannot carry it either.
    ("not_json", b'{"eid": "%s", "dtm": "1", "a\\udc00": "x"}' % EID.encode()),
    ("not_json", b'{"eid": "%s", "dtm": "1", "a\xed\xb0\x80": "x"}' % EID.encode()),
    ("not_json", b'{"eid": "%s", "dtm": "1", "ti": "\xed\xa0\x80"}' % EID.encode()),
    # Numbers JSON has not: the standard library reads them, and would write them back.
    *[
        ("invalid_number", with_(**{field: encoded(field, number)}))
        for number in (
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "-1e400",
            "1.8e308",
            "1" + "0" * 400 + ".0",
        )
        for field in ("co", "cx")
    ],
    *[
        ("invalid_number", with_(e="ue", **{field: encoded(field, number, ue=True)}))
        for number in ("NaN", "-Infinity", "1e400")
        for field in ("ue_pr", "ue_px")
    ],
    # Deeper than MAX_DEPTH: no parser-dependent answer, and never not_encodable later.
    *[
        ("too_deep", with_(e="ue", **{field: nested(field, depth)}))
        for depth in (tracker.MAX_DEPTH + 1, 300, 1021, 1024, 1025, 5000)
        for field in ("co", "cx", "ue_pr", "ue_px")
    ],
]


@pytest.mark.parametrize(("reason", "data"), BAD_INPUT, ids=lambda v: str(v)[:40])
def test_bad_input(reason: str, data: bytes) -> None:
    with pytest.raises(BadInput) as caught:
        tracker.decode(data)
    assert caught.value.reason == reason
    assert caught.value.detail
    assert str(caught.value).startswith(f"{reason}: ")


def test_every_json_reason_has_a_case() -> None:
    covered = {reason for reason, _ in BAD_INPUT}
    json_reasons = set(REASONS) - {
        "not_avro",
        "missing_key",
        "invalid_key",
        "unknown_schema_id",
        "oversize",
        "not_producible",
        "future_timestamp",
        "not_encodable",
        "invalid_thrift",
        "not_payload_data",
        "invalid_field_count",
        "missing_device_id",
    }
    assert covered == json_reasons


def json_depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    return 0


@pytest.mark.parametrize("leaf", ["leaf", 1.5, 2**70], ids=["exact", "float", "big-int"])
@pytest.mark.parametrize("field", ["co", "cx", "ue_pr", "ue_px"])
def test_json_at_the_depth_limit_is_enriched_and_encoded(field: str, leaf: object) -> None:
    """Everything decoding accepts can be written, at the limit too: in the contexts (which the
    encoder rewrites in its envelope, through orjson or the standard library) and in the
    self-describing event (passed through), to JSON and to Avro."""
    fields = {**GOOD, "e": "ue", field: nested(field, tracker.MAX_DEPTH, leaf)}
    event = tracker.decode(compact(fields).encode())
    enricher = Enricher(
        SessionEngine(SessionConfig(salt="s")), EntityOptions(lifecycle_context=True)
    )
    _, enriched = enricher.enrich("device-1", None, event)
    out = json.loads(tracker.encode(event, enriched.entities))
    body = avro.encode(enriched)
    assert avro.decode_enriched(body)["payload"] == out
    contexts = json.loads(out["co"] if "co" in out else b64url_decode(out["cx"]))
    assert contexts["data"][-2]["schema"] == CLIENT_SESSION
    if field in ("co", "cx"):
        assert json_depth(contexts) == tracker.MAX_DEPTH  # the envelope adds nothing
        assert (
            contexts["data"][0]
            == json.loads(b64url_decode(fields[field]) if field == "cx" else fields[field])["data"][
                0
            ]
        )
    else:
        assert out[field] == fields[field]
    # One level more is refused at decoding, with its own reason.
    fields[field] = nested(field, tracker.MAX_DEPTH + 1, leaf)
    with pytest.raises(BadInput) as caught:
        tracker.decode(compact(fields).encode())
    assert caught.value.reason == "too_deep"
    assert f"'{field}'" in caught.value.detail


def test_the_depth_limit_is_what_orjson_can_write() -> None:
    """MAX_DEPTH is orjson's: if a new orjson writes less, the limit must follow."""
    orjson.dumps(orjson.loads(deep(tracker.MAX_DEPTH)))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(orjson.loads(deep(tracker.MAX_DEPTH + 1)))


@pytest.mark.parametrize("field", ["co", "cx", "ue_pr", "ue_px"])
def test_extreme_finite_numbers_are_kept(field: str) -> None:
    """The largest and smallest doubles, negative zero, and integers beyond 64 bits are JSON:
    they go through as the standard library writes them."""
    for number in (
        "1.7976931348623157e308",
        "-1.7976931348623157e308",
        "5e-324",
        "-0.0",
        "1e-400",
        "9" * 400,
    ):
        fields = {**GOOD, "e": "ue", field: encoded(field, number, ue=field.startswith("ue"))}
        event = tracker.decode(compact(fields).encode())
        out = json.loads(tracker.encode(event, [OUR_ENTITY]), parse_constant=refuse)
        if field.startswith("ue"):
            assert out[field] == fields[field]
        else:
            assert contexts_of(out)[0]["data"]["n"] == json.loads(number)


def refuse(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
field_names = st.sampled_from(["eid", "dtm", "ttm", "stm", "e", "co", "cx", "ue_pr", "ue_px", "x"])
field_values = st.one_of(
    st.sampled_from([EID, "1", "0", "", "ue", "pv", "{}", "[]", "{{"]),
    st.text(max_size=12),
    json_values.map(compact),
    json_values.map(lambda value: b64url(compact(value))),
    st.lists(st.dictionaries(st.text(), st.text())).map(contexts_envelope),
    st.sampled_from([BACKGROUND, FOREGROUND]).map(lambda schema: b64url(unstruct(schema, {}))),
)


@PROPERTIES
@given(st.one_of(st.binary(max_size=64), st.dictionaries(field_names, field_values).map(compact)))
def test_decode_raises_only_bad_input(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    try:
        event = tracker.decode(raw)
    except BadInput as error:
        assert error.reason in REASONS
        return
    # Whatever decodes must encode back with every field intact.
    out = json.loads(tracker.encode(event, [OUR_ENTITY]))
    assert {k: v for k, v in out.items() if k not in ("co", "cx")} == {
        k: v for k, v in event.fields.items() if k not in ("co", "cx")
    }
    assert contexts_of(out)[-1] == OUR_ENTITY


# --- Avro -----------------------------------------------------------------------------------------

avro_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
PARSED = frozenset({"eid", "dtm", "ttm", "stm", "e", "co", "cx", "ue_pr", "ue_px"})


@PROPERTIES
@given(st.dictionaries(avro_text, avro_text, max_size=12))
def test_raw_avro_round_trip_keeps_every_field_in_order(fields: dict[str, str]) -> None:
    body = avro.encode_raw(fields)
    record = avro.read_record(body, avro.RAW_SCHEMA)
    assert list(record["payload"].items()) == list(fields.items())


@PROPERTIES
@given(st.dictionaries(avro_text.filter(lambda k: k not in PARSED), avro_text, max_size=8))
def test_json_to_avro_to_json_is_lossless(extra: dict[str, str]) -> None:
    original = compact({**GOOD, **extra}).encode()
    event = tracker.decode(original)
    again = avro.decode(avro.encode_raw(event.fields))
    assert tracker.dump(again.fields) == original
    assert again.facts == event.facts


@pytest.mark.parametrize("lifecycle", [False, True])
@pytest.mark.parametrize("session", [False, True])
def test_enriched_avro_carries_typed_entities(session: bool, lifecycle: bool) -> None:
    options = EntityOptions(session_context=session, lifecycle_context=lifecycle)
    enricher = Enricher(SessionEngine(SessionConfig(salt="s", storage_mechanism="SQLITE")), options)
    fields = tracker_event(EID, START_MS, "background", entities=[SCREEN_ENTITY], base64_ue=True)
    event = avro.decode(avro.encode_raw(fields))
    _, enriched = enricher.enrich("device-1", None, event)
    record = avro.decode_enriched(avro.encode(enriched))
    payload = record["payload"]
    assert payload == tracker.with_entities(event, enriched.entities)
    assert {k: v for k, v in payload.items() if k != "co"} == {
        k: v for k, v in fields.items() if k != "co"
    }
    session_entity = entity_of(payload)
    if session:
        assert session_entity is not None
        assert record["client_session"] == session_entity
        assert record["client_session"]["storageMechanism"] == "SQLITE"
        assert record["client_session"]["sessionIndex"] == 1
        assert record["client_session"]["firstEventId"] == EID
    else:
        assert record["client_session"] is None
        assert session_entity is None
    lifecycle_entity = entity_of(payload, APPLICATION_LIFECYCLE)
    if lifecycle:
        assert (
            record["application_lifecycle"]
            == lifecycle_entity
            == {
                "isVisible": False,
                "index": 1,
            }
        )
    else:
        assert record["application_lifecycle"] is None
        assert lifecycle_entity is None


def test_enriched_avro_matches_the_published_schema_file() -> None:
    """Consumers read with ``schemas/enriched_event.avsc``; the bytes must fit it."""
    enricher = Enricher(
        SessionEngine(SessionConfig(salt="s")), EntityOptions(lifecycle_context=True)
    )
    _, enriched = enricher.enrich("d", None, tracker.decode(with_()))
    schema = fastavro.parse_schema(
        json.loads((REPO / "schemas" / "enriched_event.avsc").read_text())
    )
    record = fastavro.schemaless_reader(io.BytesIO(avro.encode(enriched)), schema)
    assert isinstance(record, dict)
    assert enriched.client_session is not None
    assert enriched.application_lifecycle is not None
    assert record["client_session"] == enriched.client_session["data"]
    assert record["application_lifecycle"] == enriched.application_lifecycle["data"]


VALID_RAW = avro.encode_raw(GOOD)


@pytest.mark.parametrize(
    "data",
    [
        VALID_RAW[:-1],  # truncated
        VALID_RAW + b"\x00",  # trailing bytes
        b"",
        b"\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # a string longer than the data
        b"\x02\x02\xff\xfe\x00\x00",  # a key that is not UTF-8
        b"\x01",  # block count -1 with no size after it
    ],
    ids=["truncated", "trailing", "empty", "huge-length", "not-utf8", "negative-count"],
)
def test_corrupt_avro_is_not_avro(data: bytes) -> None:
    for read in (avro.decode, avro.decode_enriched):
        with pytest.raises(BadInput) as caught:
            read(data)
        assert caught.value.reason == "not_avro"


def mutations(body: bytes) -> st.SearchStrategy[bytes]:
    """``body`` truncated, extended, or with bytes overwritten."""
    return st.one_of(
        st.integers(0, len(body) - 1).map(lambda n: body[:n]),
        st.binary(min_size=1, max_size=8).map(lambda tail: body + tail),
        st.lists(st.tuples(st.integers(0, len(body) - 1), st.integers(0, 255)), max_size=4).map(
            lambda changes: _overwrite(body, changes)
        ),
    )


def _overwrite(body: bytes, changes: list[tuple[int, int]]) -> bytes:
    out = bytearray(body)
    for position, value in changes:
        out[position] = value
    return bytes(out)


ENRICHED_BODY = avro.encode(
    Enricher(SessionEngine(SessionConfig(salt="s")), EntityOptions(lifecycle_context=True)).enrich(
        "d", None, tracker.decode(with_())
    )[1]
)


@PROPERTIES
@given(st.one_of(st.binary(max_size=300), mutations(VALID_RAW), mutations(ENRICHED_BODY)))
def test_avro_decoding_raises_only_bad_input(data: bytes) -> None:
    try:
        record = avro.read_record(data, avro.RAW_SCHEMA)
    except BadInput as error:
        assert error.reason == "not_avro"
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in record["payload"].items())
        assert (
            avro.read_record(avro.write_record(record, avro.RAW_SCHEMA), avro.RAW_SCHEMA) == record
        )
    try:
        avro.decode(data)
    except BadInput as error:
        assert error.reason in REASONS
    try:
        avro.decode_enriched(data)
    except BadInput as error:
        assert error.reason == "not_avro"


def test_base64_helper_matches_tracker_alphabet() -> None:
    # The support helper must write what trackers write, or the cx tests prove nothing.
    assert b64url(b"\xfb\xff") == "-_8"
    assert base64.b64decode("+/8=") == b"\xfb\xff"
    assert b64url_decode(b64url("é?>~")) == "é?>~"


# --- orjson where it is exact, the standard library elsewhere ------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None), max_size=6)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def stdlib_encode(fields: Fields, entities: list[Json]) -> bytes:
    """What the codec wrote when it used the standard library's json alone."""
    envelope = json.loads(fields["co"])
    ours = {tracker.schema_family(e["schema"]) for e in entities}
    kept = [c for c in envelope["data"] if tracker.schema_family(c.get("schema")) not in ours]
    out = dict(fields)
    out["co"] = json.dumps(
        {"schema": CONTEXTS, "data": kept + entities}, separators=(",", ":"), ensure_ascii=False
    )
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")


@PROPERTIES
@given(
    st.lists(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4), max_size=3),
    st.booleans(),
    st.sampled_from(("screen_view", "struct", "background")),
)
def test_events_are_read_and_written_exactly_as_the_standard_library_does(
    datas: list[Json], ascii_only: bool, kind: Kind
) -> None:
    contexts = [{"schema": SCREEN, "data": data} for data in datas]
    co = json.dumps({"schema": CONTEXTS, "data": contexts}, ensure_ascii=ascii_only)
    fields = {**tracker_event(EID, START_MS, kind), "co": co}
    raw = json.dumps(fields, ensure_ascii=ascii_only).encode("utf-8", "backslashreplace")
    try:
        fields = json.loads(raw)
        event = tracker.decode(raw)
    except BadInput as error:
        # Only a lone surrogate written as UTF-8 into a field itself is refused.
        assert not ascii_only and error.reason == "not_json", error
        return
    assert event.fields == fields
    assert tracker.encode(event, [OUR_ENTITY]) == stdlib_encode(fields, [OUR_ENTITY])
    assert tracker.dump(fields) == json.dumps(
        fields, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8", "backslashreplace")


# --- msgspec for the usual flat event, the general path for everything else ----------------------


def outcome(read: Callable[[], tracker.TrackerEvent]) -> object:
    """What a reader made of its input: the event and its fields in order, or the reason and
    detail it refused it with."""
    try:
        event = read()
    except BadInput as error:
        return (error.reason, error.detail)
    return event, list(event.fields.items())


def general(data: bytes) -> tracker.TrackerEvent:
    value, unicode = tracker.load(data)
    return tracker.from_fields(value, unicode=unicode)


flat_texts = st.text(st.characters(codec=None), max_size=8)
flat_objects = st.dictionaries(
    field_names | flat_texts,
    field_values | flat_texts | JSON_VALUES,
    max_size=6,
).map(lambda fields: {"eid": EID, "dtm": str(START_MS), **fields})
written = st.builds(
    lambda fields, ascii_only, spaced: json.dumps(
        fields,
        ensure_ascii=ascii_only,
        separators=(", ", ": ") if spaced else (",", ":"),
    ).encode("utf-8", "surrogatepass"),
    flat_objects,
    st.booleans(),
    st.booleans(),
)


@PROPERTIES
@given(
    st.one_of(
        st.binary(max_size=64),
        written,
        written.map(lambda data: b" " + data + b"\n"),
        written.map(lambda data: b'{"eid":"x","dtm":"1",' + data[1:]),  # names given twice
    )
)
def test_what_msgspec_reads_the_general_path_reads_the_same(data: bytes) -> None:
    """msgspec may leave an input to the general path; whatever it reads, it reads as the
    general path does: the same event, the same fields in the same order, or the same
    refusal. And decode gives the general path's answer either way."""
    try:
        fields = msgspec.json.decode(data, type=dict[str, str])
    except msgspec.DecodeError:
        fast = None
    else:
        fast = outcome(lambda: tracker.from_strings(fields))
    expected = outcome(lambda: general(data))
    if fast is not None:
        assert fast == expected
    assert outcome(lambda: tracker.decode(data)) == expected
