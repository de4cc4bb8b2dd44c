"""Reproducible identifiers.

``userId`` and ``sessionId`` are derived from a secret salt with HMAC-SHA256 instead of drawn
at random, so reprocessing the same input (a replay after a crash, a backfill, a second region)
yields byte-identical output, while a different salt yields ids that cannot be linked to the
first. The digest is formatted as an RFC 4122 UUID with the version-4 and variant bits set, the
shape the trackers' own random ids have, so downstream validation accepts them unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid


class IdDeriver:
    """Derives user and session ids for one salt."""

    __slots__ = ("_key",)

    def __init__(self, salt: str) -> None:
        self._key = salt.encode()

    def _uuid(self, *parts: str) -> str:
        # Decoding refuses a device id that is not Unicode text (``invalid_key``); should one
        # get here anyway, its lone surrogates are hashed as their code points instead of
        # failing (text that is Unicode encodes exactly as before).
        message = "\x1f".join(parts).encode("utf-8", "surrogatepass")
        digest = bytearray(hmac.new(self._key, message, hashlib.sha256).digest()[:16])
        digest[6] = (digest[6] & 0x0F) | 0x40
        digest[8] = (digest[8] & 0x3F) | 0x80
        return str(uuid.UUID(bytes=bytes(digest)))

    def user_id(self, device_id: str) -> str:
        return self._uuid("user", device_id)

    def session_id(self, device_id: str, session_index: int, first_event_id: str) -> str:
        return self._uuid("session", device_id, str(session_index), first_event_id)
