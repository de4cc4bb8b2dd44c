"""Device state in Redis: keys, the record format, the fenced write script.

Layout, per input partition (one Redis Cluster slot each, through the hash tag):

* ``<prefix>{<topic>:<partition>}:devices`` - a hash: device id -> packed record;
* ``<prefix>{<topic>:<partition>}:meta`` - a hash holding ``epoch``, the partition's fence.

A record holds the device's state, the input offset of the last event applied to it, and the
state before the batch that wrote it (the snapshot). A record whose offset is at or past the
offset a batch starts from was written by a batch that never committed in Kafka (a crash, an
abort, a zombie), so the snapshot is the state to start from instead. The write script checks
the partition's epoch, bumped by every new owner, so a zombie cannot write at all once the
partition has moved. ``docs/exactly-once.md`` walks through every crash point.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
import redis.cluster

from enricher.config import Settings
from enricher.ids import IdDeriver
from enricher.session import SessionState

RedisClient = redis.Redis | redis.cluster.RedisCluster

RECORD_VERSION = 1
NO_OFFSET = -1  # written by file mode: not tied to a stream position, always committed
_LATEST = 2**63 - 1  # a batch start past every offset: take each record's latest state

_HEADER = struct.Struct("<BBq")  # version, flags, offset
# flags, session index, event index, background index, foreground index, renews applied,
# first event time, last event time (last: the sweep script reads it at a fixed position)
_STATE = struct.Struct("<BIIIIIqq")
_HAS_SNAPSHOT = 1
_IN_BACKGROUND = 1
_HAS_PREVIOUS = 2
_TEXT_EVENT_ID = 4

# Fenced batch write: KEYS = devices hash, meta hash; ARGV = epoch, field, value, ...
_WRITE_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch ~= ARGV[1] then
  return redis.error_reply('FENCED partition epoch is ' .. tostring(epoch) .. ', not ' .. ARGV[1])
end
for i = 2, #ARGV, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return (#ARGV - 1) / 2
"""


# Expiry of quiet devices, a slice at a time: KEYS = devices hash, meta hash; ARGV = epoch,
# HSCAN cursor, cutoff (epoch ms), slice size, 1-based position of the last event time in a
# record. Returns {next cursor, deleted}.
_SWEEP_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch ~= ARGV[1] then
  return redis.error_reply('FENCED partition epoch is ' .. tostring(epoch) .. ', not ' .. ARGV[1])
end
local scan = redis.call('HSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[4])
local items, deleted, cutoff, at = scan[2], 0, tonumber(ARGV[3]), tonumber(ARGV[5])
for i = 1, #items, 2 do
  if struct.unpack('<i8', items[i + 1], at) < cutoff then
    redis.call('HDEL', KEYS[1], items[i])
    deleted = deleted + 1
  end
end
return {scan[1], deleted}
"""
_LAST_EVENT_AT = _HEADER.size + _STATE.size - 8 + 1


class Fenced(RuntimeError):
    """This instance no longer owns the partition: another one bumped its epoch."""

    def __init__(self, partitions: Iterable[int]) -> None:
        self.partitions = sorted(partitions)
        super().__init__(f"fenced out of partitions {self.partitions}")


@dataclass(frozen=True, slots=True)
class Record:
    """One device's stored state, as of input ``offset``, and the state before that batch."""

    state: SessionState
    offset: int
    snapshot: SessionState | None

    def state_before(self, batch_start: int) -> SessionState | None:
        """The committed state to start a batch at ``batch_start`` from."""
        return self.state if self.offset < batch_start else self.snapshot


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


def partition_keys(prefix: str, topic: str, partition: int) -> PartitionKeys:
    tag = f"{prefix}{{{topic}:{partition}}}"
    return PartitionKeys(f"{tag}:devices", f"{tag}:meta", f"{tag}:renews")


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
        version, flags, offset = _HEADER.unpack_from(data)
        if version != RECORD_VERSION:
            raise ValueError(f"device {device_id!r}: record version {version} is not supported")
        state, end = self._unpack_state(device_id, data, _HEADER.size)
        snapshot = None
        if flags & _HAS_SNAPSHOT:
            snapshot, end = self._unpack_state(device_id, data, end)
        return Record(state, offset, snapshot)

    def _unpack_state(self, device_id: str, data: bytes, start: int) -> tuple[SessionState, int]:
        flags, index, events, background, foreground, renews, first_ms, last_ms = (
            _STATE.unpack_from(data, start)
        )
        at = start + _STATE.size
        if flags & _TEXT_EVENT_ID:
            size = data[at]
            first_event_id = data[at + 1 : at + 1 + size].decode()
            at += 1 + size
        else:
            first_event_id = str(uuid.UUID(bytes=data[at : at + 16]))
            at += 16
        previous = None
        if flags & _HAS_PREVIOUS:
            previous = str(uuid.UUID(bytes=data[at : at + 16]))
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
        )
        return state, at


def _pack_state(state: SessionState) -> bytes:
    flags = _IN_BACKGROUND if state.in_background else 0
    event_id = state.first_event_id
    canonical = str(uuid.UUID(event_id)) == event_id
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
            state.first_event_ms,
            state.last_event_ms,
        )
    ]
    if canonical:
        parts.append(uuid.UUID(event_id).bytes)
    else:
        encoded = event_id.encode()
        parts.append(bytes([len(encoded)]) + encoded)
    if state.previous_session_id is not None:
        parts.append(uuid.UUID(state.previous_session_id).bytes)
    return b"".join(parts)


class PartitionStore:
    """Fenced, batched access to the state of the partitions this instance owns.

    Every call is one round trip per Redis node, whatever the number of devices.
    """

    def __init__(self, client: RedisClient, prefix: str, topic: str, ids: IdDeriver) -> None:
        self.client = client
        self.prefix = prefix
        self.topic = topic
        self.codec = RecordCodec(ids)

    def keys(self, partition: int) -> PartitionKeys:
        return partition_keys(self.prefix, self.topic, partition)

    def fence(self, partitions: Iterable[int]) -> dict[int, int]:
        """Take ownership: bump each partition's epoch; writes with an older one now fail."""
        ordered = list(partitions)
        pipe = self.client.pipeline(transaction=False)
        for partition in ordered:
            pipe.hincrby(self.keys(partition).meta, "epoch", 1)
        return dict(zip(ordered, (int(e) for e in pipe.execute()), strict=True))

    def load(
        self,
        wanted: Mapping[int, tuple[int, Iterable[str]]],
        renews_of: Mapping[int, Iterable[str]] | None = None,
    ) -> tuple[dict[int, dict[str, SessionState]], dict[int, dict[str, int]]]:
        """Committed state of devices, ``{partition: (batch start offset, devices)}``, and the
        renew requests of ``{partition: devices}``, in one round trip per Redis node."""
        requests = [(p, start, list(devices)) for p, (start, devices) in wanted.items() if devices]
        renews = [(p, list(devices)) for p, devices in (renews_of or {}).items() if devices]
        pipe = self.client.pipeline(transaction=False)
        for partition, _, devices in requests:
            pipe.hmget(self.keys(partition).devices, devices)
        for partition, devices in renews:
            pipe.hmget(self.keys(partition).renews, devices)
        replies = pipe.execute()
        states: dict[int, dict[str, SessionState]] = {p: {} for p in wanted}
        state_replies, renew_replies = replies[: len(requests)], replies[len(requests) :]
        for (partition, start, devices), values in zip(requests, state_replies, strict=True):
            found = states[partition]
            for device, data in zip(devices, values, strict=True):
                if data is None:
                    continue
                state = self.codec.unpack(device, data).state_before(start)
                if state is not None:
                    found[device] = state
        counts: dict[int, dict[str, int]] = {p: {} for p in renews_of or {}}
        for (partition, devices), values in zip(renews, renew_replies, strict=True):
            counts[partition] = {d: int(v) for d, v in zip(devices, values, strict=True) if v}
        return states, counts

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

    def _fenced_scripts(self, calls: Mapping[int, tuple[str, list[Any]]]) -> dict[int, Any]:
        """Run one fenced script per partition (``{partition: (script, args)}``), pipelined;
        the replies by partition. Raises :class:`Fenced` naming every partition whose epoch
        moved on (the scripts of the others have run)."""
        pipe = self.client.pipeline(transaction=False)
        for partition, (script, args) in calls.items():
            keys = self.keys(partition)
            pipe.execute_command("EVAL", script, 2, keys.devices, keys.meta, *args)
        replies: dict[int, Any] = {}
        fenced = []
        for partition, reply in zip(calls, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, redis.ResponseError) and str(reply).startswith("FENCED"):
                fenced.append(partition)
            elif isinstance(reply, Exception):
                raise reply
            else:
                replies[partition] = reply
        if fenced:
            raise Fenced(fenced)
        return replies

    def save(self, writes: Mapping[int, tuple[int, Mapping[str, bytes]]]) -> None:
        """Write packed records, ``{partition: (epoch, {device: record})}``, fenced."""
        calls: dict[int, tuple[str, list[Any]]] = {}
        for partition, (epoch, records) in writes.items():
            if records:
                args: list[Any] = [epoch]
                for device, data in records.items():
                    args += (device, data)
                calls[partition] = (_WRITE_SCRIPT, args)
        self._fenced_scripts(calls)

    def sweep(
        self, slices: Mapping[int, tuple[int, int]], cutoff_ms: int, count: int
    ) -> dict[int, tuple[int, int]]:
        """Delete devices whose last event is older than ``cutoff_ms``, one HSCAN slice per
        partition: ``{partition: (epoch, cursor)}`` -> ``{partition: (next cursor, deleted)}``.
        A cursor of 0 after the first slice means the partition's sweep is complete."""
        calls = {
            partition: (_SWEEP_SCRIPT, [epoch, cursor, cutoff_ms, count, _LAST_EVENT_AT])
            for partition, (epoch, cursor) in slices.items()
        }
        replies = self._fenced_scripts(calls)
        return {p: (int(reply[0]), int(reply[1])) for p, reply in replies.items()}


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives a key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 hash (seed 0x9747b28c), as a signed int."""
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length % 4
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


class BatchRedisStore:
    """File mode's view of the service's state: devices found by Kafka's partitioner.

    File-mode writes are not fenced and carry no stream offset; do not run a batch against
    partitions a running service owns.
    """

    def __init__(self, client: RedisClient, settings: Settings, *, partitions: int) -> None:
        self.store = PartitionStore(
            client, settings.redis_key_prefix, settings.input_topic, IdDeriver(settings.salt)
        )
        self.partitions = partitions

    def _partition(self, device: str) -> int:
        return kafka_partition(device.encode(), self.partitions)

    def load(self, devices: set[str]) -> dict[str, SessionState]:
        by_partition: dict[int, list[str]] = {}
        for device in devices:
            by_partition.setdefault(self._partition(device), []).append(device)
        wanted = {p: (_LATEST, ds) for p, ds in by_partition.items()}
        loaded, _ = self.store.load(wanted)
        return {d: s for states in loaded.values() for d, s in states.items()}

    def save(self, states: dict[str, SessionState]) -> None:
        pipe = self.store.client.pipeline(transaction=False)
        for device, state in states.items():
            devices_key = self.store.keys(self._partition(device)).devices
            pipe.hset(devices_key, device, self.store.codec.pack(state, NO_OFFSET, None))
        pipe.execute()
