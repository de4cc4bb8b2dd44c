"""The state record: how one device's session state is packed into Redis, and back.

A record holds the device's state, the input offset of the last event applied to it, and the
state before the batch that wrote it (the snapshot). A record whose offset is at or past the
offset a batch starts from was written by a batch that never committed in Kafka (a crash, an
abort, a zombie), so the snapshot is the state to start from instead
(:meth:`RecordCodec.state_before`). ``docs/exactly-once.md`` walks through every crash point.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass

from enricher.ids import IdDeriver
from enricher.session import SessionState

RECORD_VERSION = 2
NO_OFFSET = -1  # written by file mode: not tied to a stream position, always committed
LATEST = 2**63 - 1  # a batch start past every offset: take each record's latest state

_HEADER = struct.Struct("<BBq")  # version, flags, offset
# flags, session index, event index, background index, foreground index, renews applied,
# ends declared, first event time, expiry, last event time (last: the sweep script reads it at
# a fixed position)
_STATE = struct.Struct("<BIIIIIIqqq")
_HAS_SNAPSHOT = 1
_IN_BACKGROUND = 1
_HAS_PREVIOUS = 2
_TEXT_EVENT_ID = 4
_ENDED = 8
# The form str(uuid.UUID(...)) writes: lowercase, dashed.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Where the last event time sits in a record, 1-based (the sweep script reads it there).
LAST_EVENT_AT = _HEADER.size + _STATE.size - 8 + 1


@dataclass(frozen=True, slots=True)
class Record:
    """One device's stored state, as of input ``offset``, and the state before that batch."""

    state: SessionState
    offset: int
    snapshot: SessionState | None

    def state_before(self, batch_start: int) -> SessionState | None:
        """The committed state to start a batch at ``batch_start`` from."""
        return self.state if self.offset < batch_start else self.snapshot


class RecordCodec:
    """Packs device records into compact bytes and back.

    User and session ids are not stored: they are derived from the salt, so only the inputs
    of the derivation are (the first event id and the session index).
    """

    __slots__ = ("_ids",)

    def __init__(self, ids: IdDeriver) -> None:
        self._ids = ids

    def pack(self, state: SessionState, offset: int, snapshot: SessionState | None) -> bytes:
        flags = _HAS_SNAPSHOT if snapshot is not None else 0
        parts = [_HEADER.pack(RECORD_VERSION, flags, offset), _pack_state(state)]
        if snapshot is not None:
            parts.append(_pack_state(snapshot))
        return b"".join(parts)

    def unpack(self, device_id: str, data: bytes) -> Record:
        flags, offset = self._header(device_id, data)
        state, end = self._unpack_state(device_id, data, _HEADER.size)
        snapshot = None
        if flags & _HAS_SNAPSHOT:
            snapshot, end = self._unpack_state(device_id, data, end)
        return Record(state, offset, snapshot)

    def state_before(self, device_id: str, data: bytes, batch_start: int) -> SessionState | None:
        """``unpack(...).state_before(batch_start)``, unpacking only that state."""
        flags, offset = self._header(device_id, data)
        if offset < batch_start:
            return self._unpack_state(device_id, data, _HEADER.size)[0]
        if not flags & _HAS_SNAPSHOT:
            return None
        return self._unpack_state(device_id, data, _state_end(data, _HEADER.size))[0]

    def offset_of(self, device_id: str, data: bytes) -> int:
        """The input offset of the last event a record's state applied."""
        return self._header(device_id, data)[1]

    @staticmethod
    def _header(device_id: str, data: bytes) -> tuple[int, int]:
        version, flags, offset = _HEADER.unpack_from(data)
        if version != RECORD_VERSION:
            raise ValueError(f"device {device_id!r}: record version {version} is not supported")
        return flags, offset

    def _unpack_state(self, device_id: str, data: bytes, start: int) -> tuple[SessionState, int]:
        (
            flags,
            index,
            events,
            background,
            foreground,
            renews,
            ends,
            first_ms,
            expires_ms,
            last_ms,
        ) = _STATE.unpack_from(data, start)
        at = start + _STATE.size
        if flags & _TEXT_EVENT_ID:
            size = data[at]
            first_event_id = data[at + 1 : at + 1 + size].decode()
            at += 1 + size
        else:
            first_event_id = _uuid_text(data[at : at + 16])
            at += 16
        previous = None
        if flags & _HAS_PREVIOUS:
            previous = _uuid_text(data[at : at + 16])
            at += 16
        state = SessionState(
            user_id=self._ids.user_id(device_id),
            session_id=self._ids.session_id(device_id, index, first_event_id),
            session_index=index,
            previous_session_id=previous,
            event_index=events,
            first_event_id=first_event_id,
            first_event_ms=first_ms,
            last_event_ms=last_ms,
            in_background=bool(flags & _IN_BACKGROUND),
            background_index=background,
            foreground_index=foreground,
            renews_applied=renews,
            expires_ms=expires_ms,
            ended=bool(flags & _ENDED),
            ends_declared=ends,
        )
        return state, at


def _state_end(data: bytes, start: int) -> int:
    """Where the packed state at ``start`` ends."""
    flags = data[start]
    at = start + _STATE.size
    at += 1 + data[at] if flags & _TEXT_EVENT_ID else 16
    return at + 16 if flags & _HAS_PREVIOUS else at


def _pack_state(state: SessionState) -> bytes:
    flags = (_IN_BACKGROUND if state.in_background else 0) | (_ENDED if state.ended else 0)
    event_id = state.first_event_id
    canonical = _CANONICAL_UUID.fullmatch(event_id) is not None or (
        str(uuid.UUID(event_id)) == event_id
    )
    if not canonical:
        flags |= _TEXT_EVENT_ID
    if state.previous_session_id is not None:
        flags |= _HAS_PREVIOUS
    parts = [
        _STATE.pack(
            flags,
            state.session_index,
            state.event_index,
            state.background_index,
            state.foreground_index,
            state.renews_applied,
            state.ends_declared,
            state.first_event_ms,
            state.expires_ms,
            state.last_event_ms,
        )
    ]
    if canonical:
        parts.append(_uuid_bytes(event_id))
    else:
        encoded = event_id.encode()
        parts.append(bytes([len(encoded)]) + encoded)
    if state.previous_session_id is not None:
        parts.append(_uuid_bytes(state.previous_session_id))
    return b"".join(parts)


def _uuid_bytes(text: str) -> bytes:
    """``uuid.UUID(text).bytes``, directly for the canonical form (every id the enricher
    derives, and most event ids)."""
    if _CANONICAL_UUID.fullmatch(text) is not None:
        return bytes.fromhex(text.replace("-", ""))
    return uuid.UUID(text).bytes


def _uuid_text(data: bytes) -> str:
    """``str(uuid.UUID(bytes=data))``, formatted directly."""
    h = data.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
