"""The results as a PNG chart: throughput per mode and latency at half of peak load."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from bench.common import say
from bench.results import P99_TARGET_MS, Results


def chart(results: Results, path: Path) -> bool:
    """Throughput per mode (every run, and the targets) and latency at half of peak; False
    when matplotlib is not installed."""
    try:
        # Loaded by name: matplotlib is an optional dependency (the `bench` extra), and this
        # way `mypy bench` needs it neither.
        importlib.import_module("matplotlib").use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        say(f"matplotlib is not installed (pip install matplotlib): no {path.name}")
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 5.2), width_ratios=(4, 2))
    _throughput(left, results)
    _latency(right, results)
    plan, machine = results.plan, results.machine
    figure.suptitle(
        f"session enricher: {plan['events']:,} events, {plan['devices']:,} devices,"
        f" {machine['nproc']} cores ({machine['cpu_model']}), {machine['date']}",
        fontsize="medium",
    )
    figure.tight_layout()
    temporary = path.with_name(path.name + ".tmp")
    figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    temporary.replace(path)
    return True


def _throughput(axes: Any, results: Results) -> None:
    passthrough, enricher, batch = results.passthrough, results.enricher, results.batch
    streaming = [passthrough, enricher, results.sessions, results.collector, results.hop]
    names = [
        "passthrough",
        "enricher\nexactly-once",
        "enricher +\nsession\nevents topic",
        "collector\nformat\n(re-keyed)",
        "re-keying\nhop (JSON)",
        "batch mode\n(one core)",
        "codec floor\n(one core)",
    ]
    floor = results.floor
    medians = [*(mode.rate for mode in streaming), batch.rate, floor.rate]
    runs = [
        *([r.window.rate for r in mode.runs] for mode in streaming),
        [w.rate for w in batch.runs],
        [w.rate for w in floor.runs],
    ]
    colors = ["#9e9e9e", "#1f77b4", "#6baed6", "#9467bd", "#c5b0d5", "#2ca02c", "#bdbdbd"]
    bars = axes.bar(names, medians, color=colors)
    axes.bar_label(bars, labels=[f"{m:,.0f}/s" for m in medians], padding=3, fontsize="small")
    for position, rates in enumerate(runs):
        axes.scatter([position] * len(rates), rates, color="black", s=12, zorder=3)
    axes.axhline(
        0.6 * passthrough.rate, color="#1f77b4", linestyle="--", label="target: 0.6x passthrough"
    )
    axes.axhline(
        0.5 * floor.rate, color="#2ca02c", linestyle=":", label="target: batch 0.5x codec floor"
    )
    axes.set_ylabel("events/s (bars: median, dots: runs)")
    axes.set_title("throughput")
    axes.legend(loc="upper left", fontsize="small")
    axes.margins(y=0.15)


def _latency(axes: Any, results: Results) -> None:
    modes = [("passthrough", results.passthrough.latency), ("enricher", results.enricher.latency)]
    width = 0.38
    for offset, label in enumerate(("p50", "p99")):
        values = [latency.p50_ms if label == "p50" else latency.p99_ms for _, latency in modes]
        positions = [i + (offset - 0.5) * width for i in range(len(modes))]
        drawn = axes.bar(positions, [v or 0.0 for v in values], width, label=label)
        axes.bar_label(
            drawn,
            labels=["not delivered" if v is None else f"{v:,.0f}" for v in values],
            padding=2,
            fontsize="small",
        )
    axes.set_xticks(
        range(len(modes)),
        [f"{name}\nat {latency.offered_rate:,.0f}/s" for name, latency in modes],
    )
    axes.axhline(
        P99_TARGET_MS, color="red", linestyle="--", label=f"target: p99 {P99_TARGET_MS} ms"
    )
    axes.set_ylabel("end-to-end latency, ms")
    axes.set_title("latency at half of peak load")
    axes.legend(fontsize="small")
    axes.margins(y=0.15)
