"""The state TTL: a fenced sweep deletes devices not seen for ``state_ttl_days``, a slice per
owned partition between batches, so that it never stalls the stream. (The only "sweep": the
watermark pass of the session events topic is something else, see :mod:`session_ends`.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from enricher.collaborators import OwnedPartition, RedisCall


class SweptStore(Protocol):
    def sweep(
        self, slices: Mapping[int, tuple[int, int]], cutoff_ms: int, count: int
    ) -> dict[int, tuple[int, int]]: ...


class Sweeper:
    """Expires quiet devices of the owned partitions, one slice per :meth:`step`."""

    SLICE = 500

    def __init__(
        self,
        store: SweptStore,
        owned: Mapping[int, OwnedPartition],
        *,
        ttl_days: float,
        interval: float,
        redis: RedisCall[Any],
        expired: Callable[[int], None],
    ) -> None:
        self.store = store
        self.owned = owned
        self.ttl_ms = int(ttl_days * 86_400_000)
        self.interval = interval
        self.redis = redis
        self.expired = expired
        """told how many devices each slice deleted"""
        self.next_at = time.monotonic()
        self.cutoff_ms = 0

    def step(self) -> None:
        """Sweep one slice of every partition whose sweep is under way, or start a sweep of
        every owned partition once the interval has passed. Raises ``Fenced`` naming the
        partitions another instance owns now."""
        if not self.ttl_ms:
            return
        owned = self.owned
        pending = {p: o for p, o in owned.items() if o.sweep_cursor is not None}
        if not pending:
            if time.monotonic() < self.next_at:
                return
            self.next_at = time.monotonic() + self.interval
            self.cutoff_ms = int(time.time() * 1000) - self.ttl_ms
            for state in owned.values():
                state.sweep_cursor = 0
                state.cache = {
                    d: s for d, s in state.cache.items() if s.last_event_ms >= self.cutoff_ms
                }
            pending = dict(owned)
        slices = {p: (o.epoch, o.sweep_cursor or 0) for p, o in pending.items()}
        done = self.redis("sweep", lambda: self.store.sweep(slices, self.cutoff_ms, self.SLICE))
        for partition, (cursor, deleted) in done.items():
            pending[partition].sweep_cursor = cursor or None
            if deleted:
                self.expired(deleted)
