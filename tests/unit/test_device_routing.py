"""Finding an event's device (:mod:`enricher.devices`) and what the re-keying hop makes of one
input record (:class:`enricher.rekey.Router`), with no broker."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from support import (
    CLIENT_SESSION,
    START_MS,
    UNBOUNDED,
    entity_of,
    event_id,
    read_jsonl,
    tracker_event,
    write_jsonl,
)

from enricher import batch, config, generate
from enricher.codecs import collector, snowplow_collector, tracker
from enricher.codecs.factory import codecs
from enricher.devices import DeviceId, sources_for
from enricher.enrich import Enricher, EntityOptions
from enricher.entities import ANONYMOUS_USER_ID
from enricher.errors import BadInput
from enricher.intake import InputMessage
from enricher.rekey import Router
from enricher.session import SessionConfig, SessionEngine, SessionState, Timeouts

SESSION = {"schema": CLIENT_SESSION, "data": {"userId": "mobile-device-1", "sessionIndex": 3}}


def event(**fields: str) -> tracker.TrackerEvent:
    return tracker.from_fields({**tracker_event(event_id(1), START_MS), **fields})


def test_the_first_source_that_names_a_device_wins() -> None:
    chain = DeviceId(["uid", "duid", "key"])
    assert chain(b"the-key", event(duid="d", uid="u")) == "u"
    assert chain(b"the-key", event(duid="d", uid="")) == "d"
    assert chain(b"the-key", event()) == "the-key"
    with pytest.raises(BadInput) as raised:
        DeviceId(["duid"])(b"key", event())
    assert raised.value.reason == "missing_device_id"


def test_a_client_session_the_tracker_sent_names_its_device() -> None:
    with_session = tracker.from_fields(
        {**tracker_event(event_id(1), START_MS, entities=[SESSION]), "duid": "d"}
    )
    assert DeviceId(["client_session", "duid"])(None, with_session) == "mobile-device-1"
    assert DeviceId(["client_session", "duid"])(None, event(duid="d")) == "d"


def test_what_the_record_knows_besides_the_event_comes_after_the_event() -> None:
    chain = DeviceId(["nuid"])
    assert chain(None, event(), {"nuid": "cookie"}) == "cookie"
    assert chain(None, event(nuid="field"), {"nuid": "cookie"}) == "field"


def test_each_format_has_a_default_chain_and_refuses_sources_it_has_not() -> None:
    assert sources_for("", "json") == ("key",)
    assert sources_for(" duid , key ", "json") == ("duid", "key")
    assert sources_for("", "snowplow-enriched")[0] == "client_session"
    with pytest.raises(config.ConfigError, match="domain_userid not a source of the json"):
        config.load({"ENRICHER_DEVICE_ID": "domain_userid"})


def message(key: bytes | None, value: bytes, offset: int = 7) -> InputMessage:
    return InputMessage("raw", 2, offset, key, value, [("trace", b"t")], START_MS)


def test_a_json_record_moves_unchanged_keyed_by_its_device() -> None:
    route = Router(
        codecs(config.Settings()).decode, DeviceId(["duid"]), splits=False, max_message_bytes=10_000
    )
    value = tracker.dump({**tracker_event(event_id(1), START_MS), "duid": "d-9"})
    [routed] = route(message(b"random", value))
    assert (routed.to, routed.record.key, routed.record.value) == ("device", b"d-9", value)
    assert routed.record.headers == [("trace", b"t")]
    [bad] = route(message(b"random", b"{"))
    assert (bad.to, bad.error and bad.error.reason) == ("dead_letters", "not_json")
    [big] = Router(tracker.decode, DeviceId(["key"]), splits=False, max_message_bytes=10)(
        message(b"k", value)
    )
    assert big.error is not None and big.error.reason == "oversize"


def payload(events: list[dict[str, str]], path: str = collector.TP2_PATH) -> bytes:
    body = json.dumps({"schema": collector.PAYLOAD_DATA_SCHEMA, "data": events})
    return collector.encode(
        collector.CollectorPayload(
            ip_address="10.0.0.1",
            timestamp=START_MS,
            encoding="UTF-8",
            collector="ssc",
            path=path,
            body=body,
            content_type="application/json",
            network_user_id="cookie-1",
        )
    )


def test_a_collector_request_is_split_per_event_and_a_bad_event_goes_alone() -> None:
    route = Router(
        tracker.decode, DeviceId(["duid", "nuid"]), splits=True, max_message_bytes=100_000
    )
    good = {**tracker_event(event_id(1), START_MS), "duid": "d-1"}
    cookie_only = tracker_event(event_id(2), START_MS + 1)
    broken = {**tracker_event(event_id(3), START_MS + 2), "dtm": "soon", "stm": "later"}
    routed = route(message(b"random", payload([good, cookie_only, broken])))
    assert [(r.to, r.record.key) for r in routed] == [
        ("device", b"d-1"),
        ("device", b"cookie-1"),
        ("dead_letters", b"random"),
    ]
    assert routed[2].error is not None and routed[2].error.reason == "invalid_timestamp"
    for one, fields in zip(routed, [good, cookie_only, broken], strict=True):
        assert collector.events(collector.decode(one.record.value or b"")) == [fields]


def test_a_collector_request_without_events_goes_to_the_output_as_it_is() -> None:
    route = Router(tracker.decode, DeviceId(["duid"]), splits=True, max_message_bytes=100_000)
    webhook = payload([], path="/com.acme/v1")
    assert [(r.to, r.record.value) for r in route(message(b"k", webhook))] == [("output", webhook)]
    [bad] = route(message(b"k", b"not thrift"))
    assert bad.error is not None and bad.error.reason == "invalid_thrift"


ENGINE = SessionEngine(SessionConfig("anonymous-test-salt", Timeouts.from_seconds(60, 15)))


def test_anonymous_events_get_the_null_user_and_no_previous_session_but_the_same_session() -> None:
    named_enricher = Enricher(ENGINE)
    kiosk_enricher = Enricher(ENGINE, EntityOptions(anonymous_apps=frozenset({"kiosk"})))
    named_state: SessionState | None = None
    kiosk_state: SessionState | None = None
    previous = []
    for number, at_s in enumerate([0, 10, 200, 205]):  # the third event starts a new session
        decoded = tracker.from_fields(
            tracker_event(event_id(number), START_MS + at_s * 1000, aid="kiosk")
        )
        step, named = named_enricher.enrich("d", named_state, decoded)
        named_state = step.state
        step, kiosk = kiosk_enricher.enrich("d", kiosk_state, decoded)
        kiosk_state = step.state
        assert named.client_session is not None and kiosk.client_session is not None
        got, want = kiosk.client_session["data"], named.client_session["data"]
        assert got["userId"] == ANONYMOUS_USER_ID and got["previousSessionId"] is None
        different = {k for k in got if got[k] != want[k]}
        assert different <= {"userId", "previousSessionId"}
        # Written so too, also where the usual event takes the prepared shortcut.
        assert entity_of(kiosk.fields()) == got
        previous.append(want["previousSessionId"])
    assert previous[2] is not None  # the named session had a previous one to hide
    other_app = tracker.from_fields(tracker_event(event_id(9), START_MS, aid="shop"))
    _, shop = kiosk_enricher.enrich("d2", None, other_app)
    assert shop.client_session is not None
    assert shop.client_session["data"]["userId"] != ANONYMOUS_USER_ID


def test_a_collector_request_in_anonymous_mode_is_an_anonymous_event() -> None:
    fields = tracker_event(event_id(1), START_MS)
    request = collector.decode(payload([fields]))
    assert not snowplow_collector.decode(collector.encode(request)).anonymous
    anonymous = replace(request, headers=("Host: c.example.com", "SP-Anonymous: *"))
    assert snowplow_collector.decode(collector.encode(anonymous)).anonymous
    _, enriched = Enricher(ENGINE).enrich(
        "d", None, snowplow_collector.decode(collector.encode(anonymous))
    )
    written = collector.events(collector.decode(snowplow_collector.encode(enriched)))
    assert written is not None
    assert entity_of(written[0]) == {**(entity_of(written[0]) or {}), "userId": ANONYMOUS_USER_ID}


def test_generated_collector_traffic_holds_every_event_once_in_device_order() -> None:
    traffic = generate.Traffic(events=3000, devices=120, seed=5)
    sent: dict[str, list[str]] = {}
    requests = 0
    for key, value in generate.collector_requests(traffic):
        events = collector.events(collector.decode(value))
        assert events is not None and 1 <= len(events) <= 10
        [device] = {e["duid"] for e in events}
        sent.setdefault(device, []).extend(e["eid"] for e in events)
        assert len(key) == 36
        requests += 1
    expected: dict[str, list[str]] = {}
    for device, event in generate.events(traffic):
        expected.setdefault(device, []).append(event["eid"])
    assert sent == expected
    assert len(expected) < requests < 3000


def test_file_mode_finds_the_device_as_the_hop_does_with_no_topic(tmp_path: Path) -> None:
    timeline = [("d-1", 0), ("d-2", 5), ("d-1", 30), ("d-1", 400), ("d-2", 20)]
    events = [
        {**tracker_event(event_id(n), START_MS + s * 1000), "duid": device}
        for n, (device, s) in enumerate(timeline)
    ]
    keyless = tmp_path / "keyless.jsonl"
    lines = [json.dumps({"event": e}) for e in events]
    lines.append(json.dumps({"event": tracker_event(event_id(99), START_MS)}))  # no duid
    keyless.write_text("\n".join(lines) + "\n")
    keyed = tmp_path / "keyed.jsonl"
    write_jsonl(keyed, [(e["duid"], e) for e in events])
    enricher = Enricher(ENGINE)
    by_duid = batch.run(
        enricher,
        keyless,
        tmp_path / "a.jsonl",
        batch.MemoryStore(),
        UNBOUNDED,
        device_id=DeviceId(["duid"]),
    )
    by_key = batch.run(enricher, keyed, tmp_path / "b.jsonl", batch.MemoryStore(), UNBOUNDED)
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")
    assert (by_duid.events, by_key.events) == (5, 5)
    [error] = read_jsonl(tmp_path / "a.jsonl.errors.jsonl")
    assert error["reason"] == "missing_device_id"
