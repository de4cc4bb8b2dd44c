"""The benchmark's own local stack (``ops/devstack``), and the Kafka and Redis calls that the
measurements make on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import (
    Consumer,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from bench.common import REPO, BenchError, say

DEVSTACK = REPO / "ops" / "devstack"
PARTITIONS = 12
# What docs/devstack.md suggests for a benchmark: the full JIT and a bigger heap than the
# quick-starting test default.
KAFKA_JVM_OPTS = "-Xms1g -Xmx2g -XX:+UseG1GC"
UP_TIMEOUT_SECONDS = 900.0
ADMIN_TIMEOUT_SECONDS = 30.0
# Commands the benchmark itself sends to Redis; they are not the system's.
OWN_REDIS_COMMANDS = frozenset({"info", "config|resetstat", "config|get", "flushall"})


def kafka_jvm_opts() -> str:
    return os.environ.get("ENRICHER_DEVSTACK_KAFKA_JVM_OPTS", KAFKA_JVM_OPTS)


def up(state_dir: Path) -> dict[str, str]:
    """``ops/devstack up`` for the benchmark's folder; its ``ENRICHER_*`` settings."""
    argv = [sys.executable, str(DEVSTACK), "up", "--dir", str(state_dir)]
    argv += ["--port-base", "auto", "--partitions", str(PARTITIONS)]
    env = {**os.environ, "ENRICHER_DEVSTACK_KAFKA_JVM_OPTS": kafka_jvm_opts()}
    say(f"starting Kafka and Redis in {state_dir.relative_to(REPO)}")
    try:
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            timeout=UP_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"`{' '.join(argv)}` took over {UP_TIMEOUT_SECONDS:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed with exit code {done.returncode}")
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def down(state_dir: Path) -> None:
    """``ops/devstack down`` for the benchmark's folder (a no-op when nothing runs there)."""
    argv = [sys.executable, str(DEVSTACK), "down", "--dir", str(state_dir)]
    done = subprocess.run(argv, check=False)
    if done.returncode != 0:
        say(f"`{' '.join(argv)}` failed with exit code {done.returncode}")


def broker_pids(state_dir: Path) -> list[int]:
    """The Kafka brokers' process ids, from the pid files ``ops/devstack`` keeps."""
    return [int(path.read_text()) for path in sorted(state_dir.glob("kafka-*/pid"))]


class Kafka:
    """Topics, consumer-group offsets and memberships, through librdkafka."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.admin = AdminClient({"bootstrap.servers": bootstrap_servers})

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap_servers, **extra}

    def create_topics(self, names: Sequence[str]) -> None:
        """Create topics of :data:`PARTITIONS` partitions and wait until each has a leader."""
        futures = self.admin.create_topics(
            [NewTopic(name, num_partitions=PARTITIONS) for name in names],
            operation_timeout=ADMIN_TIMEOUT_SECONDS,
        )
        for name, future in futures.items():
            try:
                future.result(ADMIN_TIMEOUT_SECONDS)
            except KafkaException as error:
                raise BenchError(f"creating topic {name}: {error}") from None
        deadline = time.monotonic() + ADMIN_TIMEOUT_SECONDS
        while not all(self._led(name) for name in names):
            if time.monotonic() > deadline:
                raise BenchError(f"topics {list(names)} have no leaders after 30s")
            time.sleep(0.1)

    def _led(self, name: str) -> bool:
        topic = self.admin.list_topics(name, timeout=ADMIN_TIMEOUT_SECONDS).topics.get(name)
        if topic is None or topic.error is not None:
            return False
        leaders = [p.leader for p in topic.partitions.values()]
        return len(leaders) == PARTITIONS and min(leaders) >= 0

    def delete_topics(self, names: Sequence[str]) -> None:
        for name, future in self.admin.delete_topics(list(names)).items():
            try:
                future.result(ADMIN_TIMEOUT_SECONDS)
            except KafkaException as error:
                say(f"deleting topic {name} failed: {error}")

    @contextmanager
    def committed_offsets(self, group: str, topic: str) -> Iterator[CommittedOffsets]:
        """A reader of ``group``'s committed offsets on ``topic`` (it does not join the group)."""
        consumer = Consumer(
            self.config(
                **{
                    "group.id": group,
                    "enable.auto.commit": False,
                    # read_committed would make the broker answer UNSTABLE_OFFSET_COMMIT while
                    # a transaction holds offsets; committed offsets are what is wanted here.
                    "isolation.level": "read_uncommitted",
                }
            )
        )
        try:
            yield CommittedOffsets(consumer, topic)
        finally:
            consumer.close()

    def reader(self, topic: str, **extra: Any) -> Consumer:
        """A read_committed consumer of every partition of ``topic``, from its current end."""
        consumer = Consumer(
            self.config(
                **{
                    "group.id": f"bench-reader-{topic}",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    **extra,
                }
            )
        )
        ends = self.high_watermarks(topic, consumer)
        consumer.assign([TopicPartition(topic, p, end) for p, end in enumerate(ends)])
        return consumer

    def high_watermarks(self, topic: str, consumer: Consumer | None = None) -> list[int]:
        """The end offset of each partition of ``topic``, asked of the broker now."""
        client = consumer or Consumer(self.config(**{"group.id": "bench-watermarks"}))
        try:
            return [
                int(client.get_watermark_offsets(tp, ADMIN_TIMEOUT_SECONDS, cached=False)[1])
                for tp in (TopicPartition(topic, p) for p in range(PARTITIONS))
            ]
        finally:
            if consumer is None:
                client.close()


class CommittedOffsets:
    def __init__(self, consumer: Consumer, topic: str) -> None:
        self.consumer = consumer
        self.partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.last_error = ""

    def total(self) -> int | None:
        """The sum of the committed offsets over the topic's partitions (0 where none), or
        None when the group coordinator cannot tell right now (it moves, it loads)."""
        try:
            found = self.consumer.committed(self.partitions, timeout=ADMIN_TIMEOUT_SECONDS)
        except KafkaException as error:
            self.last_error = str(error)
            return None
        return sum(max(int(tp.offset), 0) for tp in found)


class Redis:
    """The Redis counters the benchmark reads: commands run, memory, CPU."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def reset(self) -> None:
        """Empty the data set and zero the command counters."""
        self.client.flushall()
        self.client.config_resetstat()

    def reset_counters(self) -> None:
        self.client.config_resetstat()

    def command_calls(self) -> dict[str, int]:
        """Calls per command since the last reset (commands run by scripts included), without
        the benchmark's own."""
        stats = self.client.info("commandstats")
        calls = {
            name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()
        }
        return {name: n for name, n in sorted(calls.items()) if name not in OWN_REDIS_COMMANDS}

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def cpu_seconds(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def describe(self) -> dict[str, str]:
        appendfsync = self.client.config_get("appendfsync").get("appendfsync", "")
        return {
            "redis": str(self.client.info("server")["redis_version"]),
            "redis_appendfsync": str(appendfsync),
        }
