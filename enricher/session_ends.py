"""When a batch publishes ``session_started`` and ``session_ended``: the session events topic's
part of the commit protocol, pure (no I/O).

With the topic on (:class:`SessionEnds`), a batch

1. advances each partition's clock with its events (an event counts no later than its Kafka
   timestamp) and asks the store for the devices whose expiry the watermark may have passed
   (:meth:`SessionEnds.queries`, answered by :meth:`SessionEnds.loaded`);
2. turns each event's step into the session events it causes (:meth:`SessionEnds.on_event`);
3. declares ended the sessions the partition's watermark has passed, among the batch's devices
   and those the store found (:meth:`SessionEnds.pass_watermark`);
4. writes the clock, and each device's expiry score, with the states (:meth:`SessionEnds.write`).

With the topic off (:class:`NoSessionEnds`), every step does nothing, so the protocol itself
never asks whether the topic is on. ``docs/exactly-once.md`` explains why the scores and the
clock follow the snapshot rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from enricher import session_events
from enricher.session import SessionState, Step
from enricher.session_events import SessionEvent
from enricher.store import ClockQuery, Expiring, PartitionWrite

# At most this many sessions of a partition are checked against its watermark per batch; the
# rest wait for the next batches.
EXPIRING_PER_BATCH = 2000

# The expiry score of a device whose session a batch declared ended, and of one whose record a
# batch that has not committed (yet) wrote: below every watermark, so that every later batch
# takes it first, whatever the limit of candidates, until a committed batch settles it.
UNSETTLED_SCORE = -1

CommittedState = Callable[[str, bytes | None], tuple[SessionState | None, bool]]
"""A device's committed state: the cached one, else the one its packed record holds (or
None); and whether that record was written by a batch that never committed (yet)"""


@dataclass(slots=True)
class PartitionBatch:
    """One partition's share of a batch: where it starts and ends, the state each device
    starts from, the state it reaches, and the offset that state is as of."""

    start: int
    end: int
    starting: dict[str, SessionState | None] = field(default_factory=dict)
    states: dict[str, SessionState] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)


class BatchSessionEnds(Protocol):
    """A batch's part in publishing session events (see the module's docstring)."""

    watermarks_ms: dict[int, int]
    reopened: int
    """how many of the batch's events joined a session declared ended (late events)"""
    publishes: bool
    """whether :meth:`observe` and :meth:`on_event` can do anything: when not, the batch
    need not call them for every event"""

    def observe(self, partition: int, event_ms: int, kafka_ms: int) -> None: ...

    def queries(self, starts: Mapping[int, int]) -> dict[int, ClockQuery]: ...

    def loaded(self, expiring: Mapping[int, Expiring]) -> None: ...

    def on_event(
        self, device: str, before: SessionState | None, step: Step
    ) -> list[SessionEvent]: ...

    def pass_watermark(
        self, partition: int, batch: PartitionBatch, committed: CommittedState
    ) -> list[SessionEvent]: ...

    def write(
        self, partition: int, batch: PartitionBatch, write: PartitionWrite
    ) -> PartitionWrite: ...


class NoSessionEnds:
    """The session events topic is off: nothing to observe, publish or write."""

    publishes = False
    reopened = 0

    def __init__(self) -> None:
        self.watermarks_ms: dict[int, int] = {}

    def observe(self, partition: int, event_ms: int, kafka_ms: int) -> None:
        return

    def queries(self, starts: Mapping[int, int]) -> dict[int, ClockQuery]:
        return {}

    def loaded(self, expiring: Mapping[int, Expiring]) -> None:
        return

    def on_event(self, device: str, before: SessionState | None, step: Step) -> list[SessionEvent]:
        return _NO_EVENTS

    def pass_watermark(
        self, partition: int, batch: PartitionBatch, committed: CommittedState
    ) -> list[SessionEvent]:
        return []

    def write(self, partition: int, batch: PartitionBatch, write: PartitionWrite) -> PartitionWrite:
        return write


_NO_EVENTS: list[SessionEvent] = []
"""what the usual event causes (shared: its callers only read it)"""


class SessionEnds:
    """The session events topic is on: a batch's clocks, watermarks and expiries."""

    publishes = True

    def __init__(self, lateness_ms: int, limit: int = EXPIRING_PER_BATCH) -> None:
        self.lateness_ms = lateness_ms
        self.limit = limit
        self.clocks: dict[int, int] = {}
        self.expiring: dict[int, Expiring] = {}
        self.rescored: dict[int, dict[str, int]] = {}
        self.unscored: dict[int, list[str]] = {}
        self.watermarks_ms: dict[int, int] = {}
        self.reopened = 0

    def observe(self, partition: int, event_ms: int, kafka_ms: int) -> None:
        """Advance the partition's clock with one event of the batch."""
        time_ms = session_events.clock_time(event_ms, kafka_ms)
        if time_ms > self.clocks.get(partition, time_ms - 1):
            self.clocks[partition] = time_ms

    def queries(self, starts: Mapping[int, int]) -> dict[int, ClockQuery]:
        """What to ask the store of each partition's clock and expiries."""
        return {
            p: ClockQuery(start, self.clocks.get(p), self.lateness_ms, self.limit)
            for p, start in starts.items()
        }

    def loaded(self, expiring: Mapping[int, Expiring]) -> None:
        self.expiring = dict(expiring)

    def on_event(self, device: str, before: SessionState | None, step: Step) -> list[SessionEvent]:
        """The session events one event causes; counts it if it reopened an ended session."""
        if step.started is None and (before is None or not before.ended):
            return _NO_EVENTS  # the usual event: it joins a session still open
        self.reopened += session_events.reopened(before, step)
        return session_events.on_step(device, before, step)

    def pass_watermark(
        self, partition: int, batch: PartitionBatch, committed: CommittedState
    ) -> list[SessionEvent]:
        """Declare ended the sessions the partition's watermark has passed: those of the
        batch's devices, and those the store found among the others (whose committed state
        ``committed`` gives). Updates ``batch`` with the states that remember the ends.

        A device found here and declared ended is scored :data:`UNSETTLED_SCORE`, and so is a
        device whose record a batch that never committed wrote: a replay cut differently, its
        candidates capped, could otherwise commit past that record without rewriting it, and
        the record (ended) would then read as committed, its end never published. Scored so,
        it is the first candidate of every batch until a committed batch settles it."""
        expiring = self.expiring.get(partition)
        if expiring is None or expiring.clock_ms is None:
            return []
        watermark = expiring.clock_ms - self.lateness_ms
        self.watermarks_ms[partition] = watermark
        events = []
        states = batch.states
        for device, state in list(states.items()):
            if session_events.expired(state, watermark):
                states[device], event = session_events.declare_ended(device, state, watermark)
                events.append(event)
        self.unscored[partition] = unscored = []
        self.rescored[partition] = rescored = {}
        for device, data in expiring.records.items():
            if device in states:
                continue
            known, unsettled = committed(device, data)
            if known is not None and session_events.expired(known, watermark):
                batch.starting[device] = known
                states[device], event = session_events.declare_ended(device, known, watermark)
                batch.offsets[device] = batch.end
                rescored[device] = UNSETTLED_SCORE
                events.append(event)
            elif unsettled:
                rescored[device] = UNSETTLED_SCORE
            elif known is None or known.ended:
                unscored.append(device)
            else:
                rescored[device] = known.expires_ms
        return events

    def write(self, partition: int, batch: PartitionBatch, write: PartitionWrite) -> PartitionWrite:
        """``write`` with the partition's clock and the expiry scores of its devices."""
        expiring = self.expiring.get(partition)
        if expiring is None or expiring.clock_ms is None:
            return write
        rescored = self.rescored.get(partition, {})
        scores = dict(rescored)
        unscored = list(self.unscored.get(partition, []))
        for device, state in batch.states.items():
            if device in rescored:
                continue
            score = expiry_score(state, batch.starting[device])
            if score is None:
                unscored.append(device)
            else:
                scores[device] = score
        clock = (expiring.clock_ms, batch.end, expiring.committed_ms)
        return write._replace(clock=clock, scores=scores, unscored=unscored)


def expiry_score(state: SessionState, starting: SessionState | None) -> int | None:
    """A device's score in the expiries: the earliest expiry of a session not declared ended,
    whether the batch commits (``state``) or not (``starting``); None if both are ended."""
    if starting is None or starting.ended:
        return None if state.ended else state.expires_ms
    if state.ended:
        return starting.expires_ms
    return min(state.expires_ms, starting.expires_ms)


def for_settings(session_events_topic: str, lateness_ms: int) -> Callable[[], BatchSessionEnds]:
    """A new batch's session ends: :class:`SessionEnds` with a topic, else the no-op."""
    if session_events_topic:
        return lambda: SessionEnds(lateness_ms)
    return NoSessionEnds
