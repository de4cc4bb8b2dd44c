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
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, cast

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
    """The parts of an event the rules look at (a decoded event carries them itself, so none
    is built per event: see :class:`Facts`)."""

    event_id: str
    time_ms: int
    lifecycle: Lifecycle | None = None
    app_id: str | None = None


class Facts(Protocol):
    """What the rules read of an event: :class:`EventFacts`, or a decoded event that carries
    the same attributes (:class:`~enricher.codecs.tracker.TrackerEvent`)."""

    @property
    def event_id(self) -> str: ...

    @property
    def time_ms(self) -> int: ...

    @property
    def lifecycle(self) -> Lifecycle | None: ...

    @property
    def app_id(self) -> str | None: ...


@dataclass(slots=True)
class SessionState:
    """Everything known about one device's current session.

    Treated as immutable: the engine builds a new state for every event (positionally, the
    cheapest way to build one), so a state read from a cache or kept as a snapshot is never
    changed under its holder. It is not frozen only because a frozen dataclass sets each of
    its fields through ``object.__setattr__``, several times the cost."""

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
    formatted: tuple[str, str, str] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    """A cache, not part of the state: the session's ``client_session`` JSON around its
    event index, and the storage mechanism it was made for
    (:func:`enricher.entities.client_session_contexts`). Made once per session: the engine
    hands it on to each next state of the same session."""

    def with_end_declared(self) -> SessionState:
        """The same session, declared ended (by a watermark) once more."""
        new = SessionState(
            self.user_id,
            self.session_id,
            self.session_index,
            self.previous_session_id,
            self.event_index,
            self.first_event_id,
            self.first_event_ms,
            self.last_event_ms,
            self.in_background,
            self.background_index,
            self.foreground_index,
            self.renews_applied,
            self.expires_ms,
            True,
            self.ends_declared + 1,
        )
        new.formatted = self.formatted
        return new


class Step(NamedTuple):
    """The outcome of one event: the device's new state and, if one began, why."""

    state: SessionState
    started: StartCause | None


_new_step = cast(Callable[[tuple[Any, ...]], Step], functools.partial(tuple.__new__, Step))
"""builds a :class:`Step` in C (the named tuple's own constructor is a Python function)"""


class SessionEngine:
    """Applies the session rules for one configuration."""

    __slots__ = ("_app_timeouts", "_ids", "_timeouts", "config")

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._ids = IdDeriver(config.salt)
        self._timeouts = config.timeouts
        self._app_timeouts = config.app_timeouts or None
        """None when no app has timeouts of its own: the usual case skips the lookup"""

    def advance(
        self,
        device_id: str,
        state: SessionState | None,
        event: Facts,
        renew_requests: int = 0,
    ) -> Step:
        """Apply one event to a device's state (``None`` for an unknown device).

        ``renew_requests`` is the device's count of renew requests (``startNewSession()``):
        one the state has not honoured yet starts a new session at this event, whatever the
        gap. A request before a device's first event is honoured by session 1.

        Builds exactly one new state (positionally: this runs once per event)."""
        event_id, time_ms, lifecycle = event.event_id, event.time_ms, event.lifecycle
        app_id = event.app_id
        timeouts = self._timeouts
        if self._app_timeouts is not None and app_id is not None:
            timeouts = self._app_timeouts.get(app_id, timeouts)
        if state is None:
            # Rules 3 and 4 on a fresh session 1 (not in the background, no transitions).
            background = lifecycle is Lifecycle.BACKGROUND
            return Step(
                SessionState(
                    self._ids.user_id(device_id),
                    self._ids.session_id(device_id, 1, event_id),
                    1,
                    None,
                    1,
                    event_id,
                    time_ms,
                    time_ms,
                    background,
                    1 if background else 0,
                    0,
                    renew_requests,
                    time_ms + (timeouts.background_ms if background else timeouts.foreground_ms),
                    False,
                    0,
                ),
                StartCause.NEW_DEVICE,
            )

        in_background = state.in_background
        timed_out = time_ms - state.last_event_ms > (
            timeouts.background_ms if in_background else timeouts.foreground_ms
        )
        renew = renew_requests > state.renews_applied
        if renew or timed_out:
            index = state.session_index + 1
            session_id = self._ids.session_id(device_id, index, event_id)
            previous: str | None = state.session_id
            event_index = 0
            first_event_id, first_event_ms = event_id, time_ms
            background_index = foreground_index = 0
            renews_applied = max(renew_requests, state.renews_applied)
            ends_declared = 0
            # A pending renew is honoured either way; the cause is the timeout if the session
            # had timed out already.
            if not timed_out:
                started: StartCause | None = StartCause.RENEW
            elif in_background:
                started = StartCause.BACKGROUND_TIMEOUT
            else:
                started = StartCause.FOREGROUND_TIMEOUT
        else:
            index, session_id = state.session_index, state.session_id
            previous = state.previous_session_id
            event_index = state.event_index
            first_event_id, first_event_ms = state.first_event_id, state.first_event_ms
            background_index, foreground_index = state.background_index, state.foreground_index
            renews_applied = state.renews_applied
            ends_declared = state.ends_declared
            started = None
        # Rules 3 and 4: flip the lifecycle state, count the event, move the clock forward.
        if lifecycle is not None:
            if lifecycle is Lifecycle.BACKGROUND and not in_background:
                in_background = True
                background_index += 1
            elif lifecycle is Lifecycle.FOREGROUND and in_background:
                in_background = False
                foreground_index += 1
        last_event_ms = max(state.last_event_ms, time_ms)
        new = SessionState(
            state.user_id,
            session_id,
            index,
            previous,
            event_index + 1,
            first_event_id,
            first_event_ms,
            last_event_ms,
            in_background,
            background_index,
            foreground_index,
            renews_applied,
            last_event_ms + (timeouts.background_ms if in_background else timeouts.foreground_ms),
            False,
            ends_declared,
        )
        if started is None:
            new.formatted = state.formatted
        return _new_step((new, started))
