"""The session rules (``session-rules.md``), case by case, then against a reference model.

The explicit cases pin each rule down with hand-computed expectations; the property tests run
random timelines through the engine and through ``reference_sessions`` below, a plain loop
written from the rules text, and require the two to agree on every event.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import (
    DAY_MS,
    SECOND,
    START_MS,
    Kind,
    Timeline,
    event_id,
    facts,
    is_uuid4,
    iso,
    run_engine,
    timelines,
)

from enricher.entities import client_session_data, iso_millis
from enricher.session import (
    EventFacts,
    Lifecycle,
    SessionConfig,
    SessionEngine,
    StartCause,
    Step,
    Timeouts,
)

PROPERTIES = settings(max_examples=250, derandomize=True, database=None, deadline=None)


def engine(
    foreground_s: float = 1800,
    background_s: float = 1800,
    *,
    salt: str = "test-salt",
    apps: Mapping[str, tuple[float, float]] | None = None,
) -> SessionEngine:
    app_timeouts = {app: Timeouts.from_seconds(*pair) for app, pair in (apps or {}).items()}
    return SessionEngine(
        SessionConfig(
            salt=salt,
            timeouts=Timeouts.from_seconds(foreground_s, background_s),
            app_timeouts=app_timeouts,
        )
    )


def timeline(*events: tuple[int, Kind]) -> list[EventFacts]:
    """Events at the given offsets in milliseconds from START_MS, numbered from 1."""
    return [facts(n, START_MS + offset, kind) for n, (offset, kind) in enumerate(events, 1)]


def indexes(steps: Sequence[Step]) -> list[int]:
    return [step.state.session_index for step in steps]


def causes(steps: Sequence[Step]) -> list[StartCause | None]:
    return [step.started for step in steps]


# --- rule 1: unknown device -----------------------------------------------------------------------


def test_unknown_device_starts_session_one() -> None:
    time_ms = START_MS + ((5 * 60 + 43) * 60 + 50) * SECOND + 664
    step = engine().advance("device-1", None, facts(1, time_ms))
    state = step.state
    assert step.started is StartCause.NEW_DEVICE
    assert state.session_index == 1
    assert state.previous_session_id is None
    assert state.event_index == 1
    assert state.first_event_id == event_id(1)
    assert state.first_event_ms == state.last_event_ms == time_ms
    assert not state.in_background
    assert (state.background_index, state.foreground_index) == (0, 0)
    assert is_uuid4(state.user_id)
    assert is_uuid4(state.session_id)
    assert state.user_id != state.session_id
    entity = client_session_data(state, "LOCAL_STORAGE")
    assert entity == {
        "userId": state.user_id,
        "sessionId": state.session_id,
        "sessionIndex": 1,
        "previousSessionId": None,
        "storageMechanism": "LOCAL_STORAGE",
        "eventIndex": 1,
        "firstEventId": event_id(1),
        "firstEventTimestamp": "2026-01-01T05:43:50.664Z",
    }


@pytest.mark.parametrize(
    ("time_ms", "expected"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (7, "1970-01-01T00:00:00.007Z"),
        (START_MS + 1, "2026-01-01T00:00:00.001Z"),
        (START_MS + 999, "2026-01-01T00:00:00.999Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
    ],
)
def test_first_event_timestamp_is_javascript_iso_string(time_ms: int, expected: str) -> None:
    assert iso(time_ms) == expected  # the helper the property tests rely on
    assert iso_millis(time_ms) == expected
    state = engine().advance("d", None, facts(1, time_ms)).state
    assert client_session_data(state, "SQLITE")["firstEventTimestamp"] == expected


# --- rule 2: the timeout check --------------------------------------------------------------------


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_gap_equal_to_timeout_stays_and_one_more_ms_renews(background: bool) -> None:
    # Different timeouts per state, so the test also tells which one was applied.
    timeout = 15 * SECOND if background else 360 * SECOND
    first: Kind = "background" if background else "screen_view"
    at = engine(360, 15)
    equal = run_engine(at, "d", timeline((0, first), (timeout, "struct")))
    beyond = run_engine(at, "d", timeline((0, first), (timeout + 1, "struct")))
    assert indexes(equal) == [1, 1]
    assert causes(equal) == [StartCause.NEW_DEVICE, None]
    assert indexes(beyond) == [1, 2]
    expected = StartCause.BACKGROUND_TIMEOUT if background else StartCause.FOREGROUND_TIMEOUT
    assert beyond[1].started is expected


@pytest.mark.parametrize(("foreground", "background"), [(0, 1800), (1800, 0), (0, 0)])
def test_timeout_zero_only_same_millisecond_stays(foreground: int, background: int) -> None:
    first: Kind = "background" if background == 0 else "screen_view"
    steps = run_engine(
        engine(foreground, background),
        "d",
        timeline((0, first), (0, "struct"), (1, "struct"), (1, "struct"), (3, "page_view")),
    )
    assert indexes(steps) == [1, 1, 2, 2, 3]
    assert [step.state.event_index for step in steps] == [1, 2, 1, 2, 1]


def test_renewal_links_sessions_and_keeps_user() -> None:
    steps = run_engine(
        engine(10, 10),
        "d",
        timeline((0, "screen_view"), (5_000, "struct"), (20_000, "struct"), (40_000, "struct")),
    )
    states = [step.state for step in steps]
    assert indexes(steps) == [1, 1, 2, 3]
    assert len({state.user_id for state in states}) == 1
    assert states[2].previous_session_id == states[1].session_id
    assert states[3].previous_session_id == states[2].session_id
    assert len({states[1].session_id, states[2].session_id, states[3].session_id}) == 3
    assert (states[2].first_event_id, states[2].first_event_ms) == (event_id(3), START_MS + 20_000)
    assert states[2].event_index == 1


def test_background_timeout_applies_while_in_background() -> None:
    # fg 1800 s, bg 15 s: 16 s in the background is too long, 16 s in the foreground is not.
    steps = run_engine(
        engine(1800, 15),
        "d",
        timeline((0, "background"), (16_000, "struct"), (32_000, "foreground"), (48_000, "struct")),
    )
    assert indexes(steps) == [1, 2, 3, 3]
    assert causes(steps) == [
        StartCause.NEW_DEVICE,
        StartCause.BACKGROUND_TIMEOUT,
        StartCause.BACKGROUND_TIMEOUT,
        None,
    ]


def test_foreground_timeout_does_not_apply_in_background() -> None:
    # fg 10 s, bg 1000 s: 500 s in the background stays in the session.
    steps = run_engine(
        engine(10, 1000),
        "d",
        timeline((0, "background"), (500_000, "foreground"), (510_001, "page_view")),
    )
    assert indexes(steps) == [1, 1, 2]
    assert steps[2].started is StartCause.FOREGROUND_TIMEOUT


# --- rule 3: lifecycle ----------------------------------------------------------------------------


def test_seed_worked_example() -> None:
    """fg 360 s, bg 15 s: ScreenView 0 s -> 1, Background 3 s -> 1 (checked with the foreground
    timeout), Foreground 30 s -> 2 (27 s in the background > 15 s)."""
    steps = run_engine(
        engine(360, 15),
        "d",
        timeline((0, "screen_view"), (3_000, "background"), (30_000, "foreground")),
    )
    states = [step.state for step in steps]
    assert indexes(steps) == [1, 1, 2]
    assert causes(steps) == [StartCause.NEW_DEVICE, None, StartCause.BACKGROUND_TIMEOUT]
    assert [s.event_index for s in states] == [1, 2, 1]
    assert [s.in_background for s in states] == [False, True, False]
    assert [(s.background_index, s.foreground_index) for s in states] == [(0, 0), (1, 0), (0, 1)]
    assert states[2].previous_session_id == states[0].session_id == states[1].session_id
    assert states[2].first_event_id == event_id(3)
    assert states[2].first_event_ms == START_MS + 30_000


def test_background_event_is_checked_with_foreground_timeout() -> None:
    # fg 10 s, bg 1000 s: a Background 11 s after the last event renews (foreground timeout),
    # and the new session counts the Background's own transition.
    steps = run_engine(engine(10, 1000), "d", timeline((0, "screen_view"), (11_000, "background")))
    assert indexes(steps) == [1, 2]
    assert steps[1].started is StartCause.FOREGROUND_TIMEOUT
    assert steps[1].state.in_background
    assert (steps[1].state.background_index, steps[1].state.foreground_index) == (1, 0)


def test_foreground_event_is_checked_with_background_timeout() -> None:
    # fg 1000 s, bg 10 s: a Foreground 11 s after a Background renews; 10 s would not.
    at = engine(1000, 10)
    renewed = run_engine(at, "d", timeline((0, "background"), (11_000, "foreground")))
    kept = run_engine(at, "d", timeline((0, "background"), (10_000, "foreground")))
    assert indexes(renewed) == [1, 2]
    assert renewed[1].started is StartCause.BACKGROUND_TIMEOUT
    assert indexes(kept) == [1, 1]
    assert (kept[1].state.background_index, kept[1].state.foreground_index) == (1, 1)


def test_repeated_lifecycle_events_are_not_transitions() -> None:
    steps = run_engine(
        engine(),
        "d",
        timeline(
            (0, "foreground"),  # already in the foreground
            (1, "background"),
            (2, "background"),  # already in the background
            (3, "struct"),
            (4, "foreground"),
            (5, "foreground"),
        ),
    )
    counters = [(s.state.background_index, s.state.foreground_index) for s in steps]
    assert counters == [(0, 0), (1, 0), (1, 0), (1, 0), (1, 1), (1, 1)]
    assert [s.state.in_background for s in steps] == [False, True, True, True, False, False]
    assert indexes(steps) == [1] * 6


def test_counters_restart_on_renewal_then_count_the_renewing_event() -> None:
    steps = run_engine(
        engine(60, 60),
        "d",
        timeline(
            (0, "background"),
            (1_000, "foreground"),
            (2_000, "background"),
            (3_000, "foreground"),
            (4_000, "background"),
            (70_000, "foreground"),  # 66 s in the background: session 2, its first foreground
            (71_000, "struct"),
            (200_000, "struct"),  # 129 s in the foreground: session 3, nothing counted
        ),
    )
    counters = [(s.state.background_index, s.state.foreground_index) for s in steps]
    assert indexes(steps) == [1, 1, 1, 1, 1, 2, 2, 3]
    assert counters == [(1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (0, 1), (0, 1), (0, 0)]


def test_renewal_while_staying_in_background_keeps_the_state() -> None:
    steps = run_engine(engine(1800, 5), "d", timeline((0, "background"), (6_000, "background")))
    assert indexes(steps) == [1, 2]
    # Already in the background: the renewed session has seen no transition of its own.
    assert steps[1].state.in_background
    assert (steps[1].state.background_index, steps[1].state.foreground_index) == (0, 0)


# --- rule 4: every event counts -------------------------------------------------------------------


def test_event_index_counts_every_event_and_restarts_per_session() -> None:
    kinds: list[Kind] = ["screen_view", "background", "struct", "foreground", "page_view"]
    events = [(i * 1_000, kind) for i, kind in enumerate(kinds)]
    events += [(100_000 + i * 1_000, kind) for i, kind in enumerate(kinds)]
    steps = run_engine(engine(30, 30), "d", timeline(*events))
    assert [s.state.event_index for s in steps] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    assert [s.state.first_event_id for s in steps] == [event_id(1)] * 5 + [event_id(6)] * 5


# --- rule 7: out of order -------------------------------------------------------------------------


def test_late_event_joins_current_session_without_moving_clock_back() -> None:
    steps = run_engine(
        engine(60, 60),
        "d",
        timeline(
            (100_000, "screen_view"),
            (50_000, "struct"),  # late by 50 s: joins
            (-DAY_MS, "struct"),  # late by a day: joins too
            (160_000, "struct"),  # 60 s after the latest (100 s), not 210 s after 50 s: stays
            (220_001, "struct"),  # 60.001 s after the latest: renews
        ),
    )
    assert indexes(steps) == [1, 1, 1, 1, 2]
    assert [s.state.last_event_ms - START_MS for s in steps] == [
        100_000,
        100_000,
        100_000,
        160_000,
        220_001,
    ]
    assert [s.state.event_index for s in steps] == [1, 2, 3, 4, 1]
    assert steps[2].state.first_event_id == event_id(1)


# --- per-app timeouts -----------------------------------------------------------------------------


def test_per_app_timeouts_override_the_defaults() -> None:
    at = engine(1800, 1800, apps={"fast": (2, 1)})
    events = [
        EventFacts(event_id(1), START_MS, None, "fast"),
        EventFacts(event_id(2), START_MS + 2_000, None, "fast"),  # == 2 s: stays
        EventFacts(event_id(3), START_MS + 4_001, None, "fast"),  # > 2 s: renews
        EventFacts(event_id(4), START_MS + 10_000, None, "slow"),  # defaults: stays
        EventFacts(event_id(5), START_MS + 20_000, None, None),  # no aid, defaults: stays
        EventFacts(event_id(6), START_MS + 21_000, Lifecycle.BACKGROUND, "fast"),
        EventFacts(event_id(7), START_MS + 22_001, None, "fast"),  # > 1 s in background
    ]
    steps = run_engine(at, "d", events)
    assert indexes(steps) == [1, 1, 2, 2, 2, 2, 3]
    assert steps[6].started is StartCause.BACKGROUND_TIMEOUT


# --- configuration --------------------------------------------------------------------------------


def test_timeouts_from_seconds() -> None:
    assert Timeouts.from_seconds(360, 15) == Timeouts(360_000, 15_000)
    assert Timeouts.from_seconds(0.5, 0) == Timeouts(500, 0)
    assert SessionConfig(salt="s").timeouts == Timeouts(1_800_000, 1_800_000)


@pytest.mark.parametrize(
    ("seconds", "gap_ms", "renews"),
    [(0.0015, 1, False), (0.0015, 2, True), (1.9999, 1999, False), (1.9999, 2000, True)],
)
def test_a_fractional_timeout_cuts_where_the_tracker_does(
    seconds: float, gap_ms: int, renews: bool
) -> None:
    """The tracker asks ``gap > seconds * 1000`` of a whole number of milliseconds."""
    assert (gap_ms > seconds * 1000) is renews
    config = SessionConfig(salt="s", timeouts=Timeouts.from_seconds(seconds, seconds))
    engine = SessionEngine(config)
    first = engine.advance("d", None, EventFacts(event_id(1), START_MS)).state
    step = engine.advance("d", first, EventFacts(event_id(2), START_MS + gap_ms))
    assert (step.state.session_index == 2) is renews


@pytest.mark.parametrize(
    ("foreground", "background"), [(-1, 10), (10, -0.001), (math.nan, 10), (10, math.inf)]
)
def test_timeouts_must_be_finite_and_not_negative(foreground: float, background: float) -> None:
    with pytest.raises(ValueError, match="timeouts"):
        Timeouts.from_seconds(foreground, background)


def test_storage_mechanism_is_checked() -> None:
    with pytest.raises(ValueError, match="storage_mechanism"):
        SessionConfig(salt="s", storage_mechanism="DISK")


# --- the reference model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What the rules say the device's session is after one event."""

    session_index: int
    event_index: int
    first_event_id: str
    first_event_ms: int
    latest_ms: int
    in_background: bool
    background_index: int
    foreground_index: int
    started: StartCause | None


def reference_sessions(line: Timeline) -> list[Expected]:
    """The rules, applied literally, one event at a time."""
    out: list[Expected] = []
    latest: int | None = None
    session = events = background_count = foreground_count = 0
    first_id, first_ms = "", 0
    background = False
    for event in line.events:
        started: StartCause | None = None
        if latest is None:  # rule 1
            started = StartCause.NEW_DEVICE
        else:  # rule 2
            foreground_ms, background_ms = line.timeouts_for(event.app_id)
            if event.time_ms - latest > (background_ms if background else foreground_ms):
                started = (
                    StartCause.BACKGROUND_TIMEOUT if background else StartCause.FOREGROUND_TIMEOUT
                )
        if started is not None:
            session += 1
            events = background_count = foreground_count = 0
            first_id, first_ms = event.event_id, event.time_ms
        # rule 3
        if event.lifecycle is Lifecycle.BACKGROUND and not background:
            background, background_count = True, background_count + 1
        if event.lifecycle is Lifecycle.FOREGROUND and background:
            background, foreground_count = False, foreground_count + 1
        # rules 4 and 7
        events += 1
        latest = event.time_ms if latest is None else max(latest, event.time_ms)
        out.append(
            Expected(
                session,
                events,
                first_id,
                first_ms,
                latest,
                background,
                background_count,
                foreground_count,
                started,
            )
        )
    return out


def engine_for(line: Timeline, salt: str = "test-salt") -> SessionEngine:
    return SessionEngine(
        SessionConfig(
            salt=salt,
            timeouts=Timeouts(line.foreground_ms, line.background_ms),
            app_timeouts={"fast": Timeouts(line.app_foreground_ms, line.app_background_ms)},
        )
    )


def observed(step: Step) -> Expected:
    s = step.state
    return Expected(
        s.session_index,
        s.event_index,
        s.first_event_id,
        s.first_event_ms,
        s.last_event_ms,
        s.in_background,
        s.background_index,
        s.foreground_index,
        step.started,
    )


@PROPERTIES
@given(timelines())
def test_engine_matches_reference_model(line: Timeline) -> None:
    steps = run_engine(engine_for(line), "device-1", line.events)
    expected = reference_sessions(line)
    for position, (step, wanted) in enumerate(zip(steps, expected, strict=True)):
        assert observed(step) == wanted, f"event #{position}"
        entity = client_session_data(step.state, "SQLITE")
        assert entity["sessionIndex"] == wanted.session_index
        assert entity["eventIndex"] == wanted.event_index
        assert entity["firstEventId"] == wanted.first_event_id
        assert entity["firstEventTimestamp"] == iso(wanted.first_event_ms)


@PROPERTIES
@given(timelines())
def test_identifiers(line: Timeline) -> None:
    steps = run_engine(engine_for(line), "device-1", line.events)
    states = [step.state for step in steps]
    assert len({state.user_id for state in states}) == 1
    session_ids: dict[int, str] = {}
    for before, after in zip([None, *states], states, strict=False):
        assert is_uuid4(after.user_id)
        assert is_uuid4(after.session_id)
        session_ids.setdefault(after.session_index, after.session_id)
        assert session_ids[after.session_index] == after.session_id
        if before is None:
            assert after.previous_session_id is None
            continue
        renewed = after.session_index != before.session_index
        assert renewed == (after.session_id != before.session_id)
        if renewed:
            assert after.session_index == before.session_index + 1
            assert after.previous_session_id == before.session_id
        else:
            assert after.previous_session_id == before.previous_session_id
        if after.previous_session_id is not None:
            assert is_uuid4(after.previous_session_id)
    assert len(set(session_ids.values())) == len(session_ids)
    assert states[0].user_id not in session_ids.values()


@PROPERTIES
@given(timelines(max_events=15), st.text(max_size=20), st.text(max_size=20))
def test_salt_decides_the_identifiers(line: Timeline, salt: str, other: str) -> None:
    assume(other != salt)
    first = run_engine(engine_for(line, salt), "device-1", line.events)
    again = run_engine(engine_for(line, salt), "device-1", line.events)
    assert first == again
    changed = run_engine(engine_for(line, other), "device-1", line.events)
    for a, b in zip(first, changed, strict=True):
        assert observed(a) == observed(b)
        assert a.state.user_id != b.state.user_id
        assert a.state.session_id != b.state.session_id
        assert (a.state.previous_session_id is None) == (b.state.previous_session_id is None)
        if a.state.previous_session_id is not None:
            assert a.state.previous_session_id != b.state.previous_session_id


@PROPERTIES
@given(st.lists(timelines(max_events=12), min_size=2, max_size=4), st.randoms())
def test_devices_are_independent(lines: list[Timeline], rng: random.Random) -> None:
    """Devices interleaved in one stream get what each would get alone; each has its own user."""
    at = engine_for(lines[0])
    devices = [f"device-{n}" for n in range(len(lines))]
    alone = {d: run_engine(at, d, line.events) for d, line in zip(devices, lines, strict=True)}
    # A random interleaving that keeps each device's own order.
    turns = [d for d, line in zip(devices, lines, strict=True) for _ in line.events]
    rng.shuffle(turns)
    pending = {d: list(line.events) for d, line in zip(devices, lines, strict=True)}
    got: dict[str, list[Step]] = {d: [] for d in devices}
    for d in turns:
        prior = got[d][-1].state if got[d] else None
        got[d].append(at.advance(d, prior, pending[d].pop(0)))
    assert got == alone
    assert len({steps[0].state.user_id for steps in alone.values()}) == len(alone)
