"""Reproducible identifiers.

``userId`` and ``sessionId`` are derived from a secret salt with HMAC-SHA256 instead of drawn
at random, so reprocessing the same input (a replay after a crash, a backfill, a second region)
yields byte-identical output, while a different salt yields ids that cannot be linked to the
first. The digest is formatted as an RFC 4122 UUID with the version-4 and variant bits set, the
shape the trackers' own random ids have, so downstream validation accepts them unchanged.
"""

from __future__ import annotations

import hashlib

_BLOCK = 64  # SHA-256's block size
_XOR_36 = bytes(x ^ 0x36 for x in range(256))
_XOR_5C = bytes(x ^ 0x5C for x in range(256))


class IdDeriver:
    """Derives user and session ids for one salt."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, salt: str) -> None:
        # HMAC-SHA256 (RFC 2104) with its keyed inner and outer states computed once: each id
        # then costs two hash copies instead of a whole ``hmac.new`` (same digests).
        key = salt.encode()
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_XOR_36))
        self._outer = hashlib.sha256(key.translate(_XOR_5C))

    def _uuid(self, *parts: str) -> str:
        # Decoding refuses a device id that is not Unicode text (``invalid_key``); should one
        # get here anyway, its lone surrogates are hashed as their code points instead of
        # failing (text that is Unicode encodes exactly as before).
        message = "\x1f".join(parts).encode("utf-8", "surrogatepass")
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        digest = outer.digest()
        # str(uuid.UUID(bytes=digest[:16])) with the version (byte 6: 0x4_) and variant (byte
        # 8: 0b10__) bits set, formatted directly.
        h = digest[:16].hex()
        variant = "89ab"[digest[8] >> 4 & 3]
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"

    def user_id(self, device_id: str) -> str:
        return self._uuid("user", device_id)

    def session_id(self, device_id: str, session_index: int, first_event_id: str) -> str:
        return self._uuid("session", device_id, str(session_index), first_event_id)
