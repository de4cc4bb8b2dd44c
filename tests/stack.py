"""Pytest fixtures that run the local stack (ops/devstack) for integration tests.

- `stack`: one Kafka broker and one Redis, started once per pytest run.
- `cluster_stack`: three Kafka brokers (replication factor 3, min.insync.replicas 2) and a
  three-master Redis Cluster, started only when a test asks for it.

Both are taken down at the end of the run, unless ENRICHER_TEST_KEEP_STACK=1: then they stay up and
the next run reuses them (`ops/devstack up` on a running stack only re-prints its settings).
They live in .devstack/test-plain and .devstack/test-cluster, on free ports that ops/devstack picks
(`--port-base auto`), or on ENRICHER_TEST_PORT_BASE and that plus 1000 when it is set. A test that
needs a service it cannot get fails, with the service's log tail; it never skips.

Running ops/devstack and the Kafka and Redis calls go through ops/stacklib/client.py, the stack
client that the benchmark (bench/stack.py) uses too; this module turns its errors into test
failures.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from redis.cluster import RedisCluster

from stacklib import client
from stacklib.client import StackError
from stacklib.layout import log_tail

REPO = Path(__file__).resolve().parent.parent
DEVSTACK = client.DEVSTACK
STATE_ROOT = REPO / ".devstack"
PORT_BASE = os.environ.get("ENRICHER_TEST_PORT_BASE")
KEEP_STACK = os.environ.get("ENRICHER_TEST_KEEP_STACK") == "1"
# `up` includes the first-time installs (apt, Maven, npm) on a fresh machine.
UP_TIMEOUT_SECONDS = 600.0

Config = dict[str, str | int | float | bool]
Payload = bytes | str | None


@dataclass(frozen=True)
class TopicSet:
    """The four topics the enricher works with."""

    input: str
    output: str
    dlq: str
    sessions: str

    @property
    def all(self) -> tuple[str, str, str, str]:
        return (self.input, self.output, self.dlq, self.sessions)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int


def _record(message: Message) -> Record:
    headers = message.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    return Record(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=_as_bytes(message.key()),
        value=_as_bytes(message.value()),
        headers=tuple((k, _as_bytes(v)) for k, v in pairs),
        timestamp_ms=message.timestamp()[1],
    )


def _as_bytes(value: object) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Stack:
    """A running stack: connection settings plus helpers for Kafka, Redis and chaos."""

    def __init__(self, state_dir: Path, settings: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.settings = settings
        self.bootstrap_servers = settings["ENRICHER_BOOTSTRAP_SERVERS"]
        self.kafka = client.Kafka(self.bootstrap_servers)
        self.redis_url = settings["ENRICHER_REDIS_URL"]
        self.redis_cluster = settings["ENRICHER_REDIS_CLUSTER"] == "true"
        self.topics = TopicSet(
            input=settings["ENRICHER_INPUT_TOPIC"],
            output=settings["ENRICHER_OUTPUT_TOPIC"],
            dlq=settings["ENRICHER_DLQ_TOPIC"],
            sessions=settings["ENRICHER_SESSION_EVENTS_TOPIC"],
        )

    def env(self, topics: TopicSet | None = None) -> dict[str, str]:
        """The ENRICHER_* settings for a process under test, optionally with other topics."""
        env = dict(self.settings)
        if topics is not None:
            env.update(
                ENRICHER_INPUT_TOPIC=topics.input,
                ENRICHER_OUTPUT_TOPIC=topics.output,
                ENRICHER_DLQ_TOPIC=topics.dlq,
                ENRICHER_SESSION_EVENTS_TOPIC=topics.sessions,
            )
        return env

    # ------------------------------------------------------------------ diagnostics and chaos

    def log_tail(self, service: str, lines: int = 40) -> str:
        return log_tail(self.state_dir / service, lines)

    def fail(self, message: str, services: Sequence[str]) -> NoReturn:
        tails = "\n".join(self.log_tail(s) for s in services)
        pytest.fail(f"{message}\n{tails}", pytrace=False)

    def kafka_services(self) -> list[str]:
        return [f"kafka-{i + 1}" for i in range(len(self.bootstrap_servers.split(",")))]

    def devstack(self, *args: str, timeout: float = 180.0) -> str:
        """Run an ops/devstack subcommand against this stack; its stdout is returned."""
        try:
            return client.run_devstack(args[0], self.state_dir, *args[1:], timeout=timeout)
        except StackError as exc:
            self.fail(str(exc), self.kafka_services())

    def kill_broker(self, broker: int, signal: str = "KILL") -> None:
        self.devstack("kill-broker", str(broker), "--signal", signal)

    def start_broker(self, broker: int) -> None:
        """Restart a killed broker and wait until every partition is fully in sync again."""
        self.devstack("start-broker", str(broker))

    def redis_snapshot(self, path: Path) -> None:
        """Save Redis's data set now (BGSAVE) to ``path``."""
        self.devstack("redis-snapshot", str(path))

    def kill_redis(self, signal: str = "KILL") -> None:
        self.devstack("kill-redis", "--signal", signal)

    def redis_aof_size(self) -> int:
        """The size of the newest part of Redis's append-only file."""
        return int(self.devstack("redis-aof-size"))

    def start_redis(self, snapshot: Path | None = None, truncate_aof: int | None = None) -> None:
        """Restart the killed Redis from what it kept, from an older ``snapshot``, or from
        its append-only file cut to ``truncate_aof`` bytes (the writes after it lost)."""
        extra = [] if snapshot is None else ["--from-snapshot", str(snapshot)]
        if truncate_aof is not None:
            extra += ["--truncate-aof", str(truncate_aof)]
        self.devstack("start-redis", *extra)

    def leader_of(self, topic: str, partition: int = 0) -> int:
        return self.partitions([topic])[topic][partition]

    # ------------------------------------------------------------------ Kafka

    def kafka_config(self, **extra: str | int | float | bool) -> Config:
        return self.kafka.config(**extra)

    def admin(self) -> AdminClient:
        return self.kafka.admin()

    def producer(self, **extra: str | int | float | bool) -> Producer:
        return Producer(self.kafka_config(**{"enable.idempotence": True, "acks": "all", **extra}))

    def consumer(self, **extra: str | int | float | bool) -> Consumer:
        defaults: Config = {
            "group.id": _unique("test"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
        return Consumer(self.kafka_config(**{**defaults, **extra}))

    def create_topics(self, names: Sequence[str], partitions: int, timeout: float = 30.0) -> None:
        """Create topics (broker defaults for replication) and wait until all have leaders."""
        try:
            self.kafka.create_topics(names, partitions, timeout=timeout)
        except StackError as exc:
            self.fail(str(exc), self.kafka_services())

    def partitions(self, topics: Sequence[str], timeout: float = 30.0) -> dict[str, dict[int, int]]:
        """topic -> partition -> leader broker, once every partition of the topics has a leader.

        Brokers learn about new topics one after the other, so this polls until they do."""
        try:
            return self.kafka.leaders(topics, timeout)
        except StackError as exc:
            self.fail(str(exc), self.kafka_services())

    def new_topics(self, prefix: str = "test", partitions: int = 3) -> TopicSet:
        """Fresh, uniquely named input/output/dlq/sessions topics for one test."""
        base = _unique(prefix)
        topics = TopicSet(f"{base}.raw", f"{base}.enriched", f"{base}.dlq", f"{base}.sessions")
        self.create_topics(topics.all, partitions)
        return topics

    def produce(
        self,
        topic: str,
        records: Iterable[tuple[Payload, Payload]],
        *,
        transactional: bool = True,
        timeout: float = 60.0,
        **extra: str | int | float | bool,
    ) -> int:
        """Produce (key, value) pairs, in one committed transaction unless told otherwise.

        Returns how many records were delivered; any delivery error fails the test."""
        if transactional:
            extra.setdefault("transactional.id", _unique("test-txn"))
        producer = self.producer(**extra)
        errors: list[str] = []
        delivered = 0

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            nonlocal delivered
            if error is None:
                delivered += 1
            else:
                errors.append(str(error))

        try:
            if transactional:
                producer.init_transactions(timeout)
                producer.begin_transaction()
            for key, value in records:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                producer.poll(0)
            if transactional:
                producer.commit_transaction(timeout)
            remaining = producer.flush(timeout)
        except KafkaException as exc:
            self.fail(f"producing to {topic} failed: {exc}", self.kafka_services())
        if errors or remaining:
            self.fail(
                f"producing to {topic}: {len(errors)} delivery errors {errors[:5]}, "
                f"{remaining} records not delivered within {timeout}s",
                self.kafka_services(),
            )
        return delivered

    def _assign_all(self, consumer: Consumer, topics: Sequence[str]) -> list[TopicPartition]:
        assignment = [
            TopicPartition(t, p, OFFSET_BEGINNING)
            for t, leaders in self.partitions(topics).items()
            for p in leaders
        ]
        consumer.assign(assignment)
        return assignment

    def _poll(self, consumer: Consumer, records: list[Record]) -> None:
        message = consumer.poll(0.2)
        if message is None:
            return
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                self.fail(f"consumer error: {error}", self.kafka_services())
            return
        records.append(_record(message))

    def consume(
        self,
        topics: Sequence[str],
        until: Callable[[Sequence[Record]], bool],
        *,
        timeout: float = 60.0,
        **extra: str | int | float | bool,
    ) -> list[Record]:
        """Read the topics from the beginning (read_committed) until `until(records)` holds.

        Fails the test, listing what was read, if that does not happen within `timeout`."""
        consumer = self.consumer(**extra)
        records: list[Record] = []
        try:
            self._assign_all(consumer, topics)
            deadline = time.monotonic() + timeout
            while not until(records):
                if time.monotonic() > deadline:
                    shown = [(r.topic, r.partition, r.offset, r.key, r.value) for r in records[:10]]
                    self.fail(
                        f"condition not met within {timeout}s reading {list(topics)}: "
                        f"{len(records)} records, first ones {shown}",
                        self.kafka_services(),
                    )
                self._poll(consumer, records)
        finally:
            consumer.close()
        return records

    def read_committed(self, topics: Sequence[str], *, timeout: float = 60.0) -> list[Record]:
        """Every record committed to the topics, for exactly-once assertions.

        Reads once no transaction is open on any of their partitions (see
        :meth:`settled_ends`), so that a transaction whose offsets are already committed
        but whose markers are still being written is read whole, not cut off."""
        consumer = self.consumer()
        records: list[Record] = []
        try:
            assignment = self._assign_all(consumer, topics)
            deadline = time.monotonic() + timeout
            ends = self.settled_ends(consumer, assignment, deadline)
            while True:
                positions = consumer.position([TopicPartition(t, p) for t, p in ends])
                behind = [
                    (tp.topic, tp.partition)
                    for tp in positions
                    if ends[(tp.topic, tp.partition)] > max(tp.offset, 0)
                ]
                if not behind:
                    return records
                if time.monotonic() > deadline:
                    self.fail(
                        f"partitions {behind[:10]} not read up to their end within {timeout}s",
                        self.kafka_services(),
                    )
                self._poll(consumer, records)
        finally:
            consumer.close()

    def settled_ends(
        self, consumer: Consumer, partitions: Sequence[TopicPartition], deadline: float
    ) -> client.Offsets:
        """Each partition's end, once its last stable offset (what the read_committed
        ``consumer`` may read) has reached its high watermark: every transaction written
        to it is committed or aborted.

        A transaction commits its consumer offsets and its output partitions through
        separate markers, so the input can read as done a moment before its output is
        readable. A transaction left open by a killed producer is aborted by the broker
        after the producer's transaction timeout. Fails the test at ``deadline``."""
        written_reader = self.consumer(**{"isolation.level": "read_uncommitted"})
        try:
            while True:
                try:
                    stable = client.high_watermarks(consumer, partitions)
                    written = client.high_watermarks(written_reader, partitions)
                except KafkaException as error:  # leaders moving after a broker came back
                    why = f"offsets not readable: {error}"
                else:
                    open_ = sorted(tp for tp, end in written.items() if stable[tp] != end)
                    if not open_:
                        return stable
                    why = (
                        f"partitions {open_[:10]} still have an open transaction (last stable"
                        f" offsets {[stable[tp] for tp in open_[:10]]}, high watermarks"
                        f" {[written[tp] for tp in open_[:10]]})"
                    )
                if time.monotonic() > deadline:
                    self.fail(why, self.kafka_services())
                time.sleep(0.2)
        finally:
            written_reader.close()

    # ------------------------------------------------------------------ Redis

    def redis(self) -> redis.Redis | RedisCluster:
        return client.redis_client(self.redis_url, cluster=self.redis_cluster)

    def redis_prefix(self) -> str:
        """A key prefix no other test uses, e.g. `test-1a2b3c4d5e:`."""
        return _unique("test") + ":"


def port_base(offset: int) -> str:
    """`auto`, or ENRICHER_TEST_PORT_BASE plus `offset` when that is set."""
    return "auto" if PORT_BASE is None else str(int(PORT_BASE) + offset)


def _run_up(name: str, port_base: str, options: Sequence[str]) -> Stack:
    state_dir = STATE_ROOT / f"test-{name}"
    try:
        settings = client.up(
            state_dir, "--port-base", port_base, *options, timeout=UP_TIMEOUT_SECONDS
        )
    except StackError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Stack(state_dir, settings)


def _run_down(stack: Stack) -> None:
    if not KEEP_STACK:
        stack.devstack("down")


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """One Kafka broker and one Redis, shared by the whole run."""
    handle = _run_up("plain", port_base(0), [])
    yield handle
    _run_down(handle)


@pytest.fixture(scope="session")
def cluster_stack() -> Iterator[Stack]:
    """Three Kafka brokers and a three-master Redis Cluster, shared by the whole run."""
    handle = _run_up("cluster", port_base(1000), ["--brokers", "3", "--redis-cluster"])
    yield handle
    _run_down(handle)
