"""Device state in Redis: the keys of each partition, and the fenced, batched access to them.

Layout, per input partition (one Redis Cluster slot each, through the hash tag):

* ``<prefix>{<topic>:<partition>}:devices`` - a hash: device id -> state record
  (:mod:`enricher.records`);
* ``<prefix>{<topic>:<partition>}:meta`` - a hash holding ``epoch``, the partition's fence;
  ``complete``, the input offset the state is complete up to (the end of the last batch
  written); and the partition's event-time clock for the session events topic;
* ``<prefix>{<topic>:<partition>}:renews`` - a hash: device id -> renew requests;
* ``<prefix>{<topic>:<partition>}:expiries`` - a sorted set of devices whose session may not
  be declared ended yet, scored no later than its expiry (session events topic only);
* ``<prefix>{<topic>}:partitions`` - the input topic's partition count the devices are
  placed by (one key for the topic).

Writes go through the fenced scripts of :mod:`enricher.scripts`: they check the partition's
epoch, bumped by every new owner, so a zombie cannot write at all once the partition has moved;
and that the state is complete up to the offset the writer expects, so that state Redis lost
(a restart from an older snapshot, a failover, a flush) is noticed (:class:`StateLost`) and
repaired (:mod:`enricher.repair`) before anything is enriched from it.
The clock is kept as the state records are (its value, the offset of the batch that wrote it,
and the value before that batch), and an expiry score is never later than the expiry of either
the state or the snapshot of its device, so a replay finds every session it must end.
``docs/exactly-once.md`` walks through every crash point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import redis
import redis.cluster

from enricher.config import Settings
from enricher.ids import IdDeriver
from enricher.partitioning import kafka_partition
from enricher.records import LAST_EVENT_AT, LATEST, NO_OFFSET, Record, RecordCodec
from enricher.scripts import (
    EXPIRING_SCRIPT,
    SWEEP_SCRIPT,
    TAKE_SCRIPT,
    WIPE_SCRIPT,
    WRITE_SCRIPT,
)
from enricher.session import SessionState

RedisClient = redis.Redis | redis.cluster.RedisCluster


class ClockQuery(NamedTuple):
    """What a batch asks of a partition's clock (see :meth:`PartitionStore.load`)."""

    start: int
    """the batch's first offset in the partition"""
    batch_clock_ms: int | None
    """the latest clock time among the batch's events there (None: no event)"""
    lateness_ms: int
    limit: int
    """the most devices to return"""


class Expiring(NamedTuple):
    """A partition's clock before and after a batch, and devices that may have expired."""

    committed_ms: int | None
    """the committed clock (None: the partition has none yet)"""
    clock_ms: int | None
    """the committed clock advanced by the batch's events (None: the partition has none)"""
    records: dict[str, bytes | None]
    """each device's packed record (None: none), unpacked only when its state is not cached
    (:meth:`RecordCodec.state_before`)"""


class Loaded(NamedTuple):
    states: dict[int, dict[str, SessionState]]
    renews: dict[int, dict[str, int]]
    expiring: dict[int, Expiring]


class Ownership(NamedTuple):
    """A partition just taken: its new epoch, and the offset its state is complete up to
    (None: Redis holds no record of it: a new partition, or one whose state was wiped)."""

    epoch: int
    complete: int | None


class PartitionWrite(NamedTuple):
    """One batch's writes to one partition, fenced by ``epoch``."""

    epoch: int
    records: Mapping[str, bytes]
    complete: tuple[int, int]
    """(the offset the state must be complete up to already, the offset it is complete up to
    with this write)"""
    clock: tuple[int, int, int | None] | None = None
    """(clock, offset of the batch's last event, committed clock before the batch)"""
    scores: Mapping[str, int] = {}
    """device -> expiry score to set"""
    unscored: Sequence[str] = ()
    """devices to drop from the expiries"""


class Fenced(RuntimeError):
    """This instance no longer owns the partition: another one bumped its epoch."""

    def __init__(self, partitions: Iterable[int]) -> None:
        self.partitions = sorted(partitions)
        super().__init__(f"fenced out of partitions {self.partitions}")


class StateLost(RuntimeError):
    """Redis holds less of these partitions' state than was committed: it lost writes (a
    restart from an older snapshot, a failover to a lagging replica, a flush)."""

    def __init__(self, partitions: Iterable[int], detail: str) -> None:
        self.partitions = sorted(partitions)
        super().__init__(f"redis lost state of partitions {self.partitions}: {detail}")


def connect(settings: Settings) -> RedisClient:
    """A client for the configured Redis (single node or cluster, TLS with ``rediss://``)."""
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5}
    if settings.redis_cluster:
        return redis.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.Redis.from_url(settings.redis_url, health_check_interval=30, **options)


class PartitionKeys(NamedTuple):
    """The keys of one input partition, all in one Redis Cluster slot."""

    devices: str
    """device id -> packed record"""
    meta: str
    """``epoch``: the fence"""
    renews: str
    """device id -> how many renews were requested for it (only ever incremented)"""
    expiries: str
    """device -> no later than its session's expiry, while its end may not be declared yet"""


def keys_of(keys: PartitionKeys) -> tuple[str, str, str]:
    """The keys every script takes, in order."""
    return keys.devices, keys.meta, keys.expiries


def partition_keys(prefix: str, topic: str, partition: int) -> PartitionKeys:
    tag = f"{prefix}{{{topic}:{partition}}}"
    return PartitionKeys(f"{tag}:devices", f"{tag}:meta", f"{tag}:renews", f"{tag}:expiries")


class PartitionStore:
    """Fenced, batched access to the state of the partitions this instance owns.

    Every call is one round trip per Redis node, whatever the number of devices.
    """

    def __init__(self, client: RedisClient, prefix: str, topic: str, ids: IdDeriver) -> None:
        self.client = client
        self.prefix = prefix
        self.topic = topic
        self.codec = RecordCodec(ids)
        self.cluster = isinstance(client, redis.cluster.RedisCluster)

    def keys(self, partition: int) -> PartitionKeys:
        return partition_keys(self.prefix, self.topic, partition)

    def fence(self, partitions: Iterable[int], now_ms: int) -> dict[int, Ownership]:
        """Take ownership: a new epoch for each partition, above the stored one and no lower
        than ``now_ms``; writes with an older epoch now fail. Also reads how complete each
        partition's state is."""
        ordered = list(partitions)
        pipe = self.client.pipeline(transaction=False)
        for partition in ordered:
            pipe.execute_command("EVAL", TAKE_SCRIPT, 3, *keys_of(self.keys(partition)), now_ms)
        taken = {}
        for partition, (epoch, complete) in zip(ordered, pipe.execute(), strict=True):
            taken[partition] = Ownership(int(epoch), None if complete is None else int(complete))
        return taken

    def wipe(self, partition: int, epoch: int) -> None:
        """Drop a partition's devices, expiries and clock (fenced); its renew requests stay."""
        self._fenced_scripts({partition: (WIPE_SCRIPT, [epoch])})

    def partition_count(self) -> int | None:
        """The input partition count the devices are placed by (None: not recorded yet)."""
        value = self.client.get(f"{self.prefix}{{{self.topic}}}:partitions")
        return None if value is None else int(value)

    def record_partition_count(self, partitions: int) -> None:
        self.client.set(f"{self.prefix}{{{self.topic}}}:partitions", partitions)

    def load(
        self,
        wanted: Mapping[int, tuple[int, Iterable[str]]],
        renews_of: Mapping[int, Iterable[str]] | None = None,
        clocks: Mapping[int, ClockQuery] | None = None,
    ) -> Loaded:
        """In one round trip per Redis node: the committed state of devices,
        ``{partition: (batch start offset, devices)}``; the renew requests of
        ``{partition: devices}``; and for the session events topic, each queried partition's clock
        and the devices that may have expired by its watermark."""
        requests = [(p, start, list(devices)) for p, (start, devices) in wanted.items() if devices]
        renews = [(p, list(devices)) for p, devices in (renews_of or {}).items() if devices]
        queries = list((clocks or {}).items())
        pipe = self.client.pipeline(transaction=False)
        for partition, _, devices in requests:
            pipe.hmget(self.keys(partition).devices, devices)
        for partition, devices in renews:
            pipe.hmget(self.keys(partition).renews, devices)
        for partition, query in queries:
            keys = self.keys(partition)
            batch_clock = "" if query.batch_clock_ms is None else query.batch_clock_ms
            args = (query.start, batch_clock, query.lateness_ms, query.limit)
            pipe.execute_command("EVAL", EXPIRING_SCRIPT, 3, *keys_of(keys), *args)
        replies = iter(pipe.execute())
        states: dict[int, dict[str, SessionState]] = {p: {} for p in wanted}
        for partition, start, devices in requests:
            found = states[partition]
            for device, data in zip(devices, next(replies), strict=True):
                if data is None:
                    continue
                state = self.codec.state_before(device, data, start)
                if state is not None:
                    found[device] = state
        counts: dict[int, dict[str, int]] = {p: {} for p in renews_of or {}}
        for partition, devices in renews:
            counts[partition] = {
                d: int(v) for d, v in zip(devices, next(replies), strict=True) if v
            }
        expiring: dict[int, Expiring] = {}
        for partition, _ in queries:
            committed, clock, devices, records = next(replies)
            expiring[partition] = Expiring(
                None if committed is None else int(committed),
                None if clock is None else int(clock),
                {raw.decode(): data for raw, data in zip(devices, records, strict=True)},
            )
        return Loaded(states, counts, expiring)

    def request_renew(self, partition: int, device: str) -> int:
        """Ask for a new session at the device's next event; returns the request count."""
        return int(self.client.hincrby(self.keys(partition).renews, device, 1))

    def latest(self, partition: int, device: str) -> tuple[Record | None, int]:
        """The device's record as last written, and its renew request count."""
        keys = self.keys(partition)
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(keys.devices, device)
        pipe.hget(keys.renews, device)
        data, renews = pipe.execute()
        record = self.codec.unpack(device, data) if data is not None else None
        return record, int(renews or 0)

    def _fenced_scripts(
        self, calls: Mapping[int, tuple[str, list[Any]]], *, renews: bool = False
    ) -> dict[int, Any]:
        """Run one fenced script per partition (``{partition: (script, args)}``), pipelined;
        the replies by partition. The scripts take the keys every script takes, and with
        ``renews`` the renews hash after them. Raises :class:`Fenced` naming every partition
        whose epoch moved on (the scripts of the others have run)."""
        pipe = self.client.pipeline(transaction=False)
        for partition, (script, args) in calls.items():
            keys = self.keys(partition)
            names = [*keys_of(keys), keys.renews] if renews else keys_of(keys)
            pipe.execute_command("EVAL", script, len(names), *names, *args)
        replies: dict[int, Any] = {}
        refusals: dict[int, str] = {}
        for partition, reply in zip(calls, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, redis.ResponseError) and str(reply).startswith(_REFUSALS):
                refusals[partition] = str(reply)
            elif isinstance(reply, Exception):
                raise reply
            else:
                replies[partition] = reply
        _raise_refusals(refusals)
        return replies

    def save(self, writes: Mapping[int, PartitionWrite]) -> None:
        """One batch's writes, fenced by each partition's epoch and checked against how
        complete each partition's state must be already: one script call for every partition
        on a single Redis node, one per partition on a cluster."""
        if self.cluster:
            calls = [[partition] for partition in writes]
        else:
            calls = [list(writes)] if writes else []
        pipe = self.client.pipeline(transaction=False)
        for partitions in calls:
            keys: list[str] = []
            args: list[Any] = []
            for partition in partitions:
                keys += keys_of(self.keys(partition))
                section = _write_args(writes[partition])
                args += (len(section), *section)
            pipe.execute_command("EVAL", WRITE_SCRIPT, len(keys), *keys, *args)
        refusals: dict[int, str] = {}
        for partitions, replies in zip(calls, pipe.execute(), strict=True):
            for partition, reply in zip(partitions, replies, strict=True):
                if not isinstance(reply, int):  # why it was refused (bytes, or str if decoded)
                    refusals[partition] = reply.decode() if isinstance(reply, bytes) else reply
        _raise_refusals(refusals)

    def sweep(
        self, slices: Mapping[int, tuple[int, int]], cutoff_ms: int, count: int
    ) -> dict[int, tuple[int, int]]:
        """Delete devices whose last event is older than ``cutoff_ms``, one HSCAN slice per
        partition: ``{partition: (epoch, cursor)}`` -> ``{partition: (next cursor, deleted)}``.
        A cursor of 0 after the first slice means the partition's sweep is complete. Renew
        counters go with their devices, and those of devices without state go too."""
        calls = {
            partition: (SWEEP_SCRIPT, [epoch, cursor, cutoff_ms, count, LAST_EVENT_AT])
            for partition, (epoch, cursor) in slices.items()
        }
        replies = self._fenced_scripts(calls, renews=True)
        return {p: (int(reply[0]), int(reply[1])) for p, reply in replies.items()}


def _write_args(write: PartitionWrite) -> list[Any]:
    """A partition's arguments to :data:`~enricher.scripts.WRITE_SCRIPT`."""
    clock: list[Any] = ["", "", ""]
    if write.clock is not None:
        value, offset, before = write.clock
        clock = [value, offset, "" if before is None else before]
    args: list[Any] = [write.epoch, *write.complete, *clock]
    args += (len(write.records), len(write.scores))
    for device, data in write.records.items():
        args += (device, data)
    for device, score in write.scores.items():
        args += (score, device)
    args += write.unscored
    return args


_REFUSALS = ("FENCED", "LOST")


def _raise_refusals(refusals: Mapping[int, str]) -> None:
    """Raise :class:`Fenced` naming every partition whose epoch moved on, else
    :class:`StateLost` naming every partition whose state Redis lost, if any."""
    fenced = [p for p, why in refusals.items() if why.startswith("FENCED")]
    if fenced:
        raise Fenced(fenced)
    if refusals:
        lost = {p: why.removeprefix("LOST ") for p, why in refusals.items()}
        raise StateLost(lost, "; ".join(f"{p}: {why}" for p, why in lost.items()))


class FileModeStore:
    """File mode's view of the service's state (``enricher batch --redis-url``): devices found
    by Kafka's partitioner.

    File-mode writes are not fenced and carry no stream offset; do not run ``enricher batch``
    against partitions a running service owns.
    """

    def __init__(self, store: PartitionStore, *, partitions: int) -> None:
        self.store = store
        self.partitions = partitions

    def _partition(self, device: str) -> int:
        return kafka_partition(device.encode(), self.partitions)

    def load(self, devices: set[str]) -> dict[str, SessionState]:
        by_partition: dict[int, list[str]] = {}
        for device in devices:
            by_partition.setdefault(self._partition(device), []).append(device)
        wanted = {p: (LATEST, ds) for p, ds in by_partition.items()}
        loaded = self.store.load(wanted).states
        return {d: s for states in loaded.values() for d, s in states.items()}

    def save(self, states: dict[str, SessionState]) -> None:
        pipe = self.store.client.pipeline(transaction=False)
        for device, state in states.items():
            devices_key = self.store.keys(self._partition(device)).devices
            pipe.hset(devices_key, device, self.store.codec.pack(state, NO_OFFSET, None))
        pipe.execute()
