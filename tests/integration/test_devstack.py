"""The local stack (ops/devstack) gives the enricher real Kafka and Redis to test against."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import MovedError
from stack import DEVSTACK, Stack, port_base

pytestmark = pytest.mark.integration

ENRICHER_TOPICS = ("enricher.raw", "enricher.enriched", "enricher.dlq", "enricher.sessions")


def test_up_serves_kafka_redis_and_the_enricher_topics(stack: Stack) -> None:
    assert stack.topics.all == ENRICHER_TOPICS
    assert not stack.redis_cluster
    meta = stack.admin().list_topics(timeout=10)
    for topic in ENRICHER_TOPICS:
        assert len(meta.topics[topic].partitions) == 12, topic
    assert stack.redis().ping()
    stack.devstack("status")


def test_transactional_round_trip_reads_only_committed_records(stack: Stack) -> None:
    topics = stack.new_topics("txn", partitions=3)
    first = [(f"device-{i % 4}", f"committed-{i}") for i in range(10)]
    assert stack.produce(topics.input, first) == 10

    aborted = stack.producer(**{"transactional.id": f"{topics.input}-aborted"})
    aborted.init_transactions(30)
    aborted.begin_transaction()
    for i in range(5):
        aborted.produce(topics.input, key=b"device-0", value=f"aborted-{i}".encode())
    aborted.flush(30)
    aborted.abort_transaction(30)

    assert stack.produce(topics.input, [("device-1", "committed-after-abort")]) == 1

    records = stack.read_committed([topics.input])
    values = sorted((r.value or b"").decode() for r in records)
    assert values == sorted([v for _, v in first] + ["committed-after-abort"])

    seen = stack.consume([topics.input], until=lambda rs: len(rs) >= 11)
    assert not [r for r in seen if (r.value or b"").startswith(b"aborted")]


def test_redis_round_trip_with_append_only_file(stack: Stack) -> None:
    client = stack.redis()
    assert isinstance(client, redis.Redis)
    key = stack.redis_prefix() + "session"
    client.set(key, b"state", ex=60)
    assert client.get(key) == b"state"
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}


def test_redis_cluster_takes_hash_tagged_multi_key_operations(cluster_stack: Stack) -> None:
    client = cluster_stack.redis()
    assert isinstance(client, RedisCluster)
    node = redis.Redis.from_url(cluster_stack.redis_url)
    info = node.cluster("INFO")
    assert (info["cluster_state"], info["cluster_size"]) == ("ok", "3")

    tag = "{" + cluster_stack.redis_prefix() + "device-1}"
    keys = [f"{tag}:session", f"{tag}:last-seen", f"{tag}:count"]
    assert client.mset({keys[0]: "s1", keys[1]: "t1"})
    assert client.mget(keys[:2]) == [b"s1", b"t1"]
    swap = (
        "redis.call('SET', KEYS[2], redis.call('GET', KEYS[1])); return redis.call('INCR', KEYS[3])"
    )
    assert client.eval(swap, 3, *keys) == 1
    assert client.get(keys[1]) == b"s1"

    # Keys without a shared tag spread over the masters: one node redirects some of them.
    with pytest.raises(MovedError):
        for i in range(20):
            node.get(f"device-{i}")


def test_three_broker_cluster_survives_losing_a_broker(cluster_stack: Stack) -> None:
    topics = cluster_stack.new_topics("chaos", partitions=3)
    victim = cluster_stack.leader_of(topics.input, 0)
    cluster_stack.kill_broker(victim)
    try:
        records = [(f"device-{i}", f"event-{i}") for i in range(50)]
        assert cluster_stack.produce(topics.input, records, acks="all") == 50
        assert len(cluster_stack.read_committed([topics.input])) == 50
        assert cluster_stack.leader_of(topics.input, 0) != victim
    finally:
        cluster_stack.start_broker(victim)


def _listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def _devstack(state_dir: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``ops/devstack COMMAND --dir STATE_DIR ARGS...``, its output captured."""
    argv = [sys.executable, str(DEVSTACK), command, "--dir", str(state_dir), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def test_up_is_idempotent_and_down_leaves_no_process_or_port(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    devstack = functools.partial(_devstack, state_dir)

    up = devstack("up", "--port-base", port_base(-1000), "--partitions", "1")
    assert up.returncode == 0, up.stderr
    settings = dict(line.split("=", 1) for line in up.stdout.splitlines())
    assert all(key.startswith("ENRICHER_") for key in settings)
    again = devstack("up", "--port-base", port_base(-1000), "--partitions", "1")
    assert (again.returncode, again.stdout) == (0, up.stdout), again.stderr
    assert devstack("status").returncode == 0

    pids = [int(p.read_text()) for p in state_dir.glob("*/pid")]
    kafka_port = int(settings["ENRICHER_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    redis_port = int(settings["ENRICHER_REDIS_URL"].rsplit(":", 1)[1])
    ports = {kafka_port, kafka_port + 1, redis_port}
    assert len(pids) == 2
    assert ports <= _listening_ports()

    down = devstack("down")
    assert down.returncode == 0, down.stderr
    assert [p for p in pids if _alive(p)] == []
    assert ports & _listening_ports() == set()
    assert list(state_dir.glob("*/data")) == []
    assert list(state_dir.glob("*/pid")) == []
    assert devstack("down").returncode == 0
    assert devstack("status").returncode == 3


def test_up_lays_out_anew_a_stack_whose_kafka_storage_was_never_formatted(
    tmp_path: Path,
) -> None:
    """A start that failed before Kafka's storage was formatted leaves the stack's state behind;
    the next ``up`` must not start Kafka on unformatted storage forever after."""
    state_dir = tmp_path / "stack"
    devstack = functools.partial(_devstack, state_dir)

    up = devstack("up", "--port-base", port_base(-1100), "--partitions", "1")
    assert up.returncode == 0, up.stderr
    for pid_file in state_dir.glob("*/pid"):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    (state_dir / "kafka-1" / "data" / "meta.properties").unlink()
    try:
        again = devstack("up", "--port-base", port_base(-1100), "--partitions", "1")
        assert again.returncode == 0, again.stderr
        assert "never formatted" in again.stderr
        assert (state_dir / "kafka-1" / "data" / "meta.properties").exists()
    finally:
        assert devstack("down").returncode == 0


def test_install_and_the_commands_without_a_stack_need_only_the_standard_library(
    tmp_path: Path,
) -> None:
    """`install` runs on a fresh machine, before the project's packages: ops/devstack imports
    confluent-kafka and redis-py only in the commands that talk to a running stack, and those
    say what is missing. (``python -S``: no site-packages.)"""

    def devstack(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-S", str(DEVSTACK), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)

    assert devstack("install").returncode == 0
    assert devstack("status", "--dir", str(tmp_path)).stdout == f"no stack in {tmp_path}\n"
    assert devstack("down", "--dir", str(tmp_path)).returncode == 0
    up = devstack("up", "--dir", str(tmp_path))
    assert up.returncode == 1
    assert "confluent_kafka is missing" in up.stderr
    assert not (tmp_path / "stack.json").exists()
