"""The session rules: device state + one event -> new state + the session it belongs to.

This module is pure: no I/O, no clocks, no randomness. It implements the rules of
``session-rules.md`` exactly as Snowplow's mobile trackers apply them:

1. an unknown device starts session 1;
2. before anything else, ``gap = event time - latest event time``; the timeout is the
   background one while the device is in the background, else the foreground one; a gap
   strictly greater than the timeout starts a new session (index + 1, previous id linked,
   event index and transition counters restart);
3. then an ``application_background`` / ``application_foreground`` event flips the lifecycle
   state, counting a transition only when the state really changes;
4. every event increments ``eventIndex`` and becomes the latest event, except that an event
   older than the latest one joins the current session without moving the clock back.

The state also says when the session expires if nothing else arrives, and whether the
session events topic (:mod:`enricher.session_events`) has declared it ended: any event clears
that mark, since an event that joins a session proves it was still going.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from enricher.ids import IdDeriver

DEFAULT_TIMEOUT_SECONDS = 1800.0
STORAGE_MECHANISMS = ("SQLITE", "COOKIE_1", "COOKIE_3", "LOCAL_STORAGE", "FLASH_LSO")


class Lifecycle(enum.Enum):
    """What an event says about the app's visibility."""

    BACKGROUND = "background"
    FOREGROUND = "foreground"


class StartCause(enum.Enum):
    """Why a session started."""

    NEW_DEVICE = "new_device"
    FOREGROUND_TIMEOUT = "foreground_timeout"
    BACKGROUND_TIMEOUT = "background_timeout"
    RENEW = "renew"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Session timeouts in milliseconds."""

    foreground_ms: int
    background_ms: int

    @classmethod
    def from_seconds(cls, foreground: float, background: float) -> Timeouts:
        if foreground < 0 or background < 0:
            raise ValueError("session timeouts must not be negative")
        foreground_ms, background_ms = foreground * 1000, background * 1000
        if not (math.isfinite(foreground_ms) and math.isfinite(background_ms)):
            raise ValueError("session timeouts must be finite")
        # The tracker compares a whole number of milliseconds with ``seconds * 1000``: a gap
        # exceeds it exactly when it exceeds its floor.
        return cls(math.floor(foreground_ms), math.floor(background_ms))


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How sessions are cut and identified."""

    salt: str
    timeouts: Timeouts = field(
        default_factory=lambda: Timeouts.from_seconds(
            DEFAULT_TIMEOUT_SECONDS, DEFAULT_TIMEOUT_SECONDS
        )
    )
    app_timeouts: Mapping[str, Timeouts] = field(default_factory=dict)
    storage_mechanism: str = "LOCAL_STORAGE"

    def __post_init__(self) -> None:
        if self.storage_mechanism not in STORAGE_MECHANISMS:
            raise ValueError(
                f"storage_mechanism must be one of {', '.join(STORAGE_MECHANISMS)},"
                f" not {self.storage_mechanism!r}"
            )

    def timeouts_for(self, app_id: str | None) -> Timeouts:
        if app_id is not None:
            return self.app_timeouts.get(app_id, self.timeouts)
        return self.timeouts


@dataclass(frozen=True, slots=True)
class EventFacts:
    """The parts of an event the rules look at."""

    event_id: str
    time_ms: int
    lifecycle: Lifecycle | None = None
    app_id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionState:
    """Everything known about one device's current session."""

    user_id: str
    session_id: str
    session_index: int
    previous_session_id: str | None
    event_index: int
    first_event_id: str
    first_event_ms: int
    last_event_ms: int
    in_background: bool
    background_index: int
    foreground_index: int
    renews_applied: int = 0
    """How many renew requests for the device (a counter kept beside the state) this state
    has honoured; a larger counter means the next event starts a new session."""
    expires_ms: int = 0
    """An event later than this starts a new session: the latest event time plus the timeout
    in force after it (background or foreground, for the latest event's app)."""
    ended: bool = False
    """The watermark has passed ``expires_ms`` and the session was declared ended; no event
    has joined it since."""
    ends_declared: int = 0
    """How many times this session has been declared ended (more than once only when late
    events joined it after an end)."""


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one event: the device's new state and, if one began, why."""

    state: SessionState
    started: StartCause | None


class SessionEngine:
    """Applies the session rules for one configuration."""

    __slots__ = ("_ids", "config")

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._ids = IdDeriver(config.salt)

    def advance(
        self,
        device_id: str,
        state: SessionState | None,
        event: EventFacts,
        renew_requests: int = 0,
    ) -> Step:
        """Apply one event to a device's state (``None`` for an unknown device).

        ``renew_requests`` is the device's count of renew requests (``startNewSession()``):
        one the state has not honoured yet starts a new session at this event, whatever the
        gap. A request before a device's first event is honoured by session 1.
        """
        timeouts = self.config.timeouts_for(event.app_id)
        if state is None:
            fresh = SessionState(
                user_id=self._ids.user_id(device_id),
                session_id=self._ids.session_id(device_id, 1, event.event_id),
                session_index=1,
                previous_session_id=None,
                event_index=0,
                first_event_id=event.event_id,
                first_event_ms=event.time_ms,
                last_event_ms=event.time_ms,
                in_background=False,
                background_index=0,
                foreground_index=0,
                renews_applied=renew_requests,
            )
            return Step(_apply_event(fresh, event, timeouts), StartCause.NEW_DEVICE)

        timeout = timeouts.background_ms if state.in_background else timeouts.foreground_ms
        timed_out = event.time_ms - state.last_event_ms > timeout
        renew = renew_requests > state.renews_applied
        if renew or timed_out:
            index = state.session_index + 1
            renewed = SessionState(
                user_id=state.user_id,
                session_id=self._ids.session_id(device_id, index, event.event_id),
                session_index=index,
                previous_session_id=state.session_id,
                event_index=0,
                first_event_id=event.event_id,
                first_event_ms=event.time_ms,
                last_event_ms=state.last_event_ms,
                in_background=state.in_background,
                background_index=0,
                foreground_index=0,
                renews_applied=max(renew_requests, state.renews_applied),
            )
            # A pending renew is honoured either way; the cause is the timeout if the session
            # had timed out already.
            if not timed_out:
                cause = StartCause.RENEW
            elif state.in_background:
                cause = StartCause.BACKGROUND_TIMEOUT
            else:
                cause = StartCause.FOREGROUND_TIMEOUT
            return Step(_apply_event(renewed, event, timeouts), cause)
        return Step(_apply_event(state, event, timeouts), None)


def _apply_event(state: SessionState, event: EventFacts, timeouts: Timeouts) -> SessionState:
    """Rules 3 and 4: flip the lifecycle state, count the event, move the clock forward."""
    in_background = state.in_background
    background_index = state.background_index
    foreground_index = state.foreground_index
    if event.lifecycle is Lifecycle.BACKGROUND and not in_background:
        in_background = True
        background_index += 1
    elif event.lifecycle is Lifecycle.FOREGROUND and in_background:
        in_background = False
        foreground_index += 1
    last_event_ms = max(state.last_event_ms, event.time_ms)
    timeout = timeouts.background_ms if in_background else timeouts.foreground_ms
    return SessionState(
        user_id=state.user_id,
        session_id=state.session_id,
        session_index=state.session_index,
        previous_session_id=state.previous_session_id,
        event_index=state.event_index + 1,
        first_event_id=state.first_event_id,
        first_event_ms=state.first_event_ms,
        last_event_ms=last_event_ms,
        in_background=in_background,
        background_index=background_index,
        foreground_index=foreground_index,
        renews_applied=state.renews_applied,
        expires_ms=last_event_ms + timeout,
        ends_declared=state.ends_declared,
    )
