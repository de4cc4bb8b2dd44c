"""Session events: ``session_started`` and ``session_ended``, derived from steps.

Pure, like :mod:`enricher.session`. A session starts with its first event. It ends in one of
two ways:

* **next event**: the device's next event starts a new session (its gap exceeded the timeout,
  or a renew was pending); the end is published just before the new session's start;
* **watermark**: the device went quiet. Each input partition keeps a *clock*, the latest
  event time it has seen, where an event's time counts no later than its Kafka timestamp (so
  one device with its clock in the future cannot end everybody's sessions). The partition's
  *watermark* is its clock minus the allowed lateness. Once the watermark passes a session's
  expiry (``SessionState.expires_ms``), any event of that device at or after the watermark
  would start a new session, and the session is declared ended. (With per-app timeouts the
  expiry uses the timeouts of the app of the device's latest event; a device whose events
  switch between apps with different timeouts can have an end declared that its next event,
  under the other app's timeout, reopens.)

An event behind the watermark is *late*. A late event that still belongs to a session declared
ended (the tracker would have put it there: the rules are the contract) joins it as usual and
reopens it; that session's next ``session_ended`` record carries the next ``revision`` and
supersedes the earlier ones. Keep the highest revision per session id.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from enricher.session import SessionState, StartCause, Step


class Kind(enum.Enum):
    STARTED = "session_started"
    ENDED = "session_ended"


class EndCause(enum.Enum):
    """Why a session ended: it timed out (in the foreground or the background), or a renew
    request started the next one before it timed out. The same as the next session's
    :class:`~enricher.session.StartCause` when its event found the end."""

    FOREGROUND_TIMEOUT = "foreground_timeout"
    BACKGROUND_TIMEOUT = "background_timeout"
    RENEW = "renew"


class Detection(enum.Enum):
    """What showed that a session had ended."""

    NEXT_EVENT = "next_event"
    WATERMARK = "watermark"


@dataclass(slots=True)
class SessionEnd:
    """The part of a ``session_ended`` record that only an ended session has. (Treated as
    immutable, not frozen: a frozen dataclass sets each field through ``object.__setattr__``,
    and two records are built per session.)"""

    last_event_ms: int
    event_count: int
    foreground_transitions: int
    background_transitions: int
    in_background: bool
    cause: EndCause
    detected_by: Detection
    watermark_ms: int | None
    """the watermark that passed the session's expiry (``detected_by`` watermark)"""
    next_session_id: str | None
    """the session that followed (``detected_by`` next event)"""
    revision: int
    """0, or how many earlier ends of this session late events have superseded"""


@dataclass(slots=True)
class SessionEvent:
    """One record of the session events topic (treated as immutable, as :class:`SessionEnd`)."""

    kind: Kind
    device_id: str
    user_id: str
    session_id: str
    session_index: int
    previous_session_id: str | None
    first_event_id: str
    first_event_ms: int
    start_cause: StartCause | None
    """set on ``session_started``"""
    end: SessionEnd | None
    """set on ``session_ended``"""


def _record(
    kind: Kind,
    device_id: str,
    state: SessionState,
    start_cause: StartCause | None,
    end: SessionEnd | None,
) -> SessionEvent:
    return SessionEvent(
        kind=kind,
        device_id=device_id,
        user_id=state.user_id,
        session_id=state.session_id,
        session_index=state.session_index,
        previous_session_id=state.previous_session_id,
        first_event_id=state.first_event_id,
        first_event_ms=state.first_event_ms,
        start_cause=start_cause,
        end=end,
    )


def started(device_id: str, step: Step) -> SessionEvent:
    """The ``session_started`` record of the session ``step`` began."""
    return _record(Kind.STARTED, device_id, step.state, step.started, None)


def ended(
    device_id: str,
    state: SessionState,
    cause: EndCause,
    *,
    watermark_ms: int | None = None,
    next_session_id: str | None = None,
) -> SessionEvent:
    """The ``session_ended`` record of the session in ``state``."""
    end = SessionEnd(
        last_event_ms=state.last_event_ms,
        event_count=state.event_index,
        foreground_transitions=state.foreground_index,
        background_transitions=state.background_index,
        in_background=state.in_background,
        cause=cause,
        detected_by=Detection.WATERMARK if watermark_ms is not None else Detection.NEXT_EVENT,
        watermark_ms=watermark_ms,
        next_session_id=next_session_id,
        revision=state.ends_declared,
    )
    return _record(Kind.ENDED, device_id, state, None, end)


def timeout_cause(state: SessionState) -> EndCause:
    if state.in_background:
        return EndCause.BACKGROUND_TIMEOUT
    return EndCause.FOREGROUND_TIMEOUT


_ENDED_BY: dict[StartCause, EndCause] = {
    cause: EndCause(cause.value) for cause in StartCause if cause != StartCause.NEW_DEVICE
}
"""why a session ended, by why the next one started"""


def on_step(device_id: str, before: SessionState | None, step: Step) -> list[SessionEvent]:
    """The records one event produces: the end of the session it closed, if that end was not
    declared already, and the start of the session it opened."""
    if step.started is None:
        return []
    records = []
    if before is not None and not before.ended:
        cause = _ENDED_BY[step.started]  # not NEW_DEVICE: there was a session before
        records.append(ended(device_id, before, cause, next_session_id=step.state.session_id))
    records.append(started(device_id, step))
    return records


def reopened(before: SessionState | None, step: Step) -> bool:
    """Whether this event joined a session that had been declared ended (a late event)."""
    return before is not None and before.ended and step.started is None


def expired(state: SessionState, watermark_ms: int) -> bool:
    """Whether the watermark has passed the session's expiry and its end is not declared."""
    return not state.ended and watermark_ms > state.expires_ms


def declare_ended(
    device_id: str, state: SessionState, watermark_ms: int
) -> tuple[SessionState, SessionEvent]:
    """End an expired session by the watermark: its ``session_ended`` record and the state
    that remembers the end was declared."""
    record = ended(device_id, state, timeout_cause(state), watermark_ms=watermark_ms)
    return state.with_end_declared(), record


def clock_time(event_ms: int, kafka_ms: int) -> int:
    """An event's contribution to its partition's clock: its time, but never later than its
    Kafka timestamp (when the record has one)."""
    return min(event_ms, kafka_ms) if kafka_ms > 0 else event_ms
