"""Recovery's check of newly assigned partitions, with a fake consumer (no broker, no Redis):
where a checked partition is served from."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from confluent_kafka import TopicPartition

from enricher import config
from enricher.collaborators import OwnedPartition, direct
from enricher.intake import InputMessage
from enricher.metrics import Metrics
from enricher.recovery import Recovery

SETTINGS = config.load(env={"ENRICHER_INPUT_TOPIC": "raw"})
PARTITION = 3


class FakeConsumer:
    """What Recovery asks of the consumer, recorded; ``committed`` answers from a table."""

    def __init__(self, committed: dict[int, int]) -> None:
        self.offsets = committed
        self.calls: list[tuple[str, int, int | None]] = []

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self.calls += [("pause", tp.partition, None) for tp in partitions]

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self.calls += [("resume", tp.partition, None) for tp in partitions]

    def seek(self, partition: TopicPartition) -> None:
        self.calls.append(("seek", partition.partition, partition.offset))

    def committed(
        self, partitions: Sequence[TopicPartition], timeout: float
    ) -> list[TopicPartition]:
        offsets = self.offsets
        return [TopicPartition(tp.topic, tp.partition, offsets[tp.partition]) for tp in partitions]


def message(offset: int) -> InputMessage:
    return InputMessage("raw", PARTITION, offset, b"device", b"{}", None, 0)


def recovery(consumer: FakeConsumer, owned: dict[int, OwnedPartition]) -> Recovery:
    return Recovery(
        SETTINGS,
        consumer,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        owned=owned,
        metrics=Metrics(),
        redis_call=direct,
        new_checkpoint=None,  # type: ignore[arg-type]
        stopping=threading.Event(),
        kafka_timeout=1.0,
    )


@pytest.mark.parametrize(
    ("consumed", "committed", "served"),
    [
        ([500, 501], 500, [("seek", PARTITION, 500), ("resume", PARTITION, None)]),
        # consumption began below what the group committed: its input is enriched already
        ([300, 301], 500, [("seek", PARTITION, 500), ("resume", PARTITION, None)]),
        # ... or above it: the input between would be skipped
        ([700], 500, [("seek", PARTITION, 500), ("resume", PARTITION, None)]),
        # nothing committed yet: from where consumption began
        ([0, 1], -1001, [("seek", PARTITION, 0), ("resume", PARTITION, None)]),
        # nothing consumed yet: from where the partition is
        ([], 500, [("resume", PARTITION, None)]),
    ],
)
def test_a_checked_partition_is_served_from_the_committed_offset(
    consumed: list[int], committed: int, served: list[tuple[str, int, int | None]]
) -> None:
    consumer = FakeConsumer({PARTITION: committed})
    owned = {PARTITION: OwnedPartition(epoch=7)}
    held = recovery(consumer, owned)
    held.assigned(PARTITION, complete=500)
    assert held.busy
    assert held.admit([message(offset) for offset in consumed]) == []
    held.step()
    assert not held.busy
    assert consumer.calls == [("pause", PARTITION, None), *served]
    assert owned[PARTITION].committed == max(committed, -1)
