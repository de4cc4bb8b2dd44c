"""``python -m bench``: the whole benchmark, from ``ops/devstack up`` to the results files.

Order: stack up, preload the inputs, then per run ``enricher batch`` and the codec floor
(``bench.floor``), the passthrough, ``enricher run`` (and, with ``--baseline``, the same from
another revision), ``enricher run`` with the session events topic, on the collector's records,
on the enriched TSV and on JSON keyed at random (through the re-keying hop) in turn
(interleaved, so that a change in the machine's load hits every mode alike; batch first, for
its output is what the comparable streaming modes' output is checked against), then one
latency run per streaming mode at half of its median rate (the lifecycle variant has none),
then the state repair of an emptied Redis, then the Redis memory per device. Whatever happens,
every process it started is stopped, the stack is taken down and the baseline's worktree
removed.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import shutil
import signal
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from bench import baseline, latency, measure, report, sampling, stack, workload
from bench.children import Children
from bench.common import REPO, BenchError, say
from bench.lab import DLQ_TOPIC, INPUTS, Lab
from bench.machine import describe
from bench.reference import Reference
from bench.results import (
    Baseline,
    Batch,
    Hop,
    Order,
    OutputCheck,
    Results,
    Streaming,
    StreamRun,
    Throughput,
    Window,
)
from enricher import generate
from enricher.config import Settings

STATE_DIR = REPO / ".devstack" / "bench"
RESULTS_DIR = REPO / "bench" / "results"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Plan:
    events: int
    devices: int
    runs: int
    seed: int
    latency_seconds: float
    memory_devices: int
    quick: bool
    baseline: str = ""
    """a git revision whose ``enricher run`` is measured too (``--baseline``)"""

    @property
    def name(self) -> str:
        """The results' file name: a smoke run does not replace the latest full results."""
        return "quick" if self.quick else "latest"

    def describe(self) -> dict[str, object]:
        return {
            **asdict(self),
            "partitions": stack.PARTITIONS,
            "batch_size": Settings().batch_size,
            "warmup_seconds": latency.WARMUP_SECONDS,
            "poll_seconds": sampling.POLL_SECONDS,
        }


FULL = Plan(1_000_000, 100_000, 3, 1, 30.0, 1_000_000, quick=False)
QUICK = Plan(20_000, 2_000, 1, 1, 10.0, 20_000, quick=True)


def _positive(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the session enricher against a passthrough ceiling on the local"
        " stack; results in bench/results/ (see docs/benchmark.md).",
    )
    root.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke configuration: {QUICK.events:,} events, {QUICK.devices:,} devices,"
        f" {QUICK.runs} run, {QUICK.memory_devices:,} devices for the memory measurement;"
        " results go to bench/results/quick.*",
    )
    root.add_argument("--events", type=_positive, help=f"input events ({FULL.events:,})")
    root.add_argument("--devices", type=_positive, help=f"devices ({FULL.devices:,})")
    root.add_argument("--runs", type=_positive, help=f"throughput runs per mode ({FULL.runs})")
    root.add_argument("--seed", type=int, help=f"load generator seed ({FULL.seed})")
    root.add_argument(
        "--latency-seconds",
        type=_positive,
        help=f"measured seconds at half of peak load, after a warm-up ({FULL.latency_seconds:.0f})",
    )
    root.add_argument(
        "--memory-devices",
        type=_positive,
        help=f"devices for the Redis memory measurement ({FULL.memory_devices:,})",
    )
    root.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure `enricher run` at this git revision (a worktree of its own) in the"
        " same runs, and compare its CPU per event with the working tree's",
    )
    return root


def plan_of(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    chosen = {
        name: getattr(args, name)
        for name in (
            "events",
            "devices",
            "runs",
            "seed",
            "latency_seconds",
            "memory_devices",
            "baseline",
        )
        if getattr(args, name) is not None
    }
    return Plan(**{**asdict(base), **chosen})


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """One benchmark at a time on this checkout: they would share ``STATE_DIR``."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(f"another benchmark holds {lock_path}") from None
        yield


def _interrupted(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def checked(
    lab: Lab, mode: str, index: int, reference: Reference, checks: list[OutputCheck]
) -> StreamRun:
    """A throughput run of ``mode`` whose output must be ``enricher batch``'s, byte for byte;
    the baseline's may differ (it is reported, the run goes on), the working tree's may not."""
    run, check = measure.checked_run(lab, mode, index, reference)
    checks.append(check)
    if not check.matched:
        why = f"{mode} run {index}: the output is not enricher batch's: {check.difference}"
        if mode != "baseline":
            raise BenchError(why)
        say(f"{why} (the baseline's: reported, not fatal)")
    return run


def measure_all(
    plan: Plan, children: Children, work: Path, checkout: baseline.Checkout | None
) -> Results:
    settings = stack.up(STATE_DIR)
    kafka = stack.Kafka(settings["ENRICHER_BOOTSTRAP_SERVERS"])
    redis = stack.Redis(settings["ENRICHER_REDIS_URL"])
    machine = describe(redis.describe())
    traffic = generate.Traffic(plan.events, plan.devices, plan.seed)
    lab = Lab(
        kafka,
        redis,
        settings["ENRICHER_REDIS_URL"],
        children,
        work,
        traffic,
        stack.broker_pids(STATE_DIR),
        checkout,
    )
    kafka.create_topics([*INPUTS.topics(), DLQ_TOPIC])
    source, batch_output = work / "events.jsonl", work / "batch.out.jsonl"
    preloaded = workload.preload(kafka, INPUTS, traffic, source)

    passthrough: list[StreamRun] = []
    enricher: list[StreamRun] = []
    sessions: list[StreamRun] = []
    collector: list[StreamRun] = []
    hop: list[StreamRun] = []
    enriched: list[StreamRun] = []
    orders: list[Order] = []
    batch: list[Window] = []
    floor: list[Window] = []
    checks: list[OutputCheck] = []
    baseline_runs: list[StreamRun] = []
    summary = ""
    for index in range(1, plan.runs + 1):
        window, summary = measure.batch_run(lab, source, index, batch_output)
        batch.append(window)
        floor.append(measure.floor_run(lab, source, index))
        reference = Reference.read(batch_output)
        passthrough.append(measure.throughput_run(lab, "passthrough", index))
        enricher.append(checked(lab, "enricher", index, reference, checks))
        if checkout is not None:
            baseline_runs.append(checked(lab, "baseline", index, reference, checks))
        sessions.append(checked(lab, "sessions", index, reference, checks))
        collector.append(measure.throughput_run(lab, "collector", index))
        enriched.append(measure.throughput_run(lab, "enriched", index))
        run, order = measure.hop_run(lab, index)
        hop.append(run)
        orders.append(order)
    source.unlink()
    batch_output.unlink()

    rates = {
        mode: 0.5 * statistics.median(r.window.rate for r in runs)
        for mode, runs in (("passthrough", passthrough), ("enricher", enricher))
    }
    counts = {
        mode: math.ceil(rate * (latency.WARMUP_SECONDS + plan.latency_seconds))
        for mode, rate in rates.items()
    }
    say(f"generating {sum(counts.values()):,} more events to offer at half of peak")
    more = workload.returning(traffic, sum(counts.values()), preloaded.latest_ms)
    latencies = {
        "passthrough": latency.latency_run(
            lab, "passthrough", rates["passthrough"], more[: counts["passthrough"]]
        ),
        "enricher": latency.latency_run(
            lab, "enricher", rates["enricher"], more[counts["passthrough"] :]
        ),
    }
    repair = measure.repair_run(lab)
    memory = measure.memory_run(lab, plan.memory_devices, plan.seed)
    machine["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    return Results(
        plan=plan.describe(),
        machine=machine,
        passthrough=Streaming(
            passthrough, plan.events, preloaded.devices, latencies["passthrough"]
        ),
        enricher=Streaming(enricher, plan.events, preloaded.devices, latencies["enricher"]),
        sessions=Throughput(sessions, plan.events, preloaded.devices),
        collector=Throughput(collector, plan.events, preloaded.devices),
        collector_requests=preloaded.requests,
        hop=Hop(hop, plan.events, preloaded.devices, orders),
        enriched=Throughput(enriched, plan.events, preloaded.devices),
        batch=Batch(batch, summary),
        floor=Batch(floor, f"events={plan.events}"),
        memory=memory,
        repair=repair,
        checks=checks,
        baseline=None
        if checkout is None
        else Baseline(
            baseline_runs, plan.events, preloaded.devices, checkout.revision, checkout.commit
        ),
    )


def run(plan: Plan, checkout: baseline.Checkout | None) -> Results | int:
    """Prepare, measure, and whatever happens stop every process and take the stack down;
    the results, or an exit status."""
    work, logs = STATE_DIR / "work", STATE_DIR / "logs"
    if (STATE_DIR / "stack.json").exists():
        say("taking down the stack an earlier benchmark left behind")
        stack.down(STATE_DIR)
    for folder in (work, logs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    say(
        f"plan: {plan.events:,} events, {plan.devices:,} devices, {plan.runs} run(s),"
        f" seed {plan.seed}; logs in {logs.relative_to(REPO)}"
    )
    children = Children(logs)
    outcome: Results | int
    try:
        outcome = measure_all(plan, children, work, checkout)
    except BenchError as error:
        say(f"error: {error}")
        outcome = 1
    except KeyboardInterrupt:
        say("interrupted")
        outcome = 130
    finally:
        # Handled failures have released their frames (and the Kafka clients in them) by now,
        # so nothing of the benchmark's own still talks to the stack when it goes down.
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        say("stopping what the benchmark started")
        children.stop_all()
        stack.down(STATE_DIR)
        shutil.rmtree(work, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    plan = plan_of(parser().parse_args(argv))
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        with exclusive(STATE_DIR.parent / "bench.lock"), ExitStack() as cleanup:
            checkout = (
                cleanup.enter_context(baseline.checkout(plan.baseline)) if plan.baseline else None
            )
            outcome = run(plan, checkout)
    except BenchError as error:
        say(f"error: {error}")
        return 1
    if isinstance(outcome, int):
        return outcome
    text, written = report.write(outcome, RESULTS_DIR, plan.name)
    say("wrote " + ", ".join(str(path.relative_to(REPO)) for path in written))
    sys.stdout.write(text)
    return 0
