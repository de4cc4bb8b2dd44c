"""The tracker's session getters, server-side, for any device; and renew on demand.

``getSessionUserId``, ``getSessionId``, ``getSessionIndex``, ``getIsInBackground``,
``getBackgroundIndex``, ``getForegroundIndex`` and ``getSessionState`` all read one
:class:`SessionView`; :meth:`SessionLookup.renew` is Android's ``startNewSession()``: the
device's next event starts a new session.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from enricher.entities import iso_millis
from enricher.partitioning import kafka_partition
from enricher.session import SessionConfig
from enricher.store import PartitionStore


@dataclass(frozen=True, slots=True)
class SessionView:
    """A device's current session, with the tracker's field names."""

    userId: str  # noqa: N815 - the tracker's names, so a view serialises as the tracker's state
    sessionId: str  # noqa: N815
    sessionIndex: int  # noqa: N815
    previousSessionId: str | None  # noqa: N815
    eventIndex: int  # noqa: N815
    firstEventId: str  # noqa: N815
    firstEventTimestamp: str  # noqa: N815
    storageMechanism: str  # noqa: N815
    isInBackground: bool  # noqa: N815
    backgroundIndex: int  # noqa: N815
    foregroundIndex: int  # noqa: N815
    lastEventTimestamp: str  # noqa: N815
    """the device time of its latest event"""
    expiresAt: str  # noqa: N815
    """an event later than this starts a new session"""
    renewPending: bool  # noqa: N815
    """a renew was requested: the next event starts a new session"""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SessionLookup:
    """Reads device sessions from the service's state and files renew requests."""

    def __init__(self, store: PartitionStore, partitions: int, config: SessionConfig) -> None:
        self.store = store
        self.partitions = partitions
        self.config = config

    def _partition(self, device_id: str) -> int:
        return kafka_partition(device_id.encode(), self.partitions)

    def get(self, device_id: str) -> SessionView | None:
        """The device's session as last written, or None for a device never seen.

        While a batch is in flight this may be ahead of the published output by that batch."""
        record, renews = self.store.latest(self._partition(device_id), device_id)
        if record is None:
            return None
        state = record.state
        return SessionView(
            userId=state.user_id,
            sessionId=state.session_id,
            sessionIndex=state.session_index,
            previousSessionId=state.previous_session_id,
            eventIndex=state.event_index,
            firstEventId=state.first_event_id,
            firstEventTimestamp=iso_millis(state.first_event_ms),
            storageMechanism=self.config.storage_mechanism,
            isInBackground=state.in_background,
            backgroundIndex=state.background_index,
            foregroundIndex=state.foreground_index,
            lastEventTimestamp=iso_millis(state.last_event_ms),
            expiresAt=iso_millis(state.expires_ms),
            renewPending=renews > state.renews_applied,
        )

    def renew(self, device_id: str) -> None:
        """``startNewSession()``: the device's next event starts a new session, once."""
        self.store.request_renew(self._partition(device_id), device_id)
