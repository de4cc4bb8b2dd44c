"""Session events (``enricher.session_events``): explicit cases, then the service's use of
them emulated on random timelines and reconciled against the sessions the engine made.

The emulation does what the service does per device: every event goes through the engine and
``events.on_step``; every watermark sweep declares the session ended when ``expired``. The
records must then tell each session's story exactly: one start, and for every session that was
followed by another, ends whose highest revision describes the whole session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import DAY_MS, SECOND, START_MS, Kind, Timeline, event_id, facts, states, timelines

from enricher import session_events as events
from enricher.session import (
    EventFacts,
    Lifecycle,
    SessionConfig,
    SessionEngine,
    SessionState,
    StartCause,
    Step,
    Timeouts,
)
from enricher.session_ends import SessionEnds
from enricher.session_events import Detection, EndCause, SessionEnd, SessionEvent
from enricher.session_events import Kind as RecordKind

PROPERTIES = settings(max_examples=250, derandomize=True, database=None, deadline=None)
DEVICE = "device-1"


def engine(
    foreground_s: float = 1800,
    background_s: float = 1800,
    *,
    apps: Mapping[str, tuple[float, float]] | None = None,
) -> SessionEngine:
    app_timeouts = {app: Timeouts.from_seconds(*pair) for app, pair in (apps or {}).items()}
    return SessionEngine(
        SessionConfig(
            salt="test-salt",
            timeouts=Timeouts.from_seconds(foreground_s, background_s),
            app_timeouts=app_timeouts,
        )
    )


def engine_for(line: Timeline) -> SessionEngine:
    return SessionEngine(
        SessionConfig(
            salt="test-salt",
            timeouts=Timeouts(line.foreground_ms, line.background_ms),
            app_timeouts={"fast": Timeouts(line.app_foreground_ms, line.app_background_ms)},
        )
    )


@dataclass
class Device:
    """One device as the service handles it: its state, its renew counter, and every record
    published for it, in order."""

    engine: SessionEngine
    name: str = DEVICE
    state: SessionState | None = None
    renews: int = 0
    steps: list[Step] = field(default_factory=list)
    befores: list[SessionState | None] = field(default_factory=list)
    records: list[SessionEvent] = field(default_factory=list)
    sweeps: list[tuple[int, int]] = field(default_factory=list)
    """(how many events had been applied, watermark) of every sweep"""
    declared: list[tuple[int, int]] = field(default_factory=list)
    """the same, of the sweeps that declared the session ended"""

    def event(self, event: EventFacts) -> list[SessionEvent]:
        before = self.state
        step = self.engine.advance(self.name, before, event, self.renews)
        out = events.on_step(self.name, before, step)
        self.state = step.state
        self.steps.append(step)
        self.befores.append(before)
        self.records.extend(out)
        return out

    def at(self, offset_ms: int, kind: Kind = "screen_view") -> list[SessionEvent]:
        """The device's next event (numbered in order), ``offset_ms`` after START_MS."""
        return self.event(facts(len(self.steps) + 1, START_MS + offset_ms, kind))

    def sweep(self, watermark_ms: int) -> SessionEvent | None:
        assert self.state is not None
        self.sweeps.append((len(self.steps), watermark_ms))
        if not events.expired(self.state, watermark_ms):
            return None
        self.state, record = events.declare_ended(self.name, self.state, watermark_ms)
        self.records.append(record)
        self.declared.append((len(self.steps), watermark_ms))
        return record


def only(records: Sequence[SessionEvent]) -> SessionEvent:
    assert len(records) == 1, records
    return records[0]


def end_of(record: SessionEvent) -> SessionEnd:
    assert record.kind is RecordKind.ENDED
    assert record.end is not None
    return record.end


# --- session_started ------------------------------------------------------------------------------


def test_new_device_yields_one_start_and_no_end() -> None:
    device = Device(engine())
    record = only(device.at(0))
    state = device.steps[0].state
    assert record == SessionEvent(
        kind=RecordKind.STARTED,
        device_id=DEVICE,
        user_id=state.user_id,
        session_id=state.session_id,
        session_index=1,
        previous_session_id=None,
        first_event_id=event_id(1),
        first_event_ms=START_MS,
        start_cause=StartCause.NEW_DEVICE,
        end=None,
    )


def test_events_within_the_session_yield_nothing() -> None:
    device = Device(engine(60, 60))
    device.at(0)
    assert device.at(30 * SECOND) == []
    assert device.at(90 * SECOND) == []  # 60 s after the latest: still the session
    assert device.at(-5 * SECOND) == []  # late, joins
    assert [record.kind for record in device.records] == [RecordKind.STARTED]


# --- session_ended by the next event --------------------------------------------------------------


def test_foreground_timeout_ends_then_starts() -> None:
    device = Device(engine(60, 15))
    device.at(0, "background")
    device.at(5 * SECOND, "foreground")
    device.at(10 * SECOND, "struct")
    before = device.steps[-1].state
    ended, started = device.at(70 * SECOND + 1)  # 60.001 s in the foreground
    after = device.steps[-1].state
    assert after.session_index == 2
    assert ended == SessionEvent(
        kind=RecordKind.ENDED,
        device_id=DEVICE,
        user_id=before.user_id,
        session_id=before.session_id,
        session_index=1,
        previous_session_id=None,
        first_event_id=event_id(1),
        first_event_ms=START_MS,
        start_cause=None,
        end=SessionEnd(
            last_event_ms=START_MS + 10 * SECOND,
            event_count=3,
            foreground_transitions=1,
            background_transitions=1,
            in_background=False,
            cause=EndCause.FOREGROUND_TIMEOUT,
            detected_by=Detection.NEXT_EVENT,
            watermark_ms=None,
            next_session_id=after.session_id,
            revision=0,
        ),
    )
    assert started.kind is RecordKind.STARTED
    assert started.start_cause is StartCause.FOREGROUND_TIMEOUT
    assert (started.session_id, started.session_index) == (after.session_id, 2)
    assert started.previous_session_id == before.session_id
    assert (started.first_event_id, started.first_event_ms) == (event_id(4), START_MS + 70_001)
    assert started.end is None


def test_background_timeout_ends_then_starts() -> None:
    device = Device(engine(60, 15))
    device.at(0)
    device.at(5 * SECOND, "background")
    before = device.steps[-1].state
    ended, started = device.at(20 * SECOND + 1, "foreground")  # 15.001 s in the background
    end = end_of(ended)
    assert end == SessionEnd(
        last_event_ms=START_MS + 5 * SECOND,
        event_count=2,
        foreground_transitions=0,
        background_transitions=1,
        in_background=True,
        cause=EndCause.BACKGROUND_TIMEOUT,
        detected_by=Detection.NEXT_EVENT,
        watermark_ms=None,
        next_session_id=device.steps[-1].state.session_id,
        revision=0,
    )
    assert ended.session_id == before.session_id
    assert started.start_cause is StartCause.BACKGROUND_TIMEOUT
    assert started.previous_session_id == before.session_id


def test_timeout_boundary_yields_nothing_at_the_timeout_and_an_end_one_ms_later() -> None:
    staying = Device(engine(60, 60))
    staying.at(0)
    assert staying.at(60 * SECOND) == []
    ending = Device(engine(60, 60))
    ending.at(0)
    assert [r.kind for r in ending.at(60 * SECOND + 1)] == [RecordKind.ENDED, RecordKind.STARTED]


@pytest.mark.parametrize("offset_ms", [1, 30 * SECOND, 60 * SECOND], ids=["1ms", "30s", "60s"])
def test_renew_before_the_timeout_ends_by_renew(offset_ms: int) -> None:
    device = Device(engine(60, 15))
    device.at(0)
    device.renews = 1
    ended, started = device.at(offset_ms)
    assert end_of(ended).cause is EndCause.RENEW
    assert end_of(ended).detected_by is Detection.NEXT_EVENT
    assert end_of(ended).next_session_id == started.session_id
    assert started.start_cause is StartCause.RENEW


@pytest.mark.parametrize(
    ("first", "offset_ms", "cause"),
    [
        ("screen_view", 60 * SECOND + 1, EndCause.FOREGROUND_TIMEOUT),
        ("background", 15 * SECOND + 1, EndCause.BACKGROUND_TIMEOUT),
    ],
)
def test_renew_after_the_timeout_ends_and_starts_by_the_timeout(
    first: Kind, offset_ms: int, cause: EndCause
) -> None:
    device = Device(engine(60, 15))
    device.at(0, first)
    device.renews = 1
    ended, started = device.at(offset_ms)
    assert end_of(ended).cause is cause
    assert started.start_cause is StartCause(cause.value)
    assert device.steps[-1].state.renews_applied == 1


def test_timeout_by_another_apps_timeout_ends_by_the_timeout() -> None:
    device = Device(engine(1800, 1800, apps={"fast": (2, 1)}))
    device.event(EventFacts(event_id(1), START_MS, None, "app"))
    ended, started = device.event(EventFacts(event_id(2), START_MS + 10 * SECOND, None, "fast"))
    assert started.start_cause is StartCause.FOREGROUND_TIMEOUT
    assert device.renews == 0
    assert end_of(ended).cause is EndCause.FOREGROUND_TIMEOUT


# --- expiry and session_ended by the watermark ----------------------------------------------------


def test_expired_is_strict_and_false_once_ended() -> None:
    device = Device(engine(60, 15))
    device.at(0)
    state = device.steps[-1].state
    assert state.expires_ms == START_MS + 60 * SECOND
    assert not events.expired(state, state.expires_ms - 1)
    assert not events.expired(state, state.expires_ms)
    assert events.expired(state, state.expires_ms + 1)
    ended, _ = events.declare_ended(DEVICE, state, state.expires_ms + 1)
    assert not events.expired(ended, state.expires_ms + 1)
    assert not events.expired(ended, state.expires_ms + 10**12)


@pytest.mark.parametrize(
    ("kinds", "cause"),
    [
        (("screen_view", "struct"), EndCause.FOREGROUND_TIMEOUT),
        (("screen_view", "background"), EndCause.BACKGROUND_TIMEOUT),
    ],
)
def test_declare_ended_marks_the_state_and_yields_a_watermark_end(
    kinds: tuple[Kind, Kind], cause: EndCause
) -> None:
    device = Device(engine(60, 15))
    device.at(0, kinds[0])
    device.at(2 * SECOND, kinds[1])
    state = device.steps[-1].state
    watermark = state.expires_ms + 7
    new_state, record = events.declare_ended(DEVICE, state, watermark)
    assert new_state.ended
    assert new_state.ends_declared == 1
    assert replace(new_state, ended=False, ends_declared=0) == state
    assert record.kind is RecordKind.ENDED
    assert record.start_cause is None
    assert (record.device_id, record.session_id, record.user_id) == (
        DEVICE,
        state.session_id,
        state.user_id,
    )
    assert (record.session_index, record.first_event_id, record.first_event_ms) == (
        1,
        event_id(1),
        START_MS,
    )
    assert end_of(record) == SessionEnd(
        last_event_ms=START_MS + 2 * SECOND,
        event_count=2,
        foreground_transitions=0,
        background_transitions=state.background_index,
        in_background=state.in_background,
        cause=cause,
        detected_by=Detection.WATERMARK,
        watermark_ms=watermark,
        next_session_id=None,
        revision=0,
    )


@settings(max_examples=100, derandomize=True)
@given(states())
def test_an_end_declared_changes_the_end_fields_only(state: SessionState) -> None:
    state.formatted = ("{", "}", "LOCAL_STORAGE")
    declared = state.with_end_declared()
    assert declared == replace(state, ended=True, ends_declared=state.ends_declared + 1)
    assert declared.formatted is state.formatted


def test_late_event_reopens_a_declared_session_and_its_next_end_is_revision_one() -> None:
    device = Device(engine(60, 15))
    device.at(0)
    device.at(10 * SECOND)
    first_end = device.sweep(START_MS + 70 * SECOND + 1)  # expiry 70 s passed
    assert first_end is not None
    assert end_of(first_end).revision == 0
    assert end_of(first_end).event_count == 2
    declared = device.state
    assert declared is not None
    assert declared.ended

    assert device.at(20 * SECOND, "background") == []  # late: behind the watermark, joins
    assert events.reopened(declared, device.steps[-1])
    reopened = device.steps[-1].state
    assert not reopened.ended
    assert reopened.ends_declared == 1
    assert (reopened.session_id, reopened.event_index) == (declared.session_id, 3)

    ended, started = device.at(600 * SECOND)
    end = end_of(ended)
    assert ended.session_id == declared.session_id
    assert end.revision == 1
    assert end.detected_by is Detection.NEXT_EVENT
    assert (end.event_count, end.background_transitions, end.in_background) == (3, 1, True)
    assert end.cause is EndCause.BACKGROUND_TIMEOUT
    assert end.next_session_id == started.session_id
    assert started.start_cause is StartCause.BACKGROUND_TIMEOUT
    assert not events.reopened(reopened, device.steps[-1])


def test_a_batch_counts_the_events_that_reopen_a_declared_session() -> None:
    device = Device(engine(60, 15))
    device.at(0)
    assert device.sweep(START_MS + 60 * SECOND + 1) is not None
    declared = device.state
    device.at(10 * SECOND)  # late: joins the declared session
    ends = SessionEnds(lateness_ms=0)
    assert ends.on_event(DEVICE, declared, device.steps[-1]) == []
    assert ends.on_event(DEVICE, device.befores[0], device.steps[0]) != []  # a start
    assert ends.reopened == 1


def test_reopened_session_declared_again_is_revision_one_by_watermark() -> None:
    device = Device(engine(60, 15))
    device.at(0)
    assert device.sweep(START_MS + 60 * SECOND + 1) is not None
    device.at(30 * SECOND)
    assert device.sweep(START_MS + 60 * SECOND + 5) is None  # reopened: expires at 90 s now
    again = device.sweep(START_MS + 90 * SECOND + 1)
    assert again is not None
    end = end_of(again)
    assert (end.revision, end.event_count, end.detected_by) == (1, 2, Detection.WATERMARK)
    assert end.watermark_ms == START_MS + 90 * SECOND + 1
    assert device.state is not None
    assert device.state.ends_declared == 2


def test_new_session_after_a_declared_end_yields_only_its_start() -> None:
    device = Device(engine(60, 15))
    device.at(0)
    device.at(10 * SECOND)
    assert device.sweep(START_MS + 80 * SECOND) is not None
    declared = device.state
    assert declared is not None
    started = only(device.at(200 * SECOND))
    assert started.kind is RecordKind.STARTED
    assert started.start_cause is StartCause.FOREGROUND_TIMEOUT
    assert started.previous_session_id == declared.session_id
    assert not events.reopened(declared, device.steps[-1])
    fresh = device.steps[-1].state
    assert (fresh.ended, fresh.ends_declared, fresh.session_index) == (False, 0, 2)
    kinds = [(r.kind, r.session_index) for r in device.records]
    assert kinds == [(RecordKind.STARTED, 1), (RecordKind.ENDED, 1), (RecordKind.STARTED, 2)]


def test_renew_after_a_declared_end_yields_only_the_start() -> None:
    device = Device(engine(60, 15))
    device.at(0)
    assert device.sweep(START_MS + 61 * SECOND) is not None
    device.renews = 1
    started = only(device.at(-SECOND))  # late, but a renew is pending
    assert started.start_cause is StartCause.RENEW
    assert started.session_index == 2


def test_reopened_is_false_for_ordinary_steps() -> None:
    device = Device(engine(60, 15))
    device.at(0)
    assert not events.reopened(None, device.steps[0])
    device.at(SECOND)
    assert not events.reopened(device.befores[1], device.steps[1])
    device.at(100 * SECOND)
    assert not events.reopened(device.befores[2], device.steps[2])


# --- clock and expiry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_ms", "kafka_ms", "expected"),
    [
        (100, 200, 100),
        (300, 200, 200),
        (200, 200, 200),
        (100, 0, 100),
        (100, -1, 100),
        (START_MS + DAY_MS, START_MS, START_MS),
    ],
)
def test_clock_time_is_the_event_time_capped_by_the_kafka_timestamp(
    event_ms: int, kafka_ms: int, expected: int
) -> None:
    assert events.clock_time(event_ms, kafka_ms) == expected


def test_expires_follows_the_timeout_in_force() -> None:
    device = Device(engine(60, 15, apps={"fast": (2, 1)}))
    device.at(0)
    assert device.steps[-1].state.expires_ms == START_MS + 60 * SECOND
    device.at(10 * SECOND, "background")
    assert device.steps[-1].state.expires_ms == START_MS + 25 * SECOND
    device.at(11 * SECOND, "foreground")
    assert device.steps[-1].state.expires_ms == START_MS + 71 * SECOND
    device.at(5 * SECOND)  # late: the latest time stays
    assert device.steps[-1].state.expires_ms == START_MS + 71 * SECOND
    device.event(EventFacts(event_id(9), START_MS + 12 * SECOND, None, "fast"))
    assert device.steps[-1].state.expires_ms == START_MS + 14 * SECOND
    device.event(EventFacts(event_id(10), START_MS + 13 * SECOND, Lifecycle.BACKGROUND, "fast"))
    assert device.steps[-1].state.expires_ms == START_MS + 14 * SECOND
    assert [step.state.session_index for step in device.steps] == [1] * 6


def test_zero_timeout_expires_at_the_latest_event() -> None:
    device = Device(engine(0, 0))
    device.at(0)
    state = device.steps[-1].state
    assert state.expires_ms == START_MS
    assert events.expired(state, START_MS + 1)


# --- the service, emulated on random timelines ----------------------------------------------------


# Strategies built once: building them per draw would cost more than the whole test.
SWEEPS = st.integers(min_value=0, max_value=2)
# A watermark at the expiry or 1 ms around it, or anywhere from three timeouts before the latest
# event to two after it (in 1/1024ths of the timeout, at least a second).
WATERMARKS = st.one_of(
    st.tuples(st.just(True), st.integers(min_value=-1, max_value=1)),
    st.tuples(st.just(False), st.integers(min_value=-3 * 1024, max_value=2 * 1024)),
)
RENEWS = st.sampled_from((0, 0, 0, 0, 1, 2))


def draw_sweeps(data: st.DataObject, device: Device, watermark: int | None) -> int | None:
    """Zero to two sweeps with a watermark near the device's expiry, never moving back."""
    state = device.state
    assert state is not None
    spread = max(state.expires_ms - state.last_event_ms, SECOND)
    for _ in range(data.draw(SWEEPS, label="sweeps")):
        at_expiry, offset = data.draw(WATERMARKS, label="watermark")
        if at_expiry:
            near = state.expires_ms + offset
        else:
            near = state.last_event_ms + offset * spread // 1024
        watermark = near if watermark is None else max(watermark, near)
        device.sweep(watermark)
    return watermark


def emulate(data: st.DataObject, line: Timeline, renews: bool) -> Device:
    device = Device(engine_for(line))
    watermark: int | None = None
    for number, event in enumerate(line.events):
        if number:
            watermark = draw_sweeps(data, device, watermark)
        if renews:
            device.renews += data.draw(RENEWS, label="renews")
        device.event(event)
    draw_sweeps(data, device, watermark)
    return device


def sessions_of(device: Device) -> dict[str, list[int]]:
    """Each session id, in order, with the positions of its events."""
    sessions: dict[str, list[int]] = {}
    for position, step in enumerate(device.steps):
        sessions.setdefault(step.state.session_id, []).append(position)
    return sessions


def check_reconciliation(device: Device, events: Sequence[EventFacts]) -> None:
    sessions = sessions_of(device)
    ids = list(sessions)
    records = device.records
    final = device.state
    assert final is not None
    assert {record.device_id for record in records} == {DEVICE}

    # Exactly one start per session, in order, describing the session's first event.
    starts = [record for record in records if record.kind is RecordKind.STARTED]
    assert [record.session_id for record in starts] == ids
    for number, (record, positions) in enumerate(zip(starts, sessions.values(), strict=True)):
        first = device.steps[positions[0]]
        assert record.end is None
        assert record.start_cause is not None
        assert record.start_cause is first.started
        assert all(device.steps[p].started is None for p in positions[1:])
        assert record.session_index == number + 1
        assert record.previous_session_id == (ids[number - 1] if number else None)
        assert record.first_event_id == events[positions[0]].event_id
        assert record.first_event_ms == events[positions[0]].time_ms
        assert record.user_id == first.state.user_id

    ends: dict[str, list[SessionEvent]] = {}
    for record in records:
        if record.kind is RecordKind.ENDED:
            ends.setdefault(record.session_id, []).append(record)
    assert set(ends) <= set(ids)
    watermarks = {watermark for _, watermark in device.sweeps}

    for number, (session_id, positions) in enumerate(sessions.items()):
        last = device.steps[positions[-1]].state
        mine = ends.get(session_id, [])
        # Revisions 0..n-1, published in that order: none repeated, none missing.
        assert [end_of(record).revision for record in mine] == list(range(len(mine)))
        for record in mine:
            end = end_of(record)
            assert record.start_cause is None
            assert (record.session_index, record.previous_session_id) == (
                number + 1,
                ids[number - 1] if number else None,
            )
            assert (record.first_event_id, record.first_event_ms) == (
                events[positions[0]].event_id,
                events[positions[0]].time_ms,
            )
            assert record.user_id == last.user_id
            if end.detected_by is Detection.WATERMARK:
                assert end.next_session_id is None
                assert end.watermark_ms in watermarks
                assert end.watermark_ms is not None
                assert end.watermark_ms > end.last_event_ms
                assert end.cause is not EndCause.RENEW
            else:
                assert end.watermark_ms is None
                assert number + 1 < len(ids)
                assert end.next_session_id == ids[number + 1]
            if end.cause is not EndCause.RENEW:
                assert (end.cause is EndCause.BACKGROUND_TIMEOUT) == end.in_background
            # The start precedes every end of the session.
            assert records.index(starts[number]) < records.index(record)
        # Superseded ends were published before late events joined the session.
        assert all(end_of(r).event_count < len(positions) for r in mine[:-1])
        by_next_event = [r for r in mine if end_of(r).detected_by is Detection.NEXT_EVENT]
        assert len(by_next_event) <= 1

        if number + 1 < len(ids):
            assert mine, f"session {number + 1} was followed by another but never ended"
            newest = end_of(mine[-1])
            assert newest.event_count == len(positions)
            assert newest.foreground_transitions == last.foreground_index
            assert newest.background_transitions == last.background_index
            assert newest.last_event_ms == last.last_event_ms
            assert newest.in_background == last.in_background
            # Ended by the next event exactly when no declared end stood then, and published
            # right before the next session's start.
            before = device.befores[sessions[ids[number + 1]][0]]
            assert before is not None
            assert bool(by_next_event) == (not before.ended)
            if by_next_event:
                assert by_next_event[0] is mine[-1]
                position = records.index(mine[-1])
                assert records[position + 1] is starts[number + 1]
        else:
            # The last session: ended only if a sweep after its last event passed its expiry.
            passed = any(
                applied == len(device.steps) and watermark > last.expires_ms
                for applied, watermark in device.sweeps
            )
            assert final.ended == passed
            assert final.ends_declared == len(mine)
            assert not by_next_event
            if passed:
                newest = end_of(mine[-1])
                assert newest.event_count == len(positions)
                assert newest.detected_by is Detection.WATERMARK
                assert (newest.foreground_transitions, newest.background_transitions) == (
                    last.foreground_index,
                    last.background_index,
                )
                assert newest.last_event_ms == last.last_event_ms
            elif mine:  # declared, then reopened by late events: every end is superseded
                assert end_of(mine[-1]).event_count < len(positions)


@PROPERTIES
@given(timelines(), st.booleans(), st.data())
def test_records_reconcile_with_sessions(line: Timeline, renews: bool, data: st.DataObject) -> None:
    device = emulate(data, line, renews)
    assert len(device.steps) == len(line.events)
    check_reconciliation(device, line.events)


def one_app(line: Timeline) -> Timeline:
    """The timeline with the app of its own timeouts replaced by one using the defaults."""
    events = tuple(
        replace(event, app_id="app") if event.app_id == "fast" else event for event in line.events
    )
    return replace(line, events=events)


@PROPERTIES
@given(timelines().map(one_app), st.booleans(), st.data())
def test_end_cause_and_watermark_follow_the_rules_with_one_app(
    line: Timeline, renews: bool, data: st.DataObject
) -> None:
    device = emulate(data, line, renews)
    check_reconciliation(device, line.events)
    ends_by_next = {
        end.next_session_id: end
        for end in (r.end for r in device.records if r.end is not None)
        if end.detected_by is Detection.NEXT_EVENT
    }
    for position, (event, before, step) in enumerate(
        zip(line.events, device.befores, device.steps, strict=True)
    ):
        if before is None:
            continue
        if before.ended:
            # Any event at or after the watermark that declared the session ended starts a
            # new session: only late events can reopen it.
            watermark = max(w for applied, w in device.declared if applied <= position)
            if event.time_ms >= watermark:
                assert step.started is not None
            continue
        if step.started is None:
            continue
        foreground_ms, background_ms = line.timeouts_for(event.app_id)
        timeout = background_ms if before.in_background else foreground_ms
        timed_out = event.time_ms - before.last_event_ms > timeout
        expected = events.timeout_cause(before) if timed_out else EndCause.RENEW
        assert ends_by_next[step.state.session_id].cause is expected
        assert step.started.value == expected.value
