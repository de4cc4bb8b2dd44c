"""``PartitionStore`` over dicts, for the commit protocol's and the repair's tests: the same
``fence``, ``load``, ``save`` and ``wipe`` semantics as the Redis scripts, snapshots and
restores as Redis would take and reload them, and failures on demand."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from enricher.ids import IdDeriver
from enricher.records import RecordCodec
from enricher.session import SessionState
from enricher.store import (
    ClockQuery,
    Expiring,
    Fenced,
    Loaded,
    Ownership,
    PartitionWrite,
    StateLost,
)

SALT = "checkpoint-test-salt"


class InMemoryStore:
    """``PartitionStore``'s ``fence``, ``load``, ``save`` and ``request_renew`` over dicts:
    each record's snapshot taken when its offset is at or past the batch start, the clock read
    the same way, expiry candidates below the watermark (by score, then device, at most the
    query's limit), the write fenced by each partition's epoch and checked against how complete
    its state is (the other partitions written, then :class:`Fenced` naming those whose epoch
    moved on, else :class:`StateLost` naming those whose epoch or state went back).

    Fails on demand: ``fail_next_load`` / ``fail_next_save`` raise before anything is read or
    written; ``partial_save`` writes only those partitions, then raises
    ``redis.ConnectionError`` (the connection dropped in the middle of the pipeline)."""

    def __init__(self) -> None:
        self.codec = RecordCodec(IdDeriver(SALT))
        self.devices: dict[int, dict[str, bytes]] = {}
        self.meta: dict[int, dict[str, int]] = {}
        self.renews: dict[int, dict[str, int]] = {}
        self.expiries: dict[int, dict[str, int]] = {}
        self.loads: list[dict[int, tuple[int, list[str]]]] = []
        self.applied: list[tuple[int, PartitionWrite]] = []
        self.fail_next_load: Exception | None = None
        self.fail_next_save: Exception | None = None
        self.partial_save: set[int] | None = None

    def fence(self, partitions: Iterable[int], now_ms: int = 0) -> dict[int, Ownership]:
        taken = {}
        for partition in partitions:
            meta = self.meta.setdefault(partition, {})
            meta["epoch"] = max(meta.get("epoch", 0) + 1, now_ms)
            taken[partition] = Ownership(meta["epoch"], meta.get("complete"))
        return taken

    def wipe(self, partition: int, epoch: int) -> None:
        self._check_epoch(partition, epoch)
        self.devices.pop(partition, None)
        self.expiries.pop(partition, None)
        meta = self.meta.setdefault(partition, {})
        for name in ("clock", "clock_offset", "clock_before", "complete"):
            meta.pop(name, None)

    def _check_epoch(self, partition: int, epoch: int) -> None:
        stored = self.meta.get(partition, {}).get("epoch")
        if stored is None or stored < epoch:
            raise StateLost([partition], f"epoch {stored}, behind {epoch}")
        if stored > epoch:
            raise Fenced([partition])

    def request_renew(self, partition: int, device: str) -> int:
        renews = self.renews.setdefault(partition, {})
        renews[device] = renews.get(device, 0) + 1
        return renews[device]

    def load(
        self,
        wanted: Mapping[int, tuple[int, Iterable[str]]],
        renews_of: Mapping[int, Iterable[str]] | None = None,
        clocks: Mapping[int, ClockQuery] | None = None,
    ) -> Loaded:
        self.loads.append({p: (start, sorted(devices)) for p, (start, devices) in wanted.items()})
        if self.fail_next_load is not None:
            error, self.fail_next_load = self.fail_next_load, None
            raise error
        states: dict[int, dict[str, SessionState]] = {p: {} for p in wanted}
        for partition, (start, devices) in wanted.items():
            records = self.devices.get(partition, {})
            for device in devices:
                data = records.get(device)
                if data is None:
                    continue
                state = self.codec.state_before(device, data, start)
                if state is not None:
                    states[partition][device] = state
        counts: dict[int, dict[str, int]] = {}
        for partition, devices in (renews_of or {}).items():
            known = self.renews.get(partition, {})
            counts[partition] = {d: known[d] for d in devices if known.get(d)}
        expiring = {p: self._expiring(p, query) for p, query in (clocks or {}).items()}
        return Loaded(states, counts, expiring)

    def _expiring(self, partition: int, query: ClockQuery) -> Expiring:
        meta = self.meta.get(partition, {})
        clock = meta.get("clock")
        if clock is not None and meta["clock_offset"] >= query.start:
            clock = meta.get("clock_before")
        newest = clock
        batch_clock = query.batch_clock_ms
        if batch_clock is not None and (newest is None or batch_clock > newest):
            newest = batch_clock
        if newest is None:
            return Expiring(None, None, {})
        watermark = newest - query.lateness_ms
        scores = self.expiries.get(partition, {})
        found = sorted((score, d) for d, score in scores.items() if score < watermark)
        records = self.devices.get(partition, {})
        return Expiring(clock, newest, {d: records.get(d) for _, d in found[: query.limit]})

    def save(self, writes: Mapping[int, PartitionWrite]) -> None:
        if self.fail_next_save is not None:
            error, self.fail_next_save = self.fail_next_save, None
            raise error
        partial, self.partial_save = self.partial_save, None
        fenced, lost = [], []
        for partition, write in writes.items():
            if partial is not None and partition not in partial:
                continue
            try:
                self._check_epoch(partition, write.epoch)
            except Fenced:
                fenced.append(partition)
                continue
            except StateLost:
                lost.append(partition)
                continue
            if self.meta[partition].get("complete", -1) < write.complete[0]:
                lost.append(partition)
                continue
            self._apply(partition, write)
        if partial is not None:
            raise redis.ConnectionError("connection lost in the middle of the pipeline")
        if fenced:
            raise Fenced(fenced)
        if lost:
            raise StateLost(lost, "behind")

    def _apply(self, partition: int, write: PartitionWrite) -> None:
        self.applied.append((partition, write))
        meta = self.meta.setdefault(partition, {})
        meta["complete"] = write.complete[1]
        if write.clock is not None:
            value, offset, before = write.clock
            meta["clock"], meta["clock_offset"] = value, offset
            if before is None:
                meta.pop("clock_before", None)
            else:
                meta["clock_before"] = before
        self.devices.setdefault(partition, {}).update(write.records)
        expiries = self.expiries.setdefault(partition, {})
        expiries.update(write.scores)
        for device in write.unscored:
            expiries.pop(device, None)

    def snapshot(self) -> tuple[dict[int, Any], ...]:
        """A copy of everything Redis would hold, epochs included (an RDB snapshot)."""
        return copy.deepcopy((self.devices, self.meta, self.renews, self.expiries))

    def restore(self, snapshot: tuple[dict[int, Any], ...]) -> None:
        """Everything as in ``snapshot``: Redis restarted from it."""
        self.devices, self.meta, self.renews, self.expiries = copy.deepcopy(snapshot)

    def contents(self) -> tuple[object, ...]:
        """Everything but the epochs, to compare two stores."""
        meta = {p: {k: v for k, v in m.items() if k != "epoch"} for p, m in self.meta.items()}
        return self.devices, self.expiries, self.renews, meta
