"""The stack the measurements share, and how each mode's process starts in it: the topics,
the settings of each streaming mode, and ``enricher batch`` run to completion."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import workload
from bench.baseline import INTERPRETER, Checkout
from bench.children import Child, Children
from bench.common import BenchError, clean_environment
from bench.results import Window
from bench.stack import Kafka, Redis
from enricher import generate

INPUT_TOPIC = "bench.input"
INPUTS = workload.Inputs(
    INPUT_TOPIC, "bench.input.random-keys", "bench.input.collector", "bench.input.enriched"
)
DLQ_TOPIC = "bench.dlq"
SALT = "bench-salt"
STREAMING_ARGV = {
    "passthrough": [sys.executable, "-m", "bench.passthrough"],
    "enricher": [sys.executable, "-m", "enricher", "run"],
    "sessions": [sys.executable, "-m", "enricher", "run"],
    "collector": [sys.executable, "-m", "enricher", "run"],
    "hop": [sys.executable, "-m", "enricher", "run"],
    "enriched": [sys.executable, "-m", "enricher", "run"],
    "baseline": [*INTERPRETER, "-m", "enricher", "run"],
}
"""``sessions``: ``enricher run`` publishing the session events topic too; ``collector``: on
the collector's records, in and out; ``hop``: on the JSON keyed at random, the device in
``duid``. Those two move every event to its device's partition first (the re-keying hop).
``enriched``: on Snowplow Enrich's TSV keyed by device, in and out. ``baseline``: ``enricher
run`` as the ``enricher`` mode, from another revision (:mod:`bench.baseline`)."""
REKEYED = {
    "collector": {
        "ENRICHER_INPUT_FORMAT": "snowplow-collector",
        "ENRICHER_OUTPUT_FORMAT": "snowplow-collector",
    },
    "hop": {"ENRICHER_DEVICE_ID": "duid"},
}
"""the settings of the modes behind the re-keying hop"""
MODE_INPUTS = {
    "collector": INPUTS.collector,
    "hop": INPUTS.random_keys,
    "enriched": INPUTS.enriched,
}
"""the input of the modes that do not read :data:`INPUT_TOPIC`"""
FORMAT_SETTINGS = {
    "enriched": {
        "ENRICHER_INPUT_FORMAT": "snowplow-enriched",
        "ENRICHER_OUTPUT_FORMAT": "snowplow-enriched",
        "ENRICHER_DEVICE_ID": "key",
    },
}
"""the settings of a mode on another format, keyed by device (no hop)"""


def sessions_topic(target: str) -> str:
    return f"{target}.sessions"


@dataclass(frozen=True)
class Lab:
    """The running stack and what every measurement needs from it."""

    kafka: Kafka
    redis: Redis
    redis_url: str
    children: Children
    work: Path
    traffic: generate.Traffic
    broker_pids: list[int]
    baseline: Checkout | None = None
    """the revision the ``baseline`` mode runs (``--baseline``)"""

    def start_streaming(
        self, mode: str, name: str, source: str, target: str, process: str = ""
    ) -> Child:
        """``mode`` (a key of :data:`STREAMING_ARGV`) from ``source`` to ``target``; ``name`` is
        its consumer group, transactional id and Redis key prefix, and unless ``process`` is
        given, the name of its process and log."""
        env = {
            **clean_environment(),
            "ENRICHER_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "ENRICHER_REDIS_URL": self.redis_url,
            "ENRICHER_INPUT_TOPIC": source,
            "ENRICHER_OUTPUT_TOPIC": target,
            "ENRICHER_DLQ_TOPIC": DLQ_TOPIC,
            "ENRICHER_GROUP_ID": name,
            "ENRICHER_TRANSACTIONAL_ID": name,
            "ENRICHER_REDIS_KEY_PREFIX": f"{name}:",
            "ENRICHER_SALT": SALT,
            "ENRICHER_METRICS_HOST": "127.0.0.1",
            "ENRICHER_METRICS_PORT": "0",
            "ENRICHER_SHUTDOWN_TIMEOUT": "10",
            **REKEYED.get(mode, {}),
            **FORMAT_SETTINGS.get(mode, {}),
        }
        if mode == "sessions":
            env["ENRICHER_SESSION_EVENTS_TOPIC"] = sessions_topic(target)
        if mode == "baseline":
            if self.baseline is None:
                raise BenchError("the baseline mode needs a revision (--baseline)")
            env.update(self.baseline.environment())
        return self.children.start(process or name, STREAMING_ARGV[mode], env)

    def run_batch(
        self,
        name: str,
        source: Path,
        *extra: str,
        module: str = "enricher batch",
        output: Path | None = None,
    ) -> tuple[Window, str]:
        """``enricher batch`` (or ``module``, run as ``python -m``, with the same ``--input``
        and ``--output``) on ``source`` to completion: the whole process as the window, and
        the summary line it printed. The output is kept at ``output`` when it is given."""
        target = output or self.work / f"{name}.out.jsonl"
        argv = [sys.executable, "-m", *module.split(), "--input", str(source)]
        argv += ["--output", str(target)]
        argv += [] if module == "bench.floor" else ["--salt", SALT, *extra]
        env = {**clean_environment(), "ENRICHER_REDIS_KEY_PREFIX": f"{name}:"}
        started = time.monotonic()
        child = self.children.start(name, argv, env)
        code, cpu = child.wait_with_usage()
        elapsed = time.monotonic() - started
        for path in (target, target.with_name(target.name + ".errors.jsonl")):
            if path != output:
                path.unlink(missing_ok=True)
        lines = child.log_path.read_text(errors="replace").splitlines()
        summary = next((line for line in reversed(lines) if line.startswith("events=")), None)
        if code != 0 or summary is None:
            raise child.failure("failed")
        events = int(summary.split()[0].removeprefix("events="))
        return Window(events, elapsed, cpu), summary
