"""A stack's shape, its services and their ports and folders, its settings and its state file."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from stacklib.common import HOST, DevstackError

TOPICS = {
    "ENRICHER_INPUT_TOPIC": "enricher.raw",
    "ENRICHER_OUTPUT_TOPIC": "enricher.enriched",
    "ENRICHER_DLQ_TOPIC": "enricher.dlq",
    "ENRICHER_SESSION_EVENTS_TOPIC": "enricher.sessions",
}
REDIS_CLUSTER_NODES = 3
MAX_BROKERS = 9


@dataclass(frozen=True)
class Shape:
    """What `up` was asked for; stored in <dir>/stack.json."""

    brokers: int
    redis_cluster: bool
    port_base: int
    partitions: int
    fsync: str


@dataclass(frozen=True)
class Service:
    name: str
    kind: str  # "kafka" or "redis"
    index: int  # 1-based
    port: int  # client port
    peer_port: int  # Kafka controller port or Redis cluster bus port; 0 when unused
    home: Path

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"

    @property
    def config(self) -> Path:
        return self.home / ("server.properties" if self.kind == "kafka" else "redis.conf")

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.port, self.peer_port) if p]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


@dataclass(frozen=True)
class Stack:
    dir: Path
    shape: Shape
    cluster_id: str

    @property
    def state_file(self) -> Path:
        return self.dir / "stack.json"

    @property
    def kafka(self) -> list[Service]:
        base = self.shape.port_base
        return [
            Service(
                f"kafka-{i}",
                "kafka",
                i,
                base + 90 + 2 * i,
                base + 91 + 2 * i,
                self.dir / f"kafka-{i}",
            )
            for i in range(1, self.shape.brokers + 1)
        ]

    @property
    def redis(self) -> list[Service]:
        base = self.shape.port_base
        if not self.shape.redis_cluster:
            return [Service("redis-1", "redis", 1, base + 379, 0, self.dir / "redis-1")]
        return [
            Service(
                f"redis-{i}", "redis", i, base + 378 + i, base + 478 + i, self.dir / f"redis-{i}"
            )
            for i in range(1, REDIS_CLUSTER_NODES + 1)
        ]

    @property
    def services(self) -> list[Service]:
        return self.redis + self.kafka

    @property
    def formatted(self) -> bool:
        """Whether every Kafka node's storage was formatted (a start can fail before)."""
        return all((service.home / "data" / "meta.properties").exists() for service in self.kafka)

    @property
    def replication_factor(self) -> int:
        return min(3, self.shape.brokers)

    @property
    def min_isr(self) -> int:
        return max(1, self.replication_factor - 1)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(s.address for s in self.kafka)

    def settings(self) -> list[tuple[str, str]]:
        return [
            ("ENRICHER_BOOTSTRAP_SERVERS", self.bootstrap_servers),
            ("ENRICHER_REDIS_URL", f"redis://{self.redis[0].address}"),
            ("ENRICHER_REDIS_CLUSTER", "true" if self.shape.redis_cluster else "false"),
            *TOPICS.items(),
        ]

    def save(self) -> None:
        state = {"shape": asdict(self.shape), "cluster_id": self.cluster_id}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")


def load_stack(state_dir: Path) -> Stack | None:
    try:
        state = json.loads((state_dir / "stack.json").read_text())
        return Stack(state_dir, Shape(**state["shape"]), str(state["cluster_id"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise DevstackError(
            f"{state_dir / 'stack.json'} is unreadable ({exc}); stop the stack's processes and "
            f"remove {state_dir} by hand"
        ) from exc


def new_cluster_id() -> str:
    """A random KRaft cluster id (16 bytes, URL-safe base64) that does not start with '-':
    Kafka's own ids never do, since a command line (``kafka-storage format --cluster-id``)
    would take one for an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def log_tail(home: Path, lines: int = 30) -> str:
    """The last lines of each log file in a service's folder (e.g. <dir>/kafka-1)."""
    chunks = []
    for path in sorted(home.glob("*.log")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        if text:
            chunks.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(chunks) if chunks else f"--- no log files in {home}"
