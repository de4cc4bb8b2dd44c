"""A running local stack: `ops/devstack` as a command, Kafka through confluent-kafka, Redis
through redis-py.

One client for everything that talks to the stack: ops/devstack's readiness probes
(:mod:`stacklib.probes`), the test fixtures (tests/stack.py, tests/progress.py), the benchmark
(bench/stack.py) and ops/demo. Failures raise :class:`StackError` with a message; each caller
turns it into its own kind of failure (``pytest.fail``, ``BenchError``, ``DevstackError``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from redis.cluster import RedisCluster

from stacklib.common import HOST, REPO

if TYPE_CHECKING:  # not exported by confluent_kafka.admin for type checkers
    from confluent_kafka.admin._metadata import ClusterMetadata

DEVSTACK = REPO / "ops" / "devstack"
DEFAULT_TIMEOUT = 30.0

Config = dict[str, Any]  # librdkafka settings; some take callables (error_cb, logger)
Offsets = dict[tuple[str, int], int]  # (topic, partition) -> offset


class StackError(Exception):
    """The stack did not do what was asked; the message says what and why."""


class StackTimeout(StackError):
    """An ops/devstack command ran past its timeout."""


# --------------------------------------------------------------------------- ops/devstack


def devstack_argv(command: str, state_dir: Path, *args: str) -> list[str]:
    """The command line of an ops/devstack subcommand on the stack in `state_dir`."""
    return [sys.executable, str(DEVSTACK), command, "--dir", str(state_dir), *args]


def parse_settings(stdout: str) -> dict[str, str]:
    """The KEY=value lines that `ops/devstack up` prints."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_devstack(
    command: str,
    state_dir: Path,
    *args: str,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    capture_stderr: bool = True,
    tail_lines: int = 60,
) -> str:
    """Run an ops/devstack subcommand and return its stdout.

    Its stderr (progress and errors) is captured and its tail put into the error message, or,
    with ``capture_stderr=False``, left to show on this process' stderr."""
    argv = devstack_argv(command, state_dir, *args)
    shown = " ".join(argv)
    try:
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if capture_stderr else None,
            text=True,
            env=None if env is None else dict(env),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        detail = f":\n{_tail(output, tail_lines)}" if capture_stderr else ""
        raise StackTimeout(f"`{shown}` took over {timeout:.0f}s{detail}") from None
    if done.returncode != 0:
        detail = f":\n{_tail(done.stderr, tail_lines)}" if capture_stderr else ""
        raise StackError(f"`{shown}` failed (exit {done.returncode}){detail}")
    return done.stdout


def up(
    state_dir: Path,
    *options: str,
    timeout: float | None,
    env: Mapping[str, str] | None = None,
    capture_stderr: bool = True,
) -> dict[str, str]:
    """`ops/devstack up` (a no-op but for the settings when the stack runs): its settings.

    An `up` that runs past `timeout` is taken down again before the error is raised."""
    try:
        stdout = run_devstack(
            "up",
            state_dir,
            *options,
            timeout=timeout,
            env=env,
            capture_stderr=capture_stderr,
            tail_lines=120,
        )
    except StackTimeout:
        subprocess.run(devstack_argv("down", state_dir), check=False)
        raise
    return parse_settings(stdout)


# --------------------------------------------------------------------------- Kafka


class Kafka:
    """One Kafka cluster: its client configuration, admin calls, topics and consumers.

    Every call makes its own AdminClient: fresh metadata, whatever happened to the brokers."""

    def __init__(self, bootstrap_servers: str, **extra: Any) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.extra: Config = dict(extra)

    def config(self, **extra: Any) -> Config:
        """Client configuration: the bootstrap servers, this client's extras, then `extra`."""
        config: Config = {"bootstrap.servers": self.bootstrap_servers, **self.extra}
        config.update(extra)
        return config

    def admin(self) -> AdminClient:
        return AdminClient(self.config())

    def consumer(self, **extra: Any) -> Consumer:
        return Consumer(self.config(**extra))

    def offsets_reader(self, group: str, **extra: Any) -> Consumer:
        """A consumer that reads `group`'s committed offsets without joining the group.

        read_uncommitted: an OffsetFetch for read_committed would wait for pending
        transactional offsets (e.g. of a killed process) instead of answering."""
        settings: Config = {
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
        }
        return self.consumer(**{**settings, **extra})

    def metadata(self, timeout: float = DEFAULT_TIMEOUT) -> ClusterMetadata:
        """Brokers and every topic, as a broker sees them now."""
        return self.admin().list_topics(timeout=timeout)

    def create_topics(
        self,
        names: Sequence[str],
        partitions: int,
        *,
        replication_factor: int = -1,
        timeout: float = DEFAULT_TIMEOUT,
        exist_ok: bool = False,
        wait: bool = True,
    ) -> None:
        """Create topics (replication factor -1: the broker's default) and, with `wait`, wait
        until every partition has a leader."""
        admin = self.admin()  # referenced until the futures resolve: its end fails them
        futures = admin.create_topics(
            [NewTopic(n, partitions, replication_factor) for n in names],
            operation_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result(timeout)
            except KafkaException as exc:
                if exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                raise StackError(f"creating topic {name} failed: {exc}") from exc
        if not wait:
            return
        counts = {name: len(leaders) for name, leaders in self.leaders(names, timeout).items()}
        if set(counts.values()) != {partitions}:
            raise StackError(f"topics have other partition counts than {partitions}: {counts}")

    def leaders(
        self, topics: Sequence[str], timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, dict[int, int]]:
        """topic -> partition -> leader broker, once every partition of the topics has a leader.

        Brokers learn about new topics one after the other, so this polls until they do."""
        admin = self.admin()
        deadline = time.monotonic() + timeout
        while True:
            meta = admin.list_topics(timeout=timeout)
            found = {
                t: {p.id: p.leader for p in meta.topics[t].partitions.values()}
                for t in topics
                if t in meta.topics and meta.topics[t].error is None
            }
            waiting = [t for t in topics if not found.get(t) or min(found[t].values()) < 0]
            if not waiting:
                return found
            if time.monotonic() > deadline:
                raise StackError(f"topics {waiting} do not exist or lack leaders after {timeout}s")
            time.sleep(0.1)

    def delete_topics(
        self, names: Sequence[str], timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, str]:
        """Delete topics; the error of each one that could not be deleted."""
        admin = self.admin()  # referenced until the futures resolve: its end fails them
        failed = {}
        for name, future in admin.delete_topics(list(names)).items():
            try:
                future.result(timeout)
            except KafkaException as exc:
                failed[name] = str(exc)
        return failed


def high_watermarks(
    consumer: Consumer, partitions: Iterable[TopicPartition], timeout: float = 10.0
) -> Offsets:
    """The end offset of each partition, asked of its leader now (not cached)."""
    return {
        (tp.topic, tp.partition): int(consumer.get_watermark_offsets(tp, timeout, cached=False)[1])
        for tp in partitions
    }


def committed_offsets(
    consumer: Consumer, partitions: Iterable[TopicPartition], timeout: float = 20.0
) -> Offsets:
    """The committed offset of each partition for the consumer's group (0 where none).

    Raises KafkaException when the group coordinator cannot tell right now (it moves, it
    loads)."""
    found = consumer.committed(list(partitions), timeout=timeout)
    return {(tp.topic, tp.partition): max(int(tp.offset), 0) for tp in found}


def partitions_of(topic: str, count: int) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(count)]


# --------------------------------------------------------------------------- Redis

RedisClient = redis.Redis | RedisCluster


@overload
def redis_client(url: str, *, cluster: Literal[False] = False, **options: Any) -> redis.Redis: ...
@overload
def redis_client(url: str, *, cluster: bool, **options: Any) -> RedisClient: ...
def redis_client(url: str, *, cluster: bool = False, **options: Any) -> RedisClient:
    """A client of the stack's Redis, or of its Redis Cluster."""
    if cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def redis_node(port: int, timeout: float = 2.0) -> redis.Redis:
    """A client of one Redis node on loopback (a cluster node is asked about itself only)."""
    return redis.Redis(host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)


def redis_info(client: redis.Redis, section: str) -> dict[str, Any]:
    """One section of INFO, e.g. ``commandstats``, ``memory``, ``cpu``, ``server``."""
    info: dict[str, Any] = client.info(section)
    return info


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO of one node, e.g. ``cluster_state``, ``cluster_known_nodes``."""
    info = client.cluster("INFO")
    return {str(k): str(v) for k, v in info.items()}
