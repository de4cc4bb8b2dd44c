"""Every entity the enricher produces is valid against its Iglu schema; the entity options
(``--keep-tracker-entities``, ``--no-session-context``, ``--lifecycle-context``) do what they
say."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    APPLICATION_ENTITY,
    APPLICATION_LIFECYCLE,
    CLIENT_SESSION,
    KINDS,
    REPO,
    SCREEN_ENTITY,
    START_MS,
    Fields,
    Json,
    Kind,
    Timeline,
    contexts_of,
    entity_of,
    event_id,
    timelines,
    tracker_event,
)

from enricher.codecs import tracker
from enricher.codecs.tracker import ContextsField
from enricher.enrich import Enriched, Enricher, EntityOptions
from enricher.entities import client_session_data
from enricher.session import (
    STORAGE_MECHANISMS,
    Lifecycle,
    SessionConfig,
    SessionEngine,
    SessionState,
    Timeouts,
)

PROPERTIES = settings(max_examples=150, derandomize=True, database=None, deadline=None)
SCHEMA_DIR = REPO / "schemas" / "iglu"
# jsonschema only checks formats it is given a checker for: this one knows uuid and date-time.
FORMATS = jsonschema.FormatChecker()


def load_schemas() -> dict[str, jsonschema.Draft4Validator]:
    """The Iglu schemas by their ``iglu:`` URI."""
    validators: dict[str, jsonschema.Draft4Validator] = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text())
        self_ = schema["self"]
        uri = f"iglu:{self_['vendor']}/{self_['name']}/{self_['format']}/{self_['version']}"
        jsonschema.Draft4Validator.check_schema(schema)
        validators[uri] = jsonschema.Draft4Validator(schema, format_checker=FORMATS)
    return validators


VALIDATORS = load_schemas()


def errors(schema: str, data: object) -> list[jsonschema.ValidationError]:
    return list(VALIDATORS[schema].iter_errors(data))


def assert_valid(entity: Json) -> None:
    problems = errors(entity["schema"], entity["data"])
    assert not problems, "\n".join(f"{e.json_path}: {e.message}" for e in problems)


def enricher(options: EntityOptions | None = None, **config: Any) -> Enricher:
    return Enricher(SessionEngine(SessionConfig(salt="test-salt", **config)), options)


# --- the schemas themselves -----------------------------------------------------------------------


def test_both_schemas_are_present() -> None:
    assert set(VALIDATORS) == {CLIENT_SESSION, APPLICATION_LIFECYCLE}
    for validator in VALIDATORS.values():
        assert validator.schema["additionalProperties"] is False


def valid_session() -> Json:
    event = tracker.from_fields(tracker_event(event_id(1), START_MS))
    return session_entity(enricher().engine.advance("d", None, event.facts).state)


def session_entity(state: SessionState) -> Json:
    return client_session_data(state, "LOCAL_STORAGE")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sessionId", "not-a-uuid"),
        ("sessionId", "6ba7b810-9dad-11d1-80b4-00c04fd430c8-extra"),
        ("previousSessionId", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"),
        ("firstEventId", "1234"),
        ("firstEventTimestamp", "2026-01-01 05:43:50"),
        ("firstEventTimestamp", "2026-13-01T05:43:50.664Z"),
        ("firstEventTimestamp", "yesterday"),
    ],
)
def test_formats_are_enforced(field: str, value: str) -> None:
    data = valid_session()
    assert not errors(CLIENT_SESSION, data)
    data[field] = value
    found = errors(CLIENT_SESSION, data)
    assert [e.validator for e in found] == ["format"], found


@pytest.mark.parametrize(
    ("change", "keyword"),
    [
        ({"extra": 1}, "additionalProperties"),
        ({"userId": "ABCDEF00-0000-4000-8000-000000000000"}, "pattern"),
        ({"sessionIndex": -1}, "minimum"),
        ({"sessionIndex": 2**31}, "maximum"),
        ({"sessionIndex": "1"}, "type"),
        ({"eventIndex": 1.5}, "type"),
        ({"storageMechanism": "DISK"}, "enum"),
    ],
)
def test_client_session_schema_rejects(change: Json, keyword: str) -> None:
    data = {**valid_session(), **change}
    assert [e.validator for e in errors(CLIENT_SESSION, data)] == [keyword]


@pytest.mark.parametrize("field", ["userId", "sessionId", "sessionIndex", "storageMechanism"])
def test_client_session_required_fields(field: str) -> None:
    data = valid_session()
    del data[field]
    assert [e.validator for e in errors(CLIENT_SESSION, data)] == ["required"]


def test_application_lifecycle_schema_rejects_extra_fields() -> None:
    assert not errors(APPLICATION_LIFECYCLE, {"isVisible": True, "index": 0})
    found = errors(APPLICATION_LIFECYCLE, {"isVisible": True, "index": 0, "extra": 1})
    assert [e.validator for e in found] == ["additionalProperties"]
    assert [e.validator for e in errors(APPLICATION_LIFECYCLE, {"index": 0})] == ["required"]


# --- every produced entity is valid ---------------------------------------------------------------


KIND_OF: dict[Lifecycle | None, Kind] = {
    Lifecycle.BACKGROUND: "background",
    Lifecycle.FOREGROUND: "foreground",
}


def enrich_timeline(line: Timeline, storage: str, options: EntityOptions) -> list[Enriched]:
    at = enricher(
        options,
        timeouts=Timeouts(line.foreground_ms, line.background_ms),
        app_timeouts={"fast": Timeouts(line.app_foreground_ms, line.app_background_ms)},
        storage_mechanism=storage,
    )
    state: SessionState | None = None
    out: list[Enriched] = []
    for number, facts in enumerate(line.events):
        kind = KIND_OF.get(facts.lifecycle) or KINDS[number % 3]
        fields = tracker_event(facts.event_id, facts.time_ms, kind, aid=facts.app_id)
        step, enriched = at.enrich("device-1", state, tracker.from_fields(fields))
        state = step.state
        out.append(enriched)
    return out


@PROPERTIES
@given(timelines(), st.sampled_from(STORAGE_MECHANISMS))
def test_every_produced_entity_is_valid(line: Timeline, storage: str) -> None:
    options = EntityOptions(lifecycle_context=True)
    for enriched in enrich_timeline(line, storage, options):
        schemas = [entity["schema"] for entity in enriched.entities]
        assert schemas == [CLIENT_SESSION, APPLICATION_LIFECYCLE]
        for entity in enriched.entities:
            assert_valid(entity)
        session = enriched.entities[0]["data"]
        assert set(session) == set(VALIDATORS[CLIENT_SESSION].schema["properties"])
        assert session["storageMechanism"] == storage
        # What goes out in the event is what was validated.
        fields = tracker.with_entities(enriched.event, enriched.entities)
        assert contexts_of(fields) == enriched.entities


@PROPERTIES
@given(timelines(), st.sampled_from(STORAGE_MECHANISMS))
def test_the_usual_events_shortcut_writes_what_the_codec_writes(
    line: Timeline, storage: str
) -> None:
    """An event without contexts, with the default options, takes ``Enriched.fields``'
    shortcut (the session's prepared JSON, no entity built): its fields and their bytes are
    exactly what the tracker codec writes with the entities."""
    for enriched in enrich_timeline(line, storage, EntityOptions()):
        assert enriched.event.contexts_field is None  # the shortcut's case
        general = tracker.with_entities(enriched.event, enriched.entities)
        shortcut = enriched.fields()
        assert shortcut == general
        assert tracker.dump(shortcut) == tracker.dump(general)


@PROPERTIES
@given(timelines())
def test_lifecycle_entity_follows_the_state(line: Timeline) -> None:
    options = EntityOptions(lifecycle_context=True, session_context=False)
    background = False
    for facts, enriched in zip(line.events, enrich_timeline(line, "SQLITE", options), strict=True):
        if facts.lifecycle is not None:
            background = facts.lifecycle.value == "background"
        assert enriched.client_session is None
        lifecycle = enriched.application_lifecycle
        assert lifecycle is not None
        assert lifecycle["data"]["isVisible"] is not background
        assert isinstance(lifecycle["data"]["index"], int)
        assert lifecycle["data"]["index"] >= 0


def test_lifecycle_index_counts_the_current_state() -> None:
    at = enricher(EntityOptions(lifecycle_context=True))
    state: SessionState | None = None
    seen: list[Json] = []
    kinds: list[Kind] = ["screen_view", "background", "foreground", "background", "struct"]
    for n, kind in enumerate(kinds, 1):
        fields = tracker_event(event_id(n), START_MS + n, kind)
        step, enriched = at.enrich("d", state, tracker.from_fields(fields))
        state = step.state
        assert enriched.application_lifecycle is not None
        seen.append(enriched.application_lifecycle["data"])
    assert seen == [
        {"isVisible": True, "index": 0},
        {"isVisible": False, "index": 1},
        {"isVisible": True, "index": 1},
        {"isVisible": False, "index": 2},
        {"isVisible": False, "index": 2},
    ]


# --- entity options -------------------------------------------------------------------------------

TRACKER_SESSION: Json = {
    "schema": "iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-1",
    "data": {
        "userId": "0f1b8a3e-47a7-4a8c-9d6e-2b9f1c0e5d11",
        "sessionId": "7e0c6a52-3b1d-4f2e-8a9c-5d4b3a2f1e00",
        "sessionIndex": 42,
        "storageMechanism": "SQLITE",
    },
}


def run(options: EntityOptions, events: list[Fields]) -> list[tuple[SessionState, Fields]]:
    at = enricher(options, timeouts=Timeouts.from_seconds(10, 10))
    state: SessionState | None = None
    out: list[tuple[SessionState, Fields]] = []
    for fields in events:
        event = tracker.from_fields(fields)
        step, enriched = at.enrich("d", state, event)
        state = step.state
        out.append((state, tracker.with_entities(event, enriched.entities)))
    return out


@pytest.mark.parametrize("field", ["co", "cx"])
def test_keep_tracker_entities(field: ContextsField) -> None:
    with_session = tracker_event(
        event_id(1), START_MS, entities=[SCREEN_ENTITY, TRACKER_SESSION], contexts_field=field
    )
    without = tracker_event(event_id(2), START_MS + 1, entities=[APPLICATION_ENTITY])
    bare = tracker_event(event_id(3), START_MS + 60_000)
    out = run(EntityOptions(keep_tracker_entities=True), [with_session, without, bare])
    # The tracker's session is kept as it was, and ours is not added.
    assert out[0][1] == with_session
    assert contexts_of(out[0][1]) == [SCREEN_ENTITY, TRACKER_SESSION]
    # Events without one get ours, after their own entities.
    assert [e["schema"] for e in contexts_of(out[1][1])] == [
        APPLICATION_ENTITY["schema"],
        CLIENT_SESSION,
    ]
    ours = entity_of(out[2][1])
    assert ours is not None
    # The state advanced through all of them, whichever entity went out.
    assert [state.session_index for state, _ in out] == [1, 1, 2]
    assert [state.event_index for state, _ in out] == [1, 2, 1]
    assert ours["sessionIndex"] == 2


def test_keep_tracker_entities_still_adds_other_entities() -> None:
    fields = tracker_event(event_id(1), START_MS, "background", entities=[TRACKER_SESSION])
    options = EntityOptions(keep_tracker_entities=True, lifecycle_context=True)
    [(_, out)] = run(options, [fields])
    assert contexts_of(out) == [
        TRACKER_SESSION,
        {"schema": APPLICATION_LIFECYCLE, "data": {"isVisible": False, "index": 1}},
    ]


def test_default_replaces_the_tracker_session() -> None:
    fields = tracker_event(event_id(1), START_MS, entities=[TRACKER_SESSION, SCREEN_ENTITY])
    [(state, out)] = run(EntityOptions(), [fields])
    assert [e["schema"] for e in contexts_of(out)] == [SCREEN_ENTITY["schema"], CLIENT_SESSION]
    assert entity_of(out) == session_entity(state)


@pytest.mark.parametrize("kind", KINDS)
def test_no_session_context_attaches_nothing_but_keeps_state(kind: Kind) -> None:
    events = [
        tracker_event(event_id(1), START_MS, kind),
        tracker_event(event_id(2), START_MS + 1, kind, entities=[TRACKER_SESSION]),
        tracker_event(event_id(3), START_MS + 30_000, kind, contexts_field="cx", entities=[]),
    ]
    out = run(EntityOptions(session_context=False), events)
    assert [fields for _, fields in out] == events  # untouched, tracker entities included
    assert [state.session_index for state, _ in out] == [1, 1, 2]


def test_lifecycle_only() -> None:
    fields = tracker_event(event_id(1), START_MS, "screen_view")
    [(_, out)] = run(EntityOptions(session_context=False, lifecycle_context=True), [fields])
    assert contexts_of(out) == [
        {"schema": APPLICATION_LIFECYCLE, "data": {"isVisible": True, "index": 0}}
    ]


def test_entity_helpers_agree_with_the_event() -> None:
    at = enricher(EntityOptions(lifecycle_context=True))
    fields = tracker_event(event_id(1), START_MS, entities=[SCREEN_ENTITY, TRACKER_SESSION])
    _, enriched = at.enrich("d", None, tracker.from_fields(fields))
    assert enriched.client_session is enriched.entities[0]
    assert enriched.application_lifecycle is enriched.entities[1]
    assert enriched.contexts == [SCREEN_ENTITY, *enriched.entities]
    assert copy.deepcopy(enriched.contexts) == contexts_of(
        tracker.with_entities(enriched.event, enriched.entities)
    )
