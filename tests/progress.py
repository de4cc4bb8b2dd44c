"""The service's progress through its input, for the integration tests to wait on.

:class:`Progress` reads the committed input offsets of the service's consumer group and the
input's end offsets, and waits for a goal (a number of committed records, or all input
committed), failing on a timeout, on a stall, or as soon as an instance died unexpectedly.

(PYTEST_DONT_REWRITE: like ``instances``, test modules import this module.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaException, TopicPartition
from instances import Fleet
from stack import Stack

from stacklib.client import committed_offsets, high_watermarks

# A wait for the service fails when its committed offsets stop moving for this long.
STALL_SECONDS = 60.0


class Progress:
    """The committed input offsets of the service's consumer group, and the input's ends.

    The service commits its input offsets in the transaction that publishes the output, so
    once every partition's committed offset is at its end, all output is committed."""

    def __init__(self, stack: Stack, group: str, topic: str) -> None:
        self.stack = stack
        self.group = group
        self.topic = topic
        meta = stack.admin().list_topics(topic, timeout=10)
        self.partitions = sorted(meta.topics[topic].partitions)
        self.consumer = self._consumer()

    def _consumer(self) -> Any:
        # read_uncommitted: an OffsetFetch for read_committed would wait for pending
        # transactional offsets (e.g. of a killed instance) instead of answering.
        return self.stack.kafka.offsets_reader(self.group, **{"auto.offset.reset": "earliest"})

    def reconnect(self) -> None:
        """A fresh client (fresh metadata), after a broker went away."""
        self.consumer.close()
        self.consumer = self._consumer()

    def _tps(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in self.partitions]

    def committed(self) -> dict[int, int]:
        found = committed_offsets(self.consumer, self._tps(), timeout=20)
        return {partition: offset for (_, partition), offset in found.items()}

    def ends(self) -> dict[int, int]:
        found = high_watermarks(self.consumer, self._tps(), timeout=10)
        return {partition: offset for (_, partition), offset in found.items()}

    def total(self) -> int:
        return sum(self.committed().values())

    def lag(self) -> dict[int, int]:
        committed, ends = self.committed(), self.ends()
        return {p: ends[p] - committed[p] for p in self.partitions if ends[p] != committed[p]}

    def wait(
        self,
        goal: Callable[[int, dict[int, int]], bool],
        what: str,
        fleet: Fleet,
        *,
        timeout: float = 300.0,
        stall: float = STALL_SECONDS,
        hint: Callable[[], str] = lambda: "",
    ) -> None:
        """Poll until ``goal(committed total, lag per partition)`` holds.

        Fails after ``timeout`` seconds, or sooner if the committed offsets do not move for
        ``stall`` seconds, or at once if an instance of ``fleet`` died unexpectedly."""
        started = last_change = time.monotonic()
        last_total = -1
        while True:
            try:
                committed, ends = self.committed(), self.ends()
            except KafkaException as error:  # e.g. a broker is down and leaders are moving
                if time.monotonic() - last_change > stall:
                    pytest.fail(f"cannot read offsets for {what}: {error}", pytrace=False)
                time.sleep(0.5)
                self.reconnect()
                continue
            total = sum(committed.values())
            lag = {p: ends[p] - committed[p] for p in self.partitions if ends[p] != committed[p]}
            if goal(total, lag):
                return
            fleet.check()
            now = time.monotonic()
            if total != last_total:
                last_total, last_change = total, now
            if now - started > timeout or now - last_change > stall:
                why = (
                    f"no committed progress for {stall:.0f}s"
                    if now - last_change > stall
                    else f"timed out after {timeout:.0f}s"
                )
                extra = hint()
                pytest.fail(
                    f"{why} waiting for {what}: committed {total} input records, lag per "
                    f"partition {lag}" + (f"\n{extra}" if extra else ""),
                    pytrace=False,
                )
            time.sleep(0.2)

    def wait_total(self, at_least: int, timeout: float, fleet: Fleet) -> None:
        """Until at least ``at_least`` input records are committed."""
        self.wait(
            lambda total, _: total >= at_least,
            f"{at_least} committed records",
            fleet,
            timeout=timeout,
        )

    def wait_done(
        self,
        timeout: float,
        fleet: Fleet,
        expected: int | None = None,
        *,
        stall: float = STALL_SECONDS,
        hint: Callable[[], str] = lambda: "",
    ) -> None:
        """Until every partition is committed up to its end (and, if given, the ends add up
        to ``expected`` records)."""
        self.wait(
            lambda total, lag: not lag and (expected is None or total == expected),
            "all input to be committed" + (f" ({expected} records)" if expected else ""),
            fleet,
            timeout=timeout,
            stall=stall,
            hint=hint,
        )

    def close(self) -> None:
        self.consumer.close()
