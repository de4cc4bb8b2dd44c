"""The benchmark's own local stack (``ops/devstack``), and the Kafka and Redis calls that the
measurements make on it.

Running ops/devstack and the Kafka and Redis calls go through the stack client that the test
fixtures use too (ops/stacklib/client.py); this module adds the benchmark's settings (partition
count, JVM options, timeouts) and its counters, and turns errors into :class:`BenchError`."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from bench.common import REPO, BenchError, say

if str(REPO / "ops") not in sys.path:
    sys.path.insert(0, str(REPO / "ops"))  # for ops/stacklib

from stacklib import client

DEVSTACK = client.DEVSTACK
PARTITIONS = 12
# What docs/devstack.md suggests for a benchmark: the full JIT and a bigger heap than the
# quick-starting test default.
KAFKA_JVM_OPTS = "-Xms1g -Xmx2g -XX:+UseG1GC"
UP_TIMEOUT_SECONDS = 900.0
ADMIN_TIMEOUT_SECONDS = 30.0
READ_BATCH = 10_000
# Commands the benchmark itself sends to Redis; they are not the system's.
OWN_REDIS_COMMANDS = frozenset({"info", "config|resetstat", "config|get", "flushall"})


def kafka_jvm_opts() -> str:
    return os.environ.get("ENRICHER_DEVSTACK_KAFKA_JVM_OPTS", KAFKA_JVM_OPTS)


def up(state_dir: Path) -> dict[str, str]:
    """``ops/devstack up`` for the benchmark's folder; its ``ENRICHER_*`` settings."""
    env = {**os.environ, "ENRICHER_DEVSTACK_KAFKA_JVM_OPTS": kafka_jvm_opts()}
    say(f"starting Kafka and Redis in {state_dir.relative_to(REPO)}")
    try:
        return client.up(
            state_dir,
            *("--port-base", "auto", "--partitions", str(PARTITIONS)),
            timeout=UP_TIMEOUT_SECONDS,
            env=env,
            capture_stderr=False,  # its progress lines show as the benchmark's
        )
    except client.StackError as error:
        raise BenchError(str(error)) from None


def down(state_dir: Path) -> None:
    """``ops/devstack down`` for the benchmark's folder (a no-op when nothing runs there)."""
    try:
        client.run_devstack("down", state_dir, capture_stderr=False)
    except client.StackError as error:
        say(str(error))


def broker_pids(state_dir: Path) -> list[int]:
    """The Kafka brokers' process ids, from the pid files ``ops/devstack`` keeps."""
    return [int(path.read_text()) for path in sorted(state_dir.glob("kafka-*/pid"))]


class Kafka:
    """Topics, consumer-group offsets and memberships, through librdkafka."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.cluster = client.Kafka(bootstrap_servers)

    def config(self, **extra: Any) -> dict[str, Any]:
        return self.cluster.config(**extra)

    def create_topics(self, names: Sequence[str]) -> None:
        """Create topics of :data:`PARTITIONS` partitions and wait until each has a leader."""
        try:
            self.cluster.create_topics(names, PARTITIONS, timeout=ADMIN_TIMEOUT_SECONDS)
        except client.StackError as error:
            raise BenchError(str(error)) from None

    def delete_topics(self, names: Sequence[str]) -> None:
        for name, error in self.cluster.delete_topics(names, ADMIN_TIMEOUT_SECONDS).items():
            say(f"deleting topic {name} failed: {error}")

    @contextmanager
    def committed_offsets(self, group: str, topic: str) -> Iterator[CommittedOffsets]:
        """A reader of ``group``'s committed offsets on ``topic`` (it does not join the group)."""
        consumer = self.cluster.offsets_reader(group)
        try:
            yield CommittedOffsets(consumer, topic)
        finally:
            consumer.close()

    def reader(self, topic: str, **extra: Any) -> Consumer:
        """A read_committed consumer of every partition of ``topic``, from its current end."""
        consumer = self.cluster.consumer(
            **{
                "group.id": f"bench-reader-{topic}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                **extra,
            }
        )
        ends = self.high_watermarks(topic, consumer)
        consumer.assign([TopicPartition(topic, p, end) for p, end in enumerate(ends)])
        return consumer

    def read_all(self, topic: str) -> Iterator[tuple[int, bytes, bytes]]:
        """``(partition, key, value)`` of every committed record of ``topic``, each partition
        in order, from its beginning to the end it has now; nothing may be writing to it."""
        consumer = self.cluster.consumer(
            **{
                "group.id": f"bench-reader-{topic}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            }
        )
        try:
            ends = self.high_watermarks(topic, consumer)
            left = {p for p, end in enumerate(ends) if end > 0}
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in left])
            last_read = time.monotonic()
            while left:
                if time.monotonic() - last_read > ADMIN_TIMEOUT_SECONDS:
                    raise BenchError(
                        f"reading {topic}: partitions {sorted(left)} not read to their end"
                        f" after {ADMIN_TIMEOUT_SECONDS:.0f}s without a record"
                    )
                for message in consumer.consume(READ_BATCH, 0.5):
                    last_read = time.monotonic()
                    error = message.error()
                    if error is None:
                        yield message.partition() or 0, message.key() or b"", message.value() or b""
                    elif error.code() == KafkaError._PARTITION_EOF:
                        left.discard(message.partition() or 0)
                    else:
                        raise BenchError(f"reading {topic}: {error}")
        finally:
            consumer.close()

    def high_watermarks(self, topic: str, consumer: Consumer | None = None) -> list[int]:
        """The end offset of each partition of ``topic``, asked of the broker now."""
        reader = consumer or self.cluster.consumer(**{"group.id": "bench-watermarks"})
        try:
            ends = client.high_watermarks(
                reader, client.partitions_of(topic, PARTITIONS), ADMIN_TIMEOUT_SECONDS
            )
            return [ends[(topic, p)] for p in range(PARTITIONS)]
        finally:
            if consumer is None:
                reader.close()


class CommittedOffsets:
    def __init__(self, consumer: Consumer, topic: str) -> None:
        self.consumer = consumer
        self.partitions = client.partitions_of(topic, PARTITIONS)
        self.last_error = ""

    def total(self) -> int | None:
        """The sum of the committed offsets over the topic's partitions (0 where none), or
        None when the group coordinator cannot tell right now (it moves, it loads)."""
        try:
            found = client.committed_offsets(self.consumer, self.partitions, ADMIN_TIMEOUT_SECONDS)
        except KafkaException as error:
            self.last_error = str(error)
            return None
        return sum(found.values())


class Redis:
    """The Redis counters the benchmark reads: commands run, memory, CPU."""

    def __init__(self, url: str) -> None:
        self.client = client.redis_client(url)

    def reset(self) -> None:
        """Empty the data set and zero the command counters."""
        self.client.flushall()
        self.client.config_resetstat()

    def reset_counters(self) -> None:
        self.client.config_resetstat()

    def command_calls(self) -> dict[str, int]:
        """Calls per command since the last reset (commands run by scripts included), without
        the benchmark's own."""
        stats = client.redis_info(self.client, "commandstats")
        calls = {
            name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()
        }
        return {name: n for name, n in sorted(calls.items()) if name not in OWN_REDIS_COMMANDS}

    def used_memory(self) -> int:
        return int(client.redis_info(self.client, "memory")["used_memory"])

    def cpu_seconds(self) -> float:
        info = client.redis_info(self.client, "cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def describe(self) -> dict[str, str]:
        appendfsync = self.client.config_get("appendfsync").get("appendfsync", "")
        return {
            "redis": str(client.redis_info(self.client, "server")["redis_version"]),
            "redis_appendfsync": str(appendfsync),
        }
