"""The benchmark's verdicts: which targets a set of measurements meets, and the report that
says so (no stack: the measurements are made up)."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.results import (
    Baseline,
    Batch,
    Hop,
    Latency,
    Memory,
    Order,
    OutputCheck,
    RedisUse,
    Results,
    Streaming,
    StreamRun,
    Target,
    Throughput,
    Window,
)

EVENTS, DEVICES = 100_000, 10_000


def run(cpu_seconds: float, seconds: float = 10.0, commands: int = 500) -> StreamRun:
    return StreamRun(
        Window(EVENTS, seconds, cpu_seconds),
        RedisUse({"evalsha": commands // 2, "hmget": commands - commands // 2}, 3_000_000),
    )


def latency(p99_ms: float | None) -> Latency:
    delivered = [10.0] * 98 + ([p99_ms, p99_ms] if p99_ms is not None else [])
    return Latency.of(
        delivered,
        offered=5000.0,
        achieved=5000.0,
        expected=100,
        window=Window(100, 1.0, 0.5),
        bench_cpu_seconds=0.1,
        redis=RedisUse({"evalsha": 3}, 0),
    )


def results(
    *,
    enricher_seconds: float = 10.0,
    sessions_seconds: float = 10.0,
    baseline: Baseline | None = None,
    p99_ms: float | None = 100.0,
) -> Results:
    def throughput(seconds: float) -> Throughput:
        return Throughput([run(2.0, seconds)], EVENTS, DEVICES)

    order = Order(EVENTS, 0, 0, 0, 0)
    return Results(
        plan={"events": EVENTS},
        machine={},
        passthrough=Streaming([run(1.0, 5.0, 0)], EVENTS, DEVICES, latency(50.0)),
        enricher=Streaming([run(2.0, enricher_seconds)], EVENTS, DEVICES, latency(p99_ms)),
        sessions=throughput(sessions_seconds),
        collector=throughput(12.0),
        collector_requests=EVENTS // 10,
        enriched=throughput(12.0),
        hop=Hop([run(2.0, 12.0)], EVENTS, DEVICES, [order]),
        batch=Batch([Window(EVENTS, 2.0, 2.0)], f"events={EVENTS}"),
        floor=Batch([Window(EVENTS, 0.5, 0.5)], f"events={EVENTS}"),
        memory=Memory(DEVICES, 1_000_000, 2_500_000),
        repair=Window(EVENTS, 4.0, 1.5),
        checks=[OutputCheck("enricher", 1, EVENTS, DEVICES, "")],
        baseline=baseline,
    )


def baseline(cpu_seconds: float, commands: int = 500) -> Baseline:
    return Baseline([run(cpu_seconds, commands=commands)], EVENTS, DEVICES, "abc123", "f" * 40)


def by_goal(targets: list[Target], start: str) -> Target:
    (target,) = [t for t in targets if t.goal.startswith(start)]
    return target


def test_session_events_topic_is_held_to_nine_tenths_of_the_plain_service() -> None:
    slower = results(enricher_seconds=10.0, sessions_seconds=12.0).targets()
    near = results(enricher_seconds=10.0, sessions_seconds=11.0).targets()
    assert not by_goal(slower, "with the session events topic").met
    assert by_goal(near, "with the session events topic").met
    assert by_goal(slower, "with the session events topic").measured.startswith("0.83x")


@pytest.mark.parametrize(("p99_ms", "met"), [(500.0, True), (501.0, False), (None, False)])
def test_p99_target_is_half_a_second_and_an_undelivered_rank_fails_it(
    p99_ms: float | None, met: bool
) -> None:
    assert by_goal(results(p99_ms=p99_ms).targets(), "p99 latency").met is met


def test_baseline_targets_appear_only_with_a_baseline() -> None:
    assert not [t for t in results().targets() if "baseline" in t.goal]
    targets = results(baseline=baseline(cpu_seconds=5.0, commands=400)).targets()
    cpu = by_goal(targets, "enricher exactly-once: 2.5x")
    assert cpu.met and cpu.measured.startswith("2.50x")
    commands = by_goal(targets, "Redis commands per event from a backlog")
    assert not commands.met  # 0.0050 against the baseline's 0.0040
    memory = by_goal(targets, "Redis memory per device")
    assert memory.met  # the same memory per device as the baseline


@pytest.mark.parametrize(("baseline_bytes", "met"), [(2_980_000, True), (2_960_000, False)])
def test_memory_against_the_baseline_allows_one_per_cent_of_allocator_noise(
    baseline_bytes: int, met: bool
) -> None:
    """The working tree's runs grow ``used_memory`` by 3,000,000 bytes (300 B per device)."""
    base = Baseline(
        [StreamRun(Window(EVENTS, 10.0, 5.0), RedisUse({"evalsha": 500}, baseline_bytes))],
        EVENTS,
        DEVICES,
        "abc123",
        "f" * 40,
    )
    assert by_goal(results(baseline=base).targets(), "Redis memory per device").met is met


def test_cpu_against_the_baseline_below_the_target_is_not_met() -> None:
    targets = results(baseline=baseline(cpu_seconds=4.9)).targets()
    assert not by_goal(targets, "enricher exactly-once: 2.5x").met


def test_batch_is_reported_against_the_codec_floor() -> None:
    measured = results()
    assert measured.floor_ratio() == pytest.approx(0.25)
    assert not by_goal(measured.targets(), "batch mode >= 0.5x").met


def test_report_lists_every_target_with_its_verdict() -> None:
    measured = results(baseline=baseline(cpu_seconds=3.0))
    measured.machine.update(
        date="2026-12-02",
        cpu_model="cpu",
        nproc=2,
        memory_gib=24,
        python="3.11",
        kafka="4",
        redis="7",
        redis_appendfsync="everysec",
        librdkafka="2",
        load_average_1m_start=1.0,
        load_average_1m_end=1.0,
    )
    measured.plan.update(
        devices=DEVICES,
        seed=1,
        partitions=12,
        batch_size=1000,
        runs=1,
        latency_seconds=30.0,
        warmup_seconds=5.0,
    )
    text = report.markdown(measured)
    for target in measured.targets():
        verdict = "met" if target.met else "**not met**"
        assert f"| {target.goal} | {target.measured} | {verdict} |" in text
    data = json.loads(json.dumps(report.as_json(measured)))
    assert len(data["targets"]) == len(measured.targets())
