"""The session events topic reconciled with the enriched output, one for one.

The sessions are rebuilt from the enriched output alone (the client_session entity, the
event's time and its lifecycle events, in partition order), then every ``session_started``
and ``session_ended`` record must match them:

- one ``session_started`` per session, and no other; its cause follows from the session
  before it (or from the renews the test requested);
- each (session, revision) ended at most once; revisions 0..n without gaps; every session
  but a device's last is ended, and its highest revision has the session's event count,
  first and last event times, duration, transitions, state and cause;
- a device's last session is ended exactly when its partition's final watermark (the latest
  clock time in the output minus the lateness) has passed its expiry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reference import client_session
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT, LATENESS
from stack import Record, Stack, TopicSet

from enricher.codecs import session_events, tracker
from enricher.session import Lifecycle
from enricher.session_events import clock_time


@dataclass(eq=False)
class Session:
    """One session as the enriched output shows it."""

    device: str
    partition: int
    session_id: str
    user_id: str
    index: int
    previous: str | None
    first_event_id: str
    first_event_ms: int
    last_event_ms: int
    in_background: bool
    events: int = 0
    background: int = 0
    foreground: int = 0
    prior: Session | None = field(default=None, repr=False)
    next: Session | None = field(default=None, repr=False)

    def expiry(self, timeouts_ms: tuple[int, int]) -> int:
        return self.last_event_ms + timeouts_ms[1 if self.in_background else 0]


@dataclass
class Summary:
    sessions: int = 0
    started: int = 0
    ended: Counter[str] = field(default_factory=Counter)
    """final ends by detection"""
    revised: int = 0
    """sessions ended more than once (late events reopened them)"""


def sessions_in(output: Sequence[Record]) -> dict[str, list[Session]]:
    """Each device's sessions, in order, from the enriched output (JSON)."""
    by_device: dict[str, list[Session]] = {}
    for record in sorted(output, key=lambda r: (r.partition, r.offset)):
        event = tracker.decode(record.value or b"")
        entity = client_session(event.fields)
        facts = event.facts
        device = (record.key or b"").decode()
        sessions = by_device.setdefault(device, [])
        current = sessions[-1] if sessions else None
        if current is None or current.session_id != entity["sessionId"]:
            started = Session(
                device=device,
                partition=record.partition,
                session_id=entity["sessionId"],
                user_id=entity["userId"],
                index=entity["sessionIndex"],
                previous=entity["previousSessionId"],
                first_event_id=entity["firstEventId"],
                first_event_ms=facts.time_ms,
                last_event_ms=max(facts.time_ms, current.last_event_ms if current else 0),
                in_background=current.in_background if current else False,
                prior=current,
            )
            if current is not None:
                current.next = started
            sessions.append(started)
            current = started
        current.events += 1
        current.last_event_ms = max(current.last_event_ms, facts.time_ms)
        if facts.lifecycle is Lifecycle.BACKGROUND and not current.in_background:
            current.in_background, current.background = True, current.background + 1
        elif facts.lifecycle is Lifecycle.FOREGROUND and current.in_background:
            current.in_background, current.foreground = False, current.foreground + 1
    return by_device


def final_watermarks(output: Sequence[Record], lateness_ms: int) -> dict[int, int]:
    """Each partition's watermark after the last event of the output."""
    clocks: dict[int, int] = {}
    for record in output:
        time_ms = clock_time(tracker.decode(record.value or b"").facts.time_ms, record.timestamp_ms)
        clocks[record.partition] = max(clocks.get(record.partition, time_ms), time_ms)
    return {p: clock - lateness_ms for p, clock in clocks.items()}


def check_session_events(
    output: Sequence[Record],
    lifecycle_records: Sequence[Record],
    *,
    timeouts_s: tuple[float, float],
    lateness_s: float,
    decode: Callable[[bytes], dict[str, Any]] = session_events.decode_json,
) -> Summary:
    """Raise AssertionError listing every mismatch."""
    timeouts_ms = (round(timeouts_s[0] * 1000), round(timeouts_s[1] * 1000))
    by_device = sessions_in(output)
    sessions = {s.session_id: s for device in by_device.values() for s in device}
    watermarks = final_watermarks(output, round(lateness_s * 1000))
    problems: list[str] = []
    started: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[int, dict[str, Any]]] = {}
    copies: Counter[tuple[str, str, int]] = Counter()
    for record in lifecycle_records:
        data = decode(record.value or b"")
        end = data["end"]
        copies[(data["kind"], data["session_id"], end["revision"] if end else -1)] += 1
        session = sessions.get(data["session_id"])
        if session is None:
            problems.append(f"a record for a session not in the output: {data}")
            continue
        if record.key != session.device.encode() or record.partition != session.partition:
            problems.append(f"{session.session_id}: key {record.key!r}/{record.partition}")
        if data["kind"] == "session_started":
            started[session.session_id] = data
        else:
            ends.setdefault(session.session_id, {})[end["revision"]] = data
    duplicates = {key: n for key, n in copies.items() if n > 1}
    if duplicates:
        problems.append(f"{len(duplicates)} records published more than once: {duplicates}")

    summary = Summary(sessions=len(sessions), started=len(started))
    for session in sessions.values():
        problems += _check_start(session, started.get(session.session_id), timeouts_ms)
        revisions = ends.get(session.session_id, {})
        if sorted(revisions) != list(range(len(revisions))):
            problems.append(f"{session.session_id}: revisions {sorted(revisions)}")
            continue
        expiry = session.expiry(timeouts_ms)
        if session.next is None:
            should_end = watermarks[session.partition] > expiry
            if should_end != bool(revisions):
                problems.append(
                    f"{session.device}'s last session {session.session_id}: expiry {expiry},"
                    f" final watermark {watermarks[session.partition]}, ended: {bool(revisions)}"
                )
        elif not revisions:
            problems.append(f"{session.session_id} was followed by another but never ended")
        if revisions:
            final = revisions[len(revisions) - 1]
            summary.ended[final["end"]["detected_by"]] += 1
            summary.revised += len(revisions) > 1
            problems += _check_end(session, final, expiry, watermarks)
    if problems:
        raise AssertionError(
            f"the session events topic does not reconcile ({len(problems)} problems):\n- "
            + "\n- ".join(problems[:20])
        )
    return summary


def _check_start(
    session: Session, record: dict[str, Any] | None, timeouts_ms: tuple[int, int]
) -> list[str]:
    if record is None:
        return [f"{session.session_id} ({session.device} #{session.index}) has no start"]
    # A session starts before the previous one timed out only by a renew request.
    prior = session.prior
    if prior is None:
        cause = "new_device"
    elif session.first_event_ms <= prior.expiry(timeouts_ms):
        cause = "renew"
    else:
        cause = _timeout(prior)
    expected = {
        "device_id": session.device,
        "user_id": session.user_id,
        "session_index": session.index,
        "previous_session_id": session.previous,
        "first_event_id": session.first_event_id,
        "first_event_time": session.first_event_ms,
        "end": None,
    }
    got = {name: record[name] for name in expected}
    problems = []
    if got != expected:
        problems.append(f"{session.session_id} started:\n  got      {got}\n  expected {expected}")
    if record["start_cause"] != cause:
        problems.append(f"{session.session_id}: start cause {record['start_cause']}, not {cause}")
    return problems


def _timeout(session: Session) -> str:
    return "background_timeout" if session.in_background else "foreground_timeout"


def _check_end(
    session: Session, record: dict[str, Any], expiry: int, watermarks: dict[int, int]
) -> list[str]:
    end = record["end"]
    expected = {
        "last_event_time": session.last_event_ms,
        "duration_ms": session.last_event_ms - session.first_event_ms,
        "event_count": session.events,
        "foreground_transitions": session.foreground,
        "background_transitions": session.background,
        "in_background": session.in_background,
    }
    got = {name: end[name] for name in expected}
    problems = []
    if got != expected or record["session_index"] != session.index:
        problems.append(f"{session.session_id} ended:\n  got      {got}\n  expected {expected}")
    # A session ends before its timeout only when a renew started the next one.
    timed_out = session.next is None or session.next.first_event_ms > expiry
    cause = _timeout(session) if timed_out else "renew"
    if end["cause"] != cause:
        problems.append(f"{session.session_id}: end cause {end['cause']}, not {cause}")
    if end["detected_by"] == "next_event":
        if session.next is None or end["next_session_id"] != session.next.session_id:
            problems.append(f"{session.session_id}: ended by a next event it does not have")
    elif not expiry < end["watermark"] <= watermarks[session.partition]:
        problems.append(
            f"{session.session_id}: ended by watermark {end['watermark']}, expiry {expiry},"
            f" final watermark {watermarks[session.partition]}"
        )
    return problems


def reconcile(stack: Stack, topics: TopicSet, output: Sequence[Record]) -> Summary:
    """Read the session events topic of instances started with ``service_env`` and reconcile it
    with their ``output``."""
    records = stack.read_committed([topics.sessions], timeout=120)
    summary = check_session_events(
        output,
        records,
        timeouts_s=(FOREGROUND_TIMEOUT, BACKGROUND_TIMEOUT),
        lateness_s=LATENESS,
    )
    print(f"session lifecycle reconciled: {summary}")
    return summary
