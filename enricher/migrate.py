"""Moving device state to a new input partition count: ``enricher state migrate``.

Kafka places a device's events by the hash of its key modulo the partition count, and the
state of a device lives under its partition's keys. When the input topic gains partitions,
many devices move: their next events arrive on a partition whose state does not know them.
The service refuses to run until the state is moved (:class:`~enricher.service.LayoutChanged`).

A migration first takes every partition (a new epoch each, so a running instance can no
longer write), then moves each device whose partition changed: its committed state (the
snapshot when the record was written by a batch that never committed), its renew requests
and its expiry score. Moved records carry no offset (they are committed state). A new
partition the group has already committed offsets of is recorded complete up to them. The
partition count is recorded last: a migration cut short can be run again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, cast

from enricher.partitioning import kafka_partition
from enricher.records import LATEST, NO_OFFSET
from enricher.store import PartitionStore

_SLICE = 1000


class MigrationError(RuntimeError):
    """The state cannot be migrated as asked."""


class Migration(NamedTuple):
    partitions_before: int
    partitions_after: int
    moved: int
    """devices whose state moved to another partition"""
    dropped: int
    """records that held no committed state (written by a batch that never committed)"""


def migrate(
    store: PartitionStore, committed: Mapping[int, int], partitions: int, now_ms: int
) -> Migration:
    """Move every device's state to its partition among ``partitions``; ``committed`` is the
    consumer group's committed offset of each partition (-1 or absent: none)."""
    before = store.partition_count()
    if before is None:
        raise MigrationError(
            "no partition count is recorded in Redis: the service records it when it starts"
        )
    if partitions < before:
        raise MigrationError(f"Kafka cannot remove partitions: {before} -> {partitions}")
    if partitions == before:
        return Migration(before, partitions, 0, 0)
    taken = store.fence(range(partitions), now_ms)
    moved = dropped = 0
    for partition in range(before):
        start = committed.get(partition, -1)
        moves, gone = _move_out(store, partition, partitions, LATEST if start < 0 else start)
        moved += moves
        dropped += gone
    client = store.client
    for partition in range(before, partitions):
        offset = committed.get(partition, -1)
        if offset >= 0 and taken[partition].complete is None:
            client.hset(store.keys(partition).meta, "complete", offset)
    store.record_partition_count(partitions)
    return Migration(before, partitions, moved, dropped)


def _move_out(
    store: PartitionStore, partition: int, partitions: int, committed: int
) -> tuple[int, int]:
    """Move the devices of ``partition`` that belong elsewhere now; (moved, dropped)."""
    client, codec = store.client, store.codec
    source = store.keys(partition)
    moved = dropped = 0
    cursor = 0
    while True:
        cursor, found = client.hscan(source.devices, cursor, count=_SLICE)
        items = cast(dict[bytes, bytes], found)
        leaving = {
            device.decode(): data
            for device, data in items.items()
            if kafka_partition(device, partitions) != partition
        }
        if leaving:
            names = list(leaving)
            read = client.pipeline(transaction=False)
            read.hmget(source.renews, names)
            for device in names:
                read.zscore(source.expiries, device)
            renews, *scores = read.execute()
            write = client.pipeline(transaction=False)
            for device, renew, score in zip(names, renews, scores, strict=True):
                target = store.keys(kafka_partition(device.encode(), partitions))
                state = codec.state_before(device, leaving[device], committed)
                if state is None:
                    dropped += 1
                else:
                    write.hset(target.devices, device, codec.pack(state, NO_OFFSET, None))
                    moved += 1
                    if renew is not None:
                        write.hset(target.renews, device, renew)
                    if score is not None:
                        write.zadd(target.expiries, {device: score})
            write.hdel(source.devices, *names)
            write.hdel(source.renews, *names)
            write.zrem(source.expiries, *names)
            write.execute()
        if cursor == 0:
            return moved, dropped
