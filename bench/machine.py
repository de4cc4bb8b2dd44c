"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import confluent_kafka

from bench.common import REPO
from bench.stack import kafka_jvm_opts

KAFKA_JARS = REPO / "ops" / ".cache" / "kafka"


def _first(path: str, prefix: str) -> str:
    for line in Path(path).read_text().splitlines():
        if line.startswith(prefix):
            return line.split(":", 1)[1].strip()
    return "unknown"


def kafka_version() -> str:
    """The broker's release, from the jar ops/devstack runs it from."""
    for jar in sorted(KAFKA_JARS.glob("kafka-server-*.jar")):
        found = re.fullmatch(r"kafka-server-(\d+\.\d+\.\d+)\.jar", jar.name)
        if found:
            return found.group(1)
    return "unknown"


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def describe(redis_versions: dict[str, str]) -> dict[str, object]:
    memory_kib = int(_first("/proc/meminfo", "MemTotal").split()[0])
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "memory_gib": round(memory_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kafka": kafka_version(),
        "kafka_jvm_opts": kafka_jvm_opts(),
        **redis_versions,
        "librdkafka": confluent_kafka.libversion()[0],
        "confluent_kafka": metadata.version("confluent-kafka"),
        "redis_py": metadata.version("redis"),
        "git_commit": git_commit(),
        "load_average_1m_start": round(os.getloadavg()[0], 2),
    }
