"""Readiness: waiting until Redis and Kafka answer, with redis-py and confluent-kafka's
AdminClient (through :mod:`stacklib.client`), and the Redis Cluster's creation.

Only the commands that need a running stack import this module: `ops/devstack install` works
without confluent-kafka and redis-py."""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from redis.exceptions import RedisError

from stacklib import client
from stacklib.common import DevstackError, log
from stacklib.install import redis_cli
from stacklib.layout import TOPICS, Service, Stack, log_tail
from stacklib.processes import running_pid

if TYPE_CHECKING:  # not exported by confluent_kafka.admin for type checkers
    from confluent_kafka.admin._metadata import ClusterMetadata

# The probes' own clients: quiet (librdkafka logs every refused connection while a broker
# starts) and quick to retry a broker that was not listening yet.
QUIET: client.Config = {
    "log_level": 0,
    "reconnect.backoff.ms": 100,
    "reconnect.backoff.max.ms": 500,
}
METADATA_TIMEOUT = 5.0
CREATE_TIMEOUT = 10.0
# What a check may raise while a service is not ready yet: the reason to keep waiting.
NOT_READY = (OSError, ValueError, KafkaException, RedisError, client.StackError)


def wait_for(what: str, check: Callable[[], str | None], deadline: float, service: Service) -> None:
    """Poll `check` (None = done, text = why not yet) until it passes or the deadline is reached."""
    reason = "not checked yet"
    while True:
        try:
            outcome = check()
        except NOT_READY as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        if outcome is None:
            return
        reason = outcome
        if time.monotonic() >= deadline:
            break
        if running_pid(service) is None:
            raise DevstackError(
                f"{service.name} exited while waiting for {what}\n{log_tail(service.home)}"
            )
        time.sleep(0.2)
    raise DevstackError(f"timed out waiting for {what}: {reason}\n{log_tail(service.home)}")


# --------------------------------------------------------------------------- Redis


def ping(node: Service) -> str | None:
    return None if client.redis_node(node.port).ping() else "PING failed"


def cluster_ok(node: Service, size: int) -> str | None:
    info = client.cluster_info(client.redis_node(node.port))
    if info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(size):
        return None
    return (
        f"cluster_state:{info.get('cluster_state')} known_nodes:{info.get('cluster_known_nodes')}"
    )


def redis_ready(stack: Stack, deadline: float) -> None:
    nodes = stack.redis
    for node in nodes:
        wait_for(f"{node.name} to answer PING", functools.partial(ping, node), deadline, node)
    if not stack.shape.redis_cluster:
        return
    first = nodes[0]
    if client.cluster_info(client.redis_node(first.port)).get("cluster_slots_assigned") == "0":
        log(f"creating the Redis Cluster ({len(nodes)} masters)")
        create = subprocess.run(
            [
                redis_cli(),
                "--cluster",
                "create",
                *(n.address for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if create.returncode != 0:
            raise DevstackError(
                f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}"
            )
    for node in nodes:
        wait_for(
            f"{node.name} to see cluster_state:ok",
            functools.partial(cluster_ok, node, len(nodes)),
            deadline,
            node,
        )


# --------------------------------------------------------------------------- Kafka


def admin(broker: Service) -> AdminClient:
    """A quiet AdminClient that asks `broker` first (it knows no other one to begin with)."""
    return client.Kafka(broker.address, **QUIET).admin()


def metadata(admin: AdminClient, timeout: float = METADATA_TIMEOUT) -> ClusterMetadata:
    return admin.list_topics(timeout=timeout)


def sees_cluster(stack: Stack, admin: AdminClient) -> str | None:
    brokers = metadata(admin).brokers
    if len(brokers) == len(stack.kafka):
        return None
    return f"metadata lists brokers {sorted(brokers)}"


def topics_unhealthy(
    meta: ClusterMetadata, names: Sequence[str] | None, full_isr: bool
) -> str | None:
    """Why the topics (None: all of them) are not served yet, or None when every partition has
    a leader (and, with `full_isr`, all its replicas in sync)."""
    for name in names if names is not None else sorted(meta.topics):
        topic = meta.topics.get(name)
        if topic is None:
            return f"topic {name} does not exist"
        if topic.error is not None or not topic.partitions:
            return f"topic {name}: {topic.error or 'no partitions'}"
        for index, part in sorted(topic.partitions.items()):
            if part.error is not None or part.leader < 0:
                return f"{name}-{index} has no leader ({part.error or 'leader -1'})"
            if full_isr and len(part.isrs) < len(part.replicas):
                return f"{name}-{index} in-sync replicas {part.isrs} of {part.replicas}"
    return None


def kafka_ready(stack: Stack, deadline: float) -> None:
    admins = {broker.name: admin(broker) for broker in stack.kafka}
    for broker in stack.kafka:
        wait_for(
            f"{broker.name} to serve metadata",
            functools.partial(sees_cluster, stack, admins[broker.name]),
            deadline,
            broker,
        )
    first = stack.kafka[0]
    names = list(TOPICS.values())
    kafka = client.Kafka(first.address, **QUIET)

    def create() -> str | None:
        kafka.create_topics(
            names,
            stack.shape.partitions,
            replication_factor=stack.replication_factor,
            timeout=CREATE_TIMEOUT,
            exist_ok=True,
            wait=False,
        )
        return None

    def led() -> str | None:
        for broker in stack.kafka:
            problem = topics_unhealthy(metadata(admins[broker.name]), names, full_isr=False)
            if problem:
                return f"{broker.name} sees: {problem}"
        return None

    log("Kafka answers; creating the enricher's topics")
    wait_for("the enricher's topics to be created", create, deadline, first)
    wait_for("the enricher's topics to have leaders", led, deadline, first)
    log("topics ready")


def brokers_in_sync(stack: Stack, target: Service, deadline: float) -> None:
    """After a broker restart: every running broker sees all of them, and every partition of
    every topic has all its replicas in sync again."""
    admins = {broker.name: admin(broker) for broker in stack.kafka}
    for broker in stack.kafka:
        if running_pid(broker) is not None:
            wait_for(
                f"{broker.name} to see every broker",
                functools.partial(sees_cluster, stack, admins[broker.name]),
                deadline,
                broker,
            )
    wait_for(
        "every partition to have all its replicas in sync",
        lambda: topics_unhealthy(metadata(admins[target.name]), None, full_isr=True),
        deadline,
        target,
    )


# --------------------------------------------------------------------------- status


def answers(service: Service) -> bool:
    """Whether a running service answers: PING for Redis, a metadata request for Kafka."""
    try:
        if service.kind == "redis":
            return ping(service) is None
        return bool(metadata(admin(service), timeout=2.0).brokers)
    except NOT_READY:
        return False
