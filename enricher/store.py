"""Device state in Redis: keys, the record format, the fenced write script.

Layout, per input partition (one Redis Cluster slot each, through the hash tag):

* ``<prefix>{<topic>:<partition>}:devices`` - a hash: device id -> packed record;
* ``<prefix>{<topic>:<partition>}:meta`` - a hash holding ``epoch``, the partition's fence,
  and the partition's event-time clock for the session lifecycle topic;
* ``<prefix>{<topic>:<partition>}:renews`` - a hash: device id -> renew requests;
* ``<prefix>{<topic>:<partition>}:expiries`` - a sorted set of devices whose session may not
  be declared ended yet, scored no later than its expiry (lifecycle topic only).

A record holds the device's state, the input offset of the last event applied to it, and the
state before the batch that wrote it (the snapshot). A record whose offset is at or past the
offset a batch starts from was written by a batch that never committed in Kafka (a crash, an
abort, a zombie), so the snapshot is the state to start from instead. The write script checks
the partition's epoch, bumped by every new owner, so a zombie cannot write at all once the
partition has moved. The clock is kept the same way (its value, the offset of the batch that
wrote it, and the value before that batch), and an expiry score is never later than the
expiry of either the state or the snapshot of its device, so a replay finds every session it
must end. ``docs/exactly-once.md`` walks through every crash point.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
import redis.cluster

from enricher.config import Settings
from enricher.ids import IdDeriver
from enricher.session import SessionState

RedisClient = redis.Redis | redis.cluster.RedisCluster

RECORD_VERSION = 2
NO_OFFSET = -1  # written by file mode: not tied to a stream position, always committed
_LATEST = 2**63 - 1  # a batch start past every offset: take each record's latest state

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

# Every script takes KEYS = devices hash, meta hash, expiries sorted set.
_FENCE = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch ~= ARGV[1] then
  return redis.error_reply('FENCED partition epoch is ' .. tostring(epoch) .. ', not ' .. ARGV[1])
end
"""

# Fenced batch write. ARGV = epoch, clock, clock offset, clock before (clock '': leave it;
# clock before '': none), number of records, number of scores, then device, record, ...,
# then score, device, ..., then devices to drop from the expiries.
_WRITE_SCRIPT = (
    _FENCE
    + """
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'clock', ARGV[2], 'clock_offset', ARGV[3])
  if ARGV[4] == '' then
    redis.call('HDEL', KEYS[2], 'clock_before')
  else
    redis.call('HSET', KEYS[2], 'clock_before', ARGV[4])
  end
end
local records_end = 6 + 2 * tonumber(ARGV[5])
local scores_end = records_end + 2 * tonumber(ARGV[6])
for i = 7, records_end, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, records_end)))
end
for i = records_end + 1, scores_end, 1000 do
  redis.call('ZADD', KEYS[3], unpack(ARGV, i, math.min(i + 999, scores_end)))
end
for i = scores_end + 1, #ARGV, 1000 do
  redis.call('ZREM', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return tonumber(ARGV[5])
"""
)

# The committed clock, the clock advanced by a batch, and the devices that may have expired
# by its watermark, with their records. ARGV = batch start offset, the batch's own clock (''
# if it has none), lateness, most devices to return. Returns {committed clock or false,
# clock or false, devices, records}.
_EXPIRING_SCRIPT = """
local meta = redis.call('HMGET', KEYS[2], 'clock', 'clock_offset', 'clock_before')
local clock, at, before = meta[1], meta[2], meta[3]
if clock and tonumber(at) >= tonumber(ARGV[1]) then clock = before end
local newest, batch = tonumber(clock), tonumber(ARGV[2])
if batch and (not newest or batch > newest) then newest = batch end
if not newest then return {false, false, {}, {}} end
local watermark = string.format('%.0f', newest - tonumber(ARGV[3]))
local devices = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. watermark, 'LIMIT', 0, ARGV[4])
local records = {}
if #devices > 0 then records = redis.call('HMGET', KEYS[1], unpack(devices)) end
return {clock or false, string.format('%.0f', newest), devices, records}
"""


# Expiry of quiet devices, a slice at a time. ARGV = epoch, HSCAN cursor, cutoff (epoch ms),
# slice size, 1-based position of the last event time in a record. Returns {next cursor,
# deleted}.
_SWEEP_SCRIPT = (
    _FENCE
    + """
local scan = redis.call('HSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[4])
local items, deleted, cutoff, at = scan[2], 0, tonumber(ARGV[3]), tonumber(ARGV[5])
for i = 1, #items, 2 do
  if struct.unpack('<i8', items[i + 1], at) < cutoff then
    redis.call('HDEL', KEYS[1], items[i])
    redis.call('ZREM', KEYS[3], items[i])
    deleted = deleted + 1
  end
end
return {scan[1], deleted}
"""
)
_LAST_EVENT_AT = _HEADER.size + _STATE.size - 8 + 1


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


class PartitionWrite(NamedTuple):
    """One batch's writes to one partition, fenced by ``epoch``."""

    epoch: int
    records: Mapping[str, bytes]
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
    expiries: str
    """device -> no later than its session's expiry, while its end may not be declared yet"""


def keys_of(keys: PartitionKeys) -> tuple[str, str, str]:
    """The keys every script takes, in order."""
    return keys.devices, keys.meta, keys.expiries


def partition_keys(prefix: str, topic: str, partition: int) -> PartitionKeys:
    tag = f"{prefix}{{{topic}:{partition}}}"
    return PartitionKeys(f"{tag}:devices", f"{tag}:meta", f"{tag}:renews", f"{tag}:expiries")


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
            state.ends_declared,
            state.first_event_ms,
            state.expires_ms,
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
        clocks: Mapping[int, ClockQuery] | None = None,
    ) -> Loaded:
        """In one round trip per Redis node: the committed state of devices,
        ``{partition: (batch start offset, devices)}``; the renew requests of
        ``{partition: devices}``; and for the lifecycle topic, each queried partition's clock
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
            pipe.execute_command("EVAL", _EXPIRING_SCRIPT, 3, *keys_of(keys), *args)
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

    def _fenced_scripts(self, calls: Mapping[int, tuple[str, list[Any]]]) -> dict[int, Any]:
        """Run one fenced script per partition (``{partition: (script, args)}``), pipelined;
        the replies by partition. Raises :class:`Fenced` naming every partition whose epoch
        moved on (the scripts of the others have run)."""
        pipe = self.client.pipeline(transaction=False)
        for partition, (script, args) in calls.items():
            pipe.execute_command("EVAL", script, 3, *keys_of(self.keys(partition)), *args)
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

    def save(self, writes: Mapping[int, PartitionWrite]) -> None:
        """One batch's writes, fenced by each partition's epoch."""
        calls: dict[int, tuple[str, list[Any]]] = {}
        for partition, write in writes.items():
            if not (write.records or write.clock or write.scores or write.unscored):
                continue
            clock: list[Any] = ["", "", ""]
            if write.clock is not None:
                value, offset, before = write.clock
                clock = [value, offset, "" if before is None else before]
            args: list[Any] = [write.epoch, *clock, len(write.records), len(write.scores)]
            for device, data in write.records.items():
                args += (device, data)
            for device, score in write.scores.items():
                args += (score, device)
            args += write.unscored
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
        loaded = self.store.load(wanted).states
        return {d: s for states in loaded.values() for d, s in states.items()}

    def save(self, states: dict[str, SessionState]) -> None:
        pipe = self.store.client.pipeline(transaction=False)
        for device, state in states.items():
            devices_key = self.store.keys(self._partition(device)).devices
            pipe.hset(devices_key, device, self.store.codec.pack(state, NO_OFFSET, None))
        pipe.execute()
