"""The ``snowplow-enriched`` format: Snowplow Enrich's enriched TSV in and out. The sessions
must be the ones the tracker-protocol format gives the same events (which the differential
test holds to Snowplow's tracker), and every field but the entity's column must come out byte
for byte."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    APPLICATION_ENTITY,
    CLIENT_SESSION,
    START_MS,
    Kind,
    enriched_tsv,
    entity_of,
    event_id,
    tracker_event,
)

from enricher import config, generate
from enricher.codecs import tracker
from enricher.codecs.enriched_tsv import FIELDS, INDEX
from enricher.codecs.factory import codecs
from enricher.enrich import Enricher
from enricher.errors import BadInput
from enricher.session import Lifecycle, SessionConfig, SessionEngine, SessionState, Timeouts

ENGINE = SessionEngine(SessionConfig("tsv-test-salt", Timeouts.from_seconds(60, 15)))
ENRICHER = Enricher(ENGINE)
TSV = codecs(config.Settings(input_format="snowplow-enriched", output_format="snowplow-enriched"))
JSON = codecs(config.Settings())


def column(record: bytes, name: str) -> str:
    return record.decode().split("\t")[INDEX[name]]


def session_in(record: bytes, name: str = "derived_contexts") -> dict[str, object]:
    [entity] = [
        e for e in json.loads(column(record, name))["data"] if e["schema"] == CLIENT_SESSION
    ]
    data: dict[str, object] = entity["data"]
    return data


def test_an_enriched_event_is_read_as_the_rules_read_its_tracker_event() -> None:
    fields = tracker_event(event_id(1), START_MS + 1234, "background", aid="shop")
    fields["ttm"] = str(START_MS + 999)
    event = TSV.decode(enriched_tsv(fields, dvce_created_tstamp=""))
    assert event.event_id == event_id(1)
    assert event.time_ms == START_MS + 999  # no dvce_created_tstamp: true_tstamp
    assert event.lifecycle is Lifecycle.BACKGROUND
    assert event.app_id == "shop"
    assert TSV.decode(enriched_tsv(fields)).time_ms == START_MS + 1234
    assert TSV.decode(enriched_tsv(fields, true_tstamp="", dvce_created_tstamp="")).time_ms == (
        START_MS + 1234 + 250  # dvce_sent_tstamp
    )


def test_a_lifecycle_move_needs_an_unstruct_event() -> None:
    fields = tracker_event(event_id(1), START_MS, "foreground")
    assert TSV.decode(enriched_tsv(fields)).lifecycle is Lifecycle.FOREGROUND
    assert TSV.decode(enriched_tsv(fields, event="struct")).lifecycle is None


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"a\tb", "invalid_field_count"),
        (enriched_tsv(tracker_event(event_id(1), START_MS), event_id=""), "missing_event_id"),
        (enriched_tsv(tracker_event(event_id(1), START_MS), event_id="x"), "invalid_event_id"),
        (
            enriched_tsv(tracker_event(event_id(1), START_MS), dvce_created_tstamp="yesterday"),
            "invalid_timestamp",
        ),
        (
            enriched_tsv(
                tracker_event(event_id(1), START_MS), dvce_created_tstamp="", dvce_sent_tstamp=""
            ),
            "missing_timestamp",
        ),
        (enriched_tsv(tracker_event(event_id(1), START_MS), contexts="{"), "invalid_contexts"),
    ],
)
def test_a_bad_enriched_event_is_bad_input_with_its_reason(record: bytes, reason: str) -> None:
    with pytest.raises(BadInput) as raised:
        TSV.decode(record)
    assert raised.value.reason == reason


kinds = st.sampled_from(["screen_view", "struct", "page_view", "background", "foreground"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(kinds, st.sampled_from([1, 10, 20, 70, 3600]), st.booleans()),
        min_size=1,
        max_size=25,
    )
)
def test_sessions_are_those_of_the_same_events_as_tracker_events(
    timeline: list[tuple[Kind, int, bool]],
) -> None:
    tsv_state: SessionState | None = None
    json_state: SessionState | None = None
    time_ms = START_MS
    for number, (kind, gap_s, with_entity) in enumerate(timeline):
        time_ms += gap_s * 1000
        entities = [APPLICATION_ENTITY] if with_entity else None
        fields = tracker_event(event_id(number), time_ms, kind, entities=entities)
        record = enriched_tsv(fields, duid="d-1")
        tsv_step, tsv_enriched = ENRICHER.enrich("d-1", tsv_state, TSV.decode(record))
        json_step, json_enriched = ENRICHER.enrich(
            "d-1", json_state, JSON.decode(tracker.dump(fields))
        )
        tsv_state, json_state = tsv_step.state, json_step.state
        out = TSV.encode(tsv_enriched)
        assert session_in(out) == entity_of(json.loads(JSON.encode(json_enriched)))
        # Every other field byte for byte; the tracker's entities stay in contexts.
        before, after = record.split(b"\t"), out.split(b"\t")
        assert len(after) == len(FIELDS)
        changed = [FIELDS[i] for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert changed == ["derived_contexts"]


def test_the_entity_goes_into_contexts_when_told() -> None:
    tsv = codecs(
        replace(
            config.Settings(),
            input_format="snowplow-enriched",
            output_format="snowplow-enriched",
            entity_field="contexts",
        )
    )
    fields = tracker_event(event_id(1), START_MS, entities=[APPLICATION_ENTITY])
    record = enriched_tsv(fields, derived_contexts=json.dumps({"schema": "x", "data": []}))
    _, enriched = ENRICHER.enrich("d", None, tsv.decode(record))
    out = tsv.encode(enriched)
    assert session_in(out, "contexts")["sessionIndex"] == 1
    schemas = [e["schema"] for e in json.loads(column(out, "contexts"))["data"]]
    assert schemas == [APPLICATION_ENTITY["schema"], CLIENT_SESSION]
    assert column(out, "derived_contexts") == column(record.decode().encode(), "derived_contexts")


def test_the_enriched_format_is_written_back_only_as_itself() -> None:
    with pytest.raises(config.ConfigError, match="must both be snowplow-enriched"):
        config.load({"ENRICHER_INPUT_FORMAT": "snowplow-enriched"})
    with pytest.raises(config.ConfigError, match="ENRICHER_ENTITY_FIELD"):
        config.load({"ENRICHER_ENTITY_FIELD": "unstruct_event"})


def test_generated_enriched_records_read_back_as_their_events() -> None:
    traffic = generate.Traffic(events=500, devices=20, seed=3)
    for device, fields in generate.events(traffic):
        record = generate.enriched_record(device, fields)
        event, original = TSV.decode(record), JSON.decode(tracker.dump(fields))
        assert (event.event_id, event.time_ms, event.lifecycle, event.app_id) == (
            original.event_id,
            original.time_ms,
            original.lifecycle,
            original.app_id,
        )
        assert column(record, "domain_userid") == device
