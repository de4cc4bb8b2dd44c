"""``enricher batch`` end to end, through the command line in a subprocess, plus the memory
bound of file mode in-process."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from typing import Any, Literal

import fastavro
import pytest
from support import (
    APPLICATION_ENTITY,
    APPLICATION_LIFECYCLE,
    CLIENT_SESSION,
    KINDS,
    SCREEN_ENTITY,
    START_MS,
    Fields,
    Json,
    contexts_of,
    entity_of,
    event_id,
    is_uuid4,
    read_jsonl,
    run_batch,
    run_cli,
    tracker_event,
    write_jsonl,
)

from enricher import batch
from enricher.enrich import Enricher
from enricher.session import SessionConfig, SessionEngine

SEED_DEVICE = "seed-device"


def summary(stdout: str) -> str:
    lines = stdout.strip().splitlines()
    assert lines, "no summary line"
    return lines[-1]


def sessions_of(path: Path) -> list[Json]:
    out = []
    for line in read_jsonl(path):
        entity = entity_of(line["event"])
        assert entity is not None, line
        out.append(entity)
    return out


# --- the seed's worked example --------------------------------------------------------------------


def test_seed_worked_example(tmp_path: Path) -> None:
    """fg 360 s, bg 15 s: ScreenView 0 s -> session 1, Background 3 s -> 1 (3 < 360),
    Foreground 30 s -> 2 (30 > 15)."""
    events = [
        tracker_event(event_id(1), START_MS, "screen_view"),
        tracker_event(event_id(2), START_MS + 3_000, "background", base64_ue=True),
        tracker_event(event_id(3), START_MS + 30_000, "foreground"),
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [(SEED_DEVICE, event) for event in events])
    result = run_batch(source, target, "--foreground-timeout", "360", "--background-timeout", "15")
    assert summary(result.stdout) == "events=3 devices=1 sessions=2 errors=0"
    lines = read_jsonl(target)
    assert [line["key"] for line in lines] == [SEED_DEVICE] * 3
    assert [line["event"]["eid"] for line in lines] == [event_id(n) for n in (1, 2, 3)]
    s = sessions_of(target)
    assert [e["sessionIndex"] for e in s] == [1, 1, 2]
    assert [e["eventIndex"] for e in s] == [1, 2, 1]
    assert [e["previousSessionId"] for e in s] == [None, None, s[0]["sessionId"]]
    assert s[0]["sessionId"] == s[1]["sessionId"] != s[2]["sessionId"]
    assert len({e["userId"] for e in s}) == 1
    assert [e["firstEventId"] for e in s] == [event_id(1), event_id(1), event_id(3)]
    assert [e["firstEventTimestamp"] for e in s] == [
        "2026-01-01T00:00:00.000Z",
        "2026-01-01T00:00:00.000Z",
        "2026-01-01T00:00:30.000Z",
    ]
    assert {e["storageMechanism"] for e in s} == {"LOCAL_STORAGE"}
    assert all(is_uuid4(e["userId"]) and is_uuid4(e["sessionId"]) for e in s)
    assert (tmp_path / "out.jsonl.errors.jsonl").read_text() == ""


# --- bad input ------------------------------------------------------------------------------------

GOOD_LINES: list[tuple[str, Fields]] = [
    ("d1", tracker_event(event_id(1), START_MS)),
    ("d2", tracker_event(event_id(2), START_MS, entities=[SCREEN_ENTITY], contexts_field="cx")),
    ("d1", tracker_event(event_id(3), START_MS + 1_000, "background")),
    ("d2", tracker_event(event_id(4), START_MS + 7_200_000, entities=[APPLICATION_ENTITY])),
]


def line(key: str, event: Fields) -> bytes:
    return json.dumps({"key": key, "event": event}, ensure_ascii=False).encode() + b"\n"


def raw(text: str) -> bytes:
    return text.encode() + b"\n"


# (reason, the line) in file order; None marks where the next good line goes.
MIXED: list[tuple[str | None, bytes]] = [
    (None, b""),
    ("not_json", raw("not json")),
    (None, b""),
    ("not_an_object", raw("[1, 2]")),
    ("missing_key", raw(json.dumps({"event": GOOD_LINES[0][1]}))),
    ("missing_key", raw(json.dumps({"key": 5, "event": GOOD_LINES[0][1]}))),
    ("missing_key", raw(json.dumps({"key": "", "event": GOOD_LINES[0][1]}))),
    ("invalid_event_id", line("d1", {"eid": "bad", "dtm": "1"})),
    ("skip", b"\n"),
    ("skip", b"   \n"),
    (None, b""),
    ("invalid_timestamp", line("d2", {"eid": event_id(9), "dtm": "-5"})),
    ("missing_timestamp", line("d2", {"eid": event_id(9)})),
    ("not_json", raw("[" * 50_000)),
    ("not_json", b'{"key": "d1", "event": "\xff"}\n'),
    ("invalid_ue", line("d1", {"eid": event_id(9), "dtm": "1", "e": "ue", "ue_pr": "{"})),
    ("invalid_contexts", line("d1", {"eid": event_id(9), "dtm": "1", "co": "[]"})),
    ("invalid_base64", line("d1", {"eid": event_id(9), "dtm": "1", "cx": "!"})),
    ("not_an_object", raw(json.dumps({"key": "d1", "event": "text"}))),
    ("non_string_field", raw(json.dumps({"key": "d1", "event": {"eid": event_id(9), "dtm": 1}}))),
    (None, b""),
]


def test_bad_lines_go_to_the_errors_file(tmp_path: Path) -> None:
    good = iter(GOOD_LINES)
    data = b"".join(line(*next(good)) if reason is None else text for reason, text in MIXED)
    mixed_in, mixed_out = tmp_path / "mixed.jsonl", tmp_path / "mixed-out.jsonl"
    clean_in, clean_out = tmp_path / "clean.jsonl", tmp_path / "clean-out.jsonl"
    mixed_in.write_bytes(data)
    write_jsonl(clean_in, GOOD_LINES)

    result = run_batch(mixed_in, mixed_out)
    bad = [(n, reason, text) for n, (reason, text) in enumerate(MIXED, 1) if reason]
    bad = [(n, reason, text) for n, reason, text in bad if reason != "skip"]
    assert summary(result.stdout) == f"events=4 devices=2 sessions=3 errors={len(bad)}"
    errors = read_jsonl(tmp_path / "mixed-out.jsonl.errors.jsonl")
    assert [(e["position"], e["reason"]) for e in errors] == [(n, r) for n, r, _ in bad]
    for error, (_, _, text) in zip(errors, bad, strict=True):
        assert error["record"] == text.decode("utf-8", errors="replace").rstrip("\n")
        assert isinstance(error["error"], str)
        assert error["error"]

    # The good lines come out exactly as they do without the bad ones around them.
    clean = run_batch(clean_in, clean_out)
    assert summary(clean.stdout) == "events=4 devices=2 sessions=3 errors=0"
    assert mixed_out.read_bytes() == clean_out.read_bytes()
    assert (tmp_path / "clean-out.jsonl.errors.jsonl").read_text() == ""
    out = read_jsonl(mixed_out)
    assert [(o["key"], o["event"]["eid"]) for o in out] == [(k, e["eid"]) for k, e in GOOD_LINES]
    for (_, sent), written in zip(GOOD_LINES, out, strict=True):
        key = "cx" if "cx" in sent else "co"
        assert {k: v for k, v in written["event"].items() if k != key} == {
            k: v for k, v in sent.items() if k != key
        }
        assert contexts_of(written["event"])[:-1] == (contexts_of(sent) if key in sent else [])
    assert [e["sessionIndex"] for e in sessions_of(mixed_out)] == [1, 1, 1, 2]


# --- exit 2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--foreground-timeout", "-5"], ["--foreground-timeout", "negative"]),
        (["--background-timeout", "nan"], ["--background-timeout", "finite"]),
        (["--foreground-timeout", "ten"], ["--foreground-timeout", "invalid float value"]),
        (["--storage-mechanism", "DISK"], ["--storage-mechanism", "DISK"]),
    ],
    ids=["negative", "nan", "not-a-number", "storage"],
)
def test_invalid_flag_exits_2(tmp_path: Path, flags: list[str], expected: list[str]) -> None:
    source = tmp_path / "in.jsonl"
    write_jsonl(source, GOOD_LINES)
    result = run_cli("batch", "--input", source, "--output", tmp_path / "out.jsonl", *flags)
    assert result.returncode == 2, result.stderr
    for word in expected:
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_input_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    result = run_cli("batch", "--input", missing, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "no such file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


# --- reproducible identifiers ---------------------------------------------------------------------


def generated(seed: int, devices: int, events: int) -> list[tuple[str, Fields]]:
    """Devices' timelines interleaved by time: lifecycle events, entities, co and cx."""
    rng = random.Random(seed)
    records: list[tuple[int, str, Fields]] = []
    number = 0
    for d in range(devices):
        t = START_MS + rng.randint(0, 3_600_000)
        field: Literal["co", "cx"] = rng.choice(("co", "cx"))
        for _ in range(events):
            number += 1
            t += rng.choice((0, 1_000, 15_000, 15_001, 360_000, 360_001, 2_000_000))
            kind = rng.choice(KINDS)
            entities = [SCREEN_ENTITY] if rng.random() < 0.3 else None
            fields = tracker_event(
                event_id(number), t, kind, entities=entities, contexts_field=field
            )
            records.append((t, f"device-{d}", fields))
    records.sort(key=lambda record: record[0])
    return [(key, fields) for _, key, fields in records]


def test_same_salt_same_bytes_other_salt_other_ids(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    write_jsonl(source, generated(seed=7, devices=20, events=15))
    outs = {name: tmp_path / f"{name}.jsonl" for name in ("a1", "a2", "b")}
    timeouts = ("--foreground-timeout", "360", "--background-timeout", "15")
    runs = [run_batch(source, outs[name], *timeouts, salt=name[0]) for name in outs]
    assert len({summary(r.stdout) for r in runs}) == 1
    assert outs["a1"].read_bytes() == outs["a2"].read_bytes()
    a, b = sessions_of(outs["a1"]), sessions_of(outs["b"])
    assert len(a) == len(b) == 300
    fields = ("sessionIndex", "eventIndex", "firstEventId", "firstEventTimestamp")
    for x, y in zip(a, b, strict=True):
        assert [x[f] for f in fields] == [y[f] for f in fields]
        assert x["userId"] != y["userId"]
        assert x["sessionId"] != y["sessionId"]
        assert (x["previousSessionId"] is None) == (y["previousSessionId"] is None)
        assert x["previousSessionId"] is None or x["previousSessionId"] != y["previousSessionId"]
    assert max(e["sessionIndex"] for e in a) > 1  # the timeline really renews sessions
    # Everything but the ids is the same.
    strip = ("userId", "sessionId", "previousSessionId")
    for x, y in zip(read_jsonl(outs["a1"]), read_jsonl(outs["b"]), strict=True):
        ex, ey = entity_of(x["event"]), entity_of(y["event"])
        assert ex is not None
        assert ey is not None
        assert {k: v for k, v in ex.items() if k not in strip} == {
            k: v for k, v in ey.items() if k not in strip
        }


# --- Avro files -----------------------------------------------------------------------------------


def write_avro(path: Path, records: list[tuple[str, Fields]]) -> None:
    with path.open("wb") as out:
        fastavro.writer(
            out,
            batch.RAW_FILE_SCHEMA,
            ({"key": key, "event": {"payload": fields}} for key, fields in records),
        )


def read_avro(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as stream:
        return [record for record in fastavro.reader(stream) if isinstance(record, dict)]


def test_avro_in_and_out_match_json_lines(tmp_path: Path) -> None:
    records = generated(seed=11, devices=10, events=12)
    records.insert(5, ("device-0", {"eid": "not-a-uuid", "dtm": "1"}))
    records.insert(9, ("", tracker_event(event_id(999), START_MS)))
    write_jsonl(tmp_path / "in.jsonl", records)
    write_avro(tmp_path / "in.avro", records)
    flags = ("--lifecycle-context", "--foreground-timeout", "360", "--background-timeout", "15")

    as_json = run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", *flags)
    as_avro = run_batch(tmp_path / "in.avro", tmp_path / "out.avro", *flags)
    avro_to_json = run_batch(tmp_path / "in.avro", tmp_path / "avro-out.jsonl", *flags)
    assert summary(as_json.stdout) == summary(as_avro.stdout) == summary(avro_to_json.stdout)
    assert summary(as_json.stdout).endswith(" errors=2")
    assert (tmp_path / "avro-out.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()

    expected = read_jsonl(tmp_path / "out.jsonl")
    got = read_avro(tmp_path / "out.avro")
    assert len(got) == len(expected) == len(records) - 2
    for record, line in zip(got, expected, strict=True):
        assert record["key"] == line["key"]
        event = record["event"]
        assert event["payload"] == line["event"]
        assert list(event["payload"]) == list(line["event"])  # field order kept
        assert event["client_session"] == entity_of(line["event"])
        assert event["application_lifecycle"] == entity_of(line["event"], APPLICATION_LIFECYCLE)
        assert event["client_session"] is not None
        assert event["application_lifecycle"] is not None

    json_errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    avro_errors = read_jsonl(tmp_path / "out.avro.errors.jsonl")
    assert [(e["position"], e["reason"]) for e in avro_errors] == [
        (6, "invalid_event_id"),
        (10, "missing_key"),
    ]
    assert [(e["position"], e["reason"]) for e in json_errors] == [
        (e["position"], e["reason"]) for e in avro_errors
    ]
    assert avro_errors[0]["record"] == {
        "key": "device-0",
        "event": {"payload": {"eid": "not-a-uuid", "dtm": "1"}},
    }


# --- entity flags ---------------------------------------------------------------------------------


def test_entity_flags(tmp_path: Path) -> None:
    theirs = {
        "schema": "iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-1",
        "data": {"userId": "t", "sessionId": "t", "sessionIndex": 9, "storageMechanism": "SQLITE"},
    }
    records = [
        ("d", tracker_event(event_id(1), START_MS, entities=[theirs, SCREEN_ENTITY])),
        ("d", tracker_event(event_id(2), START_MS + 1, contexts_field="cx", entities=[])),
        ("d", tracker_event(event_id(3), START_MS + 2, "background")),
    ]
    source = tmp_path / "in.jsonl"
    write_jsonl(source, records)
    run_batch(source, tmp_path / "none.jsonl", "--no-session-context")
    assert [line["event"] for line in read_jsonl(tmp_path / "none.jsonl")] == [
        fields for _, fields in records
    ]
    run_batch(source, tmp_path / "keep.jsonl", "--keep-tracker-entities")
    kept = [line["event"] for line in read_jsonl(tmp_path / "keep.jsonl")]
    assert kept[0] == records[0][1]
    assert [e["schema"] for e in contexts_of(kept[1])] == [CLIENT_SESSION]
    assert "co" not in kept[1]
    session = entity_of(kept[2])
    assert session is not None
    assert session["eventIndex"] == 3


# --- memory ---------------------------------------------------------------------------------------

DEVICES = 500


def write_lines(path: Path, count: int) -> None:
    """``count`` small events over the same DEVICES devices, a second apart per device."""
    head = '{"key":"device-%d","event":{"e":"pv","eid":"%s","dtm":"%d","aid":"app","p":"mob"}}\n'
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            out.write(head % (n % DEVICES, event_id(n), START_MS + n))


def peak_memory(tmp_path: Path, count: int) -> tuple[int, batch.Summary]:
    source, target = tmp_path / f"in-{count}.jsonl", tmp_path / f"out-{count}.jsonl"
    write_lines(source, count)
    enricher = Enricher(SessionEngine(SessionConfig(salt="s")))
    tracemalloc.start()
    try:
        result = batch.run(enricher, source, target, batch.MemoryStore())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert target.stat().st_size > 200 * count  # the output really was written
    return peak, result


def test_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """Ten times the lines over the same devices: the peak stays where it was. Both runs span
    several chunks; sizes are kept modest because tracemalloc slows a run down several times."""
    small, large = 2_000, 20_000
    small_peak, small_run = peak_memory(tmp_path, small)
    large_peak, large_run = peak_memory(tmp_path, large)
    assert small_run.line() == f"events={small} devices={DEVICES} sessions={DEVICES} errors=0"
    assert large_run.line() == f"events={large} devices={DEVICES} sessions={DEVICES} errors=0"
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)
    # Far below what holding the output would take.
    assert large_peak < (tmp_path / f"out-{large}.jsonl").stat().st_size / 4
