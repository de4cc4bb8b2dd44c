"""The results as a Markdown table and a JSON file, and the chart beside them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bench.chart import chart
from bench.results import (
    CPU_TARGET,
    Baseline,
    Batch,
    Hop,
    Latency,
    OutputCheck,
    Results,
    Streaming,
    Throughput,
    duration,
    milliseconds,
)

UNSUPPORTED = "not supported"
CHECKED_MODES = {
    "enricher": "`enricher run`",
    "baseline": "the baseline",
    "sessions": "with the session events topic",
}


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _latency_cells(latency: Latency) -> list[str]:
    return [
        milliseconds(latency.p50_ms),
        milliseconds(latency.p99_ms),
        f"{latency.offered_rate:,.0f}/s",
    ]


def _runs(rates: list[float]) -> str:
    return " / ".join(_rate(r) for r in rates)


def _throughput_row(mode: str, results: Results, measured: Throughput) -> list[str]:
    """A row of a streaming mode measured for throughput only."""
    return [
        mode,
        _rate(measured.rate),
        f"{results.ratio(measured.rate):.2f}",
        "not measured",
        "not measured",
        "",
        f"{measured.cpu_per_1k:.3f}",
        f"{measured.commands_per_event:.4f} / not measured",
    ]


def _order(hop: Hop) -> str:
    """The re-keying hop's order, in a sentence."""
    order = hop.order
    runs = " / ".join(f"{o.behind:,} ({o.share:.2%})" for o in hop.orders)
    return (
        "Order after the re-keying hop (JSON keyed at random, its `<group>-by-device` topic"
        f" read back): {order.behind:,} of {order.events:,} events ({order.share:.2%}), of"
        f" {order.devices:,} devices, reached the enrichment behind their device's clock (a"
        " `dtm` earlier than one of the same device before it in its partition), by"
        f" {duration(order.median_behind_ms)} (median), up to {duration(order.max_behind_ms)};"
        f" runs: {runs}. Keyed by device, the input has none."
    )


def _baseline_row(results: Results) -> list[list[str]]:
    """The baseline's row, when there is one."""
    if results.baseline is None:
        return []
    name = f"enricher run at {results.baseline.revision} (baseline)"
    return [_throughput_row(name, results, results.baseline)]


def _baseline(results: Results) -> list[str]:
    """The baseline's CPU per event against the working tree's, in a sentence."""
    base = results.baseline
    if base is None:
        return []
    ratio, current = results.baseline_cpu_ratio(base), results.enricher.cpu_per_1k
    return [
        f"Baseline: `enricher run` at {base.revision} ({base.commit[:12]}), in the same"
        f" interleaved runs; events/s {_runs([r.window.rate for r in base.runs])}. CPU per"
        f" event, baseline / working tree: {base.cpu_per_1k:.3f} / {current:.3f} CPU s per 1k"
        f" events = {ratio:.2f}x.",
    ]


def _checks(results: Results) -> str:
    """Which streaming modes' output was compared with ``enricher batch``'s, and how it went."""
    parts = []
    for mode, label in CHECKED_MODES.items():
        runs = [check for check in results.checks if check.mode == mode]
        if runs:
            parts.append(f"{label} {_check_runs(runs)}")
    return (
        "Output checked against `enricher batch`'s on the same events (every device's records"
        " in order, byte for byte, read back from each run's output topic): "
        + "; ".join(parts)
        + ". Not comparable, so not checked: the collector format and the enriched TSV (other"
        " formats), the re-keying hop (its events carry `duid` and reach the enrichment in the"
        " hop's order)."
    )


def _check_runs(runs: list[OutputCheck]) -> str:
    """One mode's runs: how many records matched, or where a run's output differs."""
    differing = [check for check in runs if not check.matched]
    if differing:
        first = differing[0]
        return (
            f"**differs** in {len(differing)} of {len(runs)} run(s); run {first.run}:"
            f" {first.difference}"
        )
    counts = " / ".join(f"{check.records:,}" for check in runs)
    return f"{counts} records matched ({len(runs)} run(s))"


def markdown(results: Results) -> str:
    plan, machine = results.plan, results.machine
    passthrough, enricher, batch = results.passthrough, results.enricher, results.batch
    sessions, floor = results.sessions, results.floor
    collector, hop = results.collector, results.hop
    rows = [
        [
            "passthrough: decode, encode, produce, transactions; no state",
            _rate(passthrough.rate),
            "1.00",
            *_latency_cells(passthrough.latency),
            f"{passthrough.cpu_per_1k:.3f}",
            "none",
        ],
        [
            "enricher, exactly-once (`enricher run`)",
            _rate(enricher.rate),
            f"{results.ratio(enricher.rate):.2f}",
            *_latency_cells(enricher.latency),
            f"{enricher.cpu_per_1k:.3f}",
            f"{enricher.commands_per_event:.4f} / {enricher.latency.commands_per_event:.4f}",
        ],
        *_baseline_row(results),
        _throughput_row("enricher, exactly-once, with the session events topic", results, sessions),
        _throughput_row(
            "enricher, exactly-once, collector format: Thrift POSTs of 10 events keyed at random,"
            " re-keyed by device",
            results,
            collector,
        ),
        _throughput_row(
            "enricher, exactly-once, re-keying hop: JSON keyed at random"
            " (`ENRICHER_DEVICE_ID=duid`)",
            results,
            hop,
        ),
        _throughput_row(
            "enricher, exactly-once, enriched TSV (Snowplow Enrich's 131 fields) keyed by device",
            results,
            results.enriched,
        ),
        ["enricher, at-least-once", UNSUPPORTED, *[""] * 6],
        [
            "codec floor: orjson decode, one entity into `co`, encode; no rules (batch's ceiling)",
            _rate(floor.rate),
            "1.00 (floor)",
            "n/a",
            "n/a",
            "n/a",
            f"{floor.cpu_per_1k:.3f}",
            "none",
        ],
        [
            "batch mode (`enricher batch`, one core, state in memory)",
            _rate(batch.rate),
            f"{results.floor_ratio():.2f} (floor)",
            "n/a",
            "n/a",
            "n/a",
            f"{batch.cpu_per_1k:.3f}",
            "none",
        ],
    ]
    header = [
        "mode",
        "events/s",
        "x ceiling",
        "p50 latency",
        "p99 latency",
        "offered load",
        "CPU s / 1k events",
        "Redis commands / event (backlog / half load)",
    ]
    table = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    targets = [
        "| target | measured | |",
        "|---|---|---|",
        *(
            f"| {t.goal} | {t.measured} | {'met' if t.met else '**not met**'} |"
            for t in results.targets()
        ),
    ]
    memory = results.memory
    lines = [
        "# Session enricher benchmark",
        "",
        f"`python -m bench` on {machine['date']}: {plan['events']:,} events of"
        f" {plan['devices']:,} devices (seed {plan['seed']}), {plan['partitions']} partitions,"
        f" batch size {plan['batch_size']}, median of {plan['runs']} run(s).",
        f"Machine: {machine['cpu_model']}, {machine['nproc']} cores, {machine['memory_gib']} GiB;"
        f" Python {machine['python']}, Kafka {machine['kafka']}, Redis {machine['redis']}"
        f" (appendfsync {machine['redis_appendfsync']}), librdkafka {machine['librdkafka']};"
        f" load average {machine['load_average_1m_start']} at the start,"
        f" {machine['load_average_1m_end']} at the end.",
        "",
        *table,
        "",
        f"Runs, events/s: passthrough {_runs([r.window.rate for r in passthrough.runs])};"
        f" enricher {_runs([r.window.rate for r in enricher.runs])};"
        f" with the session events topic {_runs([r.window.rate for r in sessions.runs])};"
        f" collector format {_runs([r.window.rate for r in collector.runs])};"
        f" re-keying hop {_runs([r.window.rate for r in hop.runs])};"
        f" enriched TSV {_runs([r.window.rate for r in results.enriched.runs])};"
        f" batch {_runs([w.rate for w in batch.runs])};"
        f" codec floor {_runs([w.rate for w in floor.runs])}.",
        "x ceiling: the streaming modes' events/s against the passthrough's; batch mode's"
        " events per CPU second against the codec floor's on the same file"
        f" ({batch.rate_per_cpu_second:,.0f} and {floor.rate_per_cpu_second:,.0f}).",
        "CPU s / 1k events counts the process alone; with the Kafka broker and Redis on the"
        f" same machine: passthrough {passthrough.stack_cpu_per_1k:.3f},"
        f" enricher {enricher.stack_cpu_per_1k:.3f}, keeping {passthrough.cores_busy:.2f} and"
        f" {enricher.cores_busy:.2f} of the {machine['nproc']} cores busy.",
        "The two modes behind the re-keying hop (collector format, re-keying hop) count the"
        " events committed to the output (the process's `enricher_records_produced_total`),"
        " from the hop's first commit, not input records: the collector's input holds"
        f" {results.collector_requests:,} requests"
        f" ({collector.events / results.collector_requests:.1f} events each). With the broker"
        f" and Redis: {collector.stack_cpu_per_1k:.3f} and {hop.stack_cpu_per_1k:.3f} CPU s"
        f" per 1k events, keeping {collector.cores_busy:.2f} and {hop.cores_busy:.2f} cores"
        " busy.",
        _order(hop),
        _checks(results),
        *_baseline(results),
        "Redis commands / event count what INFO commandstats counts, the commands that the"
        " scripts run included; sent by the service itself (EVAL, HMGET, HINCRBY; the HMGET"
        " that each fenced write runs is counted here too):"
        f" {enricher.sent_per_event:.4f} from the backlog, where a batch mostly"
        f" holds one or two partitions, {enricher.latency.sent_per_event:.4f} at half load,"
        " where every batch spans all of them.",
        f"Latency: offered at half of each mode's median rate for {plan['latency_seconds']:.0f} s"
        f" after a {plan['warmup_seconds']:.0f} s warm-up; p90"
        f" {milliseconds(passthrough.latency.p90_ms)} (passthrough),"
        f" {milliseconds(enricher.latency.p90_ms)} (enricher); the process, the broker and"
        f" Redis kept {passthrough.latency.window.cores_busy:.2f} (passthrough) and"
        f" {enricher.latency.window.cores_busy:.2f} (enricher) cores busy, the benchmark's"
        " own producer and reader"
        f" {passthrough.latency.bench_cpu_seconds / passthrough.latency.window.seconds:.2f}"
        f" and {enricher.latency.bench_cpu_seconds / enricher.latency.window.seconds:.2f}.",
        f"Redis memory per device: {memory.per_device:.0f} B (`enricher batch --redis-url`,"
        f" {memory.devices:,} devices, one event each); after an `enricher run`, whose records"
        f" also carry a snapshot: {enricher.memory_per_device:.0f} B"
        f" ({enricher.devices:,} devices); with the session events topic, which adds the expiries"
        f" sorted set: {sessions.memory_per_device:.0f} B.",
        f"Batch mode: {batch.summary}.",
        f"State repair (Redis emptied after `enricher run` committed the input; a new instance"
        f" replays every partition from offset 0): {results.repair.events:,} events at"
        f" {results.repair.rate:,.0f} events/s ({results.repair.rate / enricher.rate:.2f}x"
        f" `enricher run`), {results.repair.cpu_per_1k:.3f} CPU s per 1k events.",
        "",
        "## Targets",
        "",
        *targets,
        "",
    ]
    return "\n".join(lines)


def _streaming_json(mode: Streaming) -> dict[str, Any]:
    half_load = {
        "redis_commands_per_event_at_half_load": mode.latency.commands_per_event,
        "redis_commands_sent_per_event_at_half_load": mode.latency.sent_per_event,
    }
    return {
        **_throughput_json(mode),
        **(half_load if mode.commands_per_event else {}),
        "latency": dataclasses.asdict(mode.latency),
    }


def _throughput_json(mode: Throughput) -> dict[str, Any]:
    redis = {
        "redis_commands_per_event": mode.commands_per_event,
        "redis_commands_sent_per_event": mode.sent_per_event,
        "redis_memory_bytes_per_device": mode.memory_per_device,
    }
    return {
        "events_per_second": mode.rate,
        "cpu_seconds_per_1k_events": mode.cpu_per_1k,
        "stack_cpu_seconds_per_1k_events": mode.stack_cpu_per_1k,
        "cores_busy": mode.cores_busy,
        **(redis if mode.commands_per_event else {}),
        "runs": [
            {
                **dataclasses.asdict(run),
                "events_per_second": run.window.rate,
                "cpu_seconds_per_1k_events": run.window.cpu_per_1k,
                "stack_cpu_seconds_per_1k_events": run.window.stack_cpu_per_1k,
                "cores_busy": run.window.cores_busy,
            }
            for run in mode.runs
        ],
    }


def _batch_json(batch: Batch) -> dict[str, Any]:
    return {
        "events_per_second": batch.rate,
        "events_per_cpu_second": batch.rate_per_cpu_second,
        "cpu_seconds_per_1k_events": batch.cpu_per_1k,
        "summary": batch.summary,
        "runs": [{**dataclasses.asdict(w), "events_per_second": w.rate} for w in batch.runs],
    }


def _baseline_json(results: Results, baseline: Baseline) -> dict[str, Any]:
    return {
        **_throughput_json(baseline),
        "revision": baseline.revision,
        "commit": baseline.commit,
        "ratio_to_passthrough": results.ratio(baseline.rate),
        "cpu_per_event_baseline_to_current": results.baseline_cpu_ratio(baseline),
        "cpu_per_event_target": CPU_TARGET,
    }


def as_json(results: Results) -> dict[str, Any]:
    baseline = (
        {}
        if results.baseline is None
        else {"enricher_exactly_once_baseline": _baseline_json(results, results.baseline)}
    )
    return {
        "machine": results.machine,
        "plan": results.plan,
        "modes": {
            "passthrough": {**_streaming_json(results.passthrough), "ratio_to_passthrough": 1.0},
            "enricher_exactly_once": {
                **_streaming_json(results.enricher),
                "ratio_to_passthrough": results.ratio(results.enricher.rate),
            },
            **baseline,
            "enricher_exactly_once_with_session_events": {
                **_throughput_json(results.sessions),
                "ratio_to_passthrough": results.ratio(results.sessions.rate),
            },
            "enricher_exactly_once_collector_format": {
                **_throughput_json(results.collector),
                "ratio_to_passthrough": results.ratio(results.collector.rate),
                "input_records": results.collector_requests,
            },
            "enricher_exactly_once_enriched_tsv": {
                **_throughput_json(results.enriched),
                "ratio_to_passthrough": results.ratio(results.enriched.rate),
            },
            "enricher_exactly_once_rekeying_hop_json": {
                **_throughput_json(results.hop),
                "ratio_to_passthrough": results.ratio(results.hop.rate),
                "order": [
                    {**dataclasses.asdict(order), "share": order.share}
                    for order in results.hop.orders
                ],
            },
            "enricher_at_least_once": UNSUPPORTED,
            "batch": {
                **_batch_json(results.batch),
                "ratio_to_passthrough": results.ratio(results.batch.rate),
                "ratio_to_codec_floor": results.floor_ratio(),
            },
            "codec_floor": _batch_json(results.floor),
        },
        "state_repair": {
            **dataclasses.asdict(results.repair),
            "events_per_second": results.repair.rate,
            "cpu_seconds_per_1k": results.repair.cpu_per_1k,
            "ratio_to_enricher_exactly_once": results.repair.rate / results.enricher.rate,
        },
        "redis_memory": {
            **dataclasses.asdict(results.memory),
            "bytes_per_device": results.memory.per_device,
        },
        "output_checks": [
            {**dataclasses.asdict(check), "matched": check.matched} for check in results.checks
        ],
        "targets": [dataclasses.asdict(t) for t in results.targets()],
    }


def _replace(path: Path, data: bytes) -> None:
    """Write next to ``path`` and rename, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def write(results: Results, folder: Path, name: str) -> tuple[str, list[Path]]:
    """``<name>.md``, ``<name>.json`` and, with matplotlib, ``<name>.png`` in ``folder``;
    returns the Markdown and the files written."""
    text = markdown(results)
    written = [folder / f"{name}.md", folder / f"{name}.json"]
    _replace(written[0], text.encode())
    _replace(written[1], (json.dumps(as_json(results), indent=2) + "\n").encode())
    if chart(results, folder / f"{name}.png"):
        written.append(folder / f"{name}.png")
    return text, written
