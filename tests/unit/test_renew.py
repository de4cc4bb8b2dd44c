"""Renew on demand (Android's ``startNewSession()``): the next event starts a new session."""

from __future__ import annotations

from support import START_MS, event_id

from enricher.session import (
    EventFacts,
    Lifecycle,
    SessionConfig,
    SessionEngine,
    SessionState,
    StartCause,
    Timeouts,
)

ENGINE = SessionEngine(SessionConfig(salt="s", timeouts=Timeouts.from_seconds(60, 15)))


def event(n: int, seconds: float, lifecycle: Lifecycle | None = None) -> EventFacts:
    return EventFacts(event_id(n), START_MS + int(seconds * 1000), lifecycle)


def run(timeline: list[tuple[EventFacts, int]]) -> list[tuple[SessionState, StartCause | None]]:
    state: SessionState | None = None
    out = []
    for facts, renews in timeline:
        step = ENGINE.advance("device", state, facts, renews)
        state = step.state
        out.append((step.state, step.started))
    return out


def test_the_next_event_after_a_renew_starts_a_new_session_once() -> None:
    steps = run([(event(1, 0), 0), (event(2, 1), 0), (event(3, 2), 1), (event(4, 3), 1)])
    (first, _), (second, _), (renewed, cause), (after, again) = steps
    assert cause is StartCause.RENEW
    assert renewed.session_index == second.session_index + 1
    assert renewed.previous_session_id == second.session_id
    assert (renewed.event_index, renewed.first_event_id) == (1, event_id(3))
    assert renewed.user_id == first.user_id
    assert again is None
    assert (after.session_index, after.event_index) == (2, 2)


def test_several_requests_before_the_next_event_make_one_new_session() -> None:
    steps = run([(event(1, 0), 0), (event(2, 1), 3), (event(3, 2), 3)])
    assert [cause for _, cause in steps] == [StartCause.NEW_DEVICE, StartCause.RENEW, None]
    assert steps[-1][0].renews_applied == 3


def test_a_request_before_the_first_event_is_honoured_by_session_one() -> None:
    steps = run([(event(1, 0), 2), (event(2, 1), 2)])
    assert [s.session_index for s, _ in steps] == [1, 1]
    assert [cause for _, cause in steps] == [StartCause.NEW_DEVICE, None]


def test_a_renew_that_coincides_with_a_timeout_is_honoured_and_the_cause_is_the_timeout() -> None:
    steps = run([(event(1, 0, Lifecycle.BACKGROUND), 0), (event(2, 100, Lifecycle.FOREGROUND), 1)])
    renewed, cause = steps[-1]
    assert cause is StartCause.BACKGROUND_TIMEOUT
    assert (renewed.session_index, renewed.foreground_index, renewed.in_background) == (2, 1, False)
    assert renewed.renews_applied == 1
    assert run([(event(1, 0), 0), (event(2, 100), 0)])[-1][1] is StartCause.FOREGROUND_TIMEOUT
