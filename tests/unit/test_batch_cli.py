"""``enricher batch`` end to end, through the command line in a subprocess, plus the memory
bound of file mode in-process."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import fastavro
import pytest
from hostile import stream_answer
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    APPLICATION_ENTITY,
    APPLICATION_LIFECYCLE,
    CLIENT_SESSION,
    CONTEXTS,
    KINDS,
    SCREEN,
    SCREEN_ENTITY,
    START_MS,
    UNBOUNDED,
    Fields,
    Json,
    b64url,
    compact,
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
from enricher.codecs.tracker import MAX_DEPTH
from enricher.enrich import Enriched, Enricher
from enricher.errors import BadInput
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
    assert summary(result.stdout) == "events=3 devices=1 sessions=2 errors=0 blank=0"
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


def contexts(depth: int, leaf: str = '"leaf"', field: str = "co") -> str:
    """A ``co`` (or ``cx``) of one entity whose JSON nests ``depth`` levels, envelope included,
    around ``leaf`` (JSON text, written as is)."""
    levels = depth - 3
    data = "[" * (levels // 2) + '{"k":' * (levels - levels // 2)
    data += leaf + "}" * (levels - levels // 2) + "]" * (levels // 2)
    text = f'{{"schema":"{CONTEXTS}","data":[{{"schema":"{SCREEN}","data":{data}}}]}}'
    return b64url(text) if field == "cx" else text


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
    ("invalid_key", raw(json.dumps({"key": "d1\udc00", "event": GOOD_LINES[0][1]}))),
    ("too_deep", line("d1", {"eid": event_id(9), "dtm": "1", "co": contexts(MAX_DEPTH + 1)})),
    ("invalid_number", line("d1", {"eid": event_id(9), "dtm": "1", "co": contexts(5, "NaN")})),
    ("skip", b"\t\r\n"),
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
    blank = sum(reason == "skip" for reason, _ in MIXED)
    assert blank == 3
    assert summary(result.stdout) == (
        f"events=4 devices=2 sessions=3 errors={len(bad)} blank={blank}"
    )
    errors = read_jsonl(tmp_path / "mixed-out.jsonl.errors.jsonl")
    assert [(e["position"], e["reason"]) for e in errors] == [(n, r) for n, r, _ in bad]
    for error, (_, _, text) in zip(errors, bad, strict=True):
        assert error["record"] == text.decode("utf-8", errors="replace").rstrip("\n")
        assert isinstance(error["error"], str)
        assert error["error"]
        assert error["size"] == len(text.rstrip(b"\n"))
        assert error["sha256"] == hashlib.sha256(text.rstrip(b"\n")).hexdigest()
        assert error["truncated"] is False

    # The good lines come out exactly as they do without the bad ones around them.
    clean = run_batch(clean_in, clean_out)
    assert summary(clean.stdout) == "events=4 devices=2 sessions=3 errors=0 blank=0"
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


def test_blank_lines_are_counted(tmp_path: Path) -> None:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = b"".join(line(*record) for record in GOOD_LINES)
    source.write_bytes(
        b"\n" + good + b"   \n\r\n\t \n" + line("d1", {"eid": "bad", "dtm": "1"})[:-1]
    )
    result = run_batch(source, target)
    assert summary(result.stdout) == "events=4 devices=2 sessions=3 errors=1 blank=4"
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["position"], e["reason"]) for e in errors] == [(9, "invalid_event_id")]


def test_an_event_far_ahead_of_the_reference_time_is_dead_lettered(tmp_path: Path) -> None:
    """As the service refuses an event time far ahead of its record's Kafka timestamp, file
    mode refuses one far ahead of its reference time (default: now)."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    future = {"e": "se", "eid": "10000000-0000-4000-8000-000000000001", "dtm": "253402300799999"}
    source.write_bytes(b"".join(line(*record) for record in GOOD_LINES) + line("d9", future))
    result = run_batch(source, target)
    assert summary(result.stdout).startswith("events=4 devices=2 sessions=3 errors=1")
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [e["reason"] for e in errors] == ["future_timestamp"]
    # Against a reference time late enough, the same event is enriched.
    result = run_batch(source, target, "--reference-time", "9999-12-31T00:00:00Z")
    assert summary(result.stdout).startswith("events=5 devices=3 sessions=4 errors=0")


ROGUE_KEYS: list[bytes] = [
    b'"k\\udc00"',  # an escaped lone surrogate (the report's repro)
    b'"k\xed\xa0\x80"',  # the same surrogate as (CESU-8) bytes
    b'"\\ud83d"',  # half an emoji
    b'"k\xff"',  # not UTF-8 at all
    b'"k\xc3"',  # a UTF-8 sequence cut short
]


def test_a_key_that_is_not_unicode_is_dead_lettered_and_the_run_goes_on(tmp_path: Path) -> None:
    """A device id must be UTF-8 text, as the service requires of a record's key: anything
    else is `invalid_key`, and every line after it is still enriched."""
    event = compact(tracker_event(event_id(9), START_MS))
    rogue = [b'{"key":' + key + b',"event":' + event.encode() + b"}\n" for key in ROGUE_KEYS]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(
        line(*GOOD_LINES[0]) + b"".join(rogue) + b"".join(line(*g) for g in GOOD_LINES[1:])
    )
    result = run_batch(source, target)
    assert summary(result.stdout) == (
        f"events=4 devices=2 sessions=3 errors={len(ROGUE_KEYS)} blank=0"
    )
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["position"], e["reason"]) for e in errors] == [
        (n, "invalid_key") for n in range(2, 2 + len(ROGUE_KEYS))
    ]
    assert [o["event"]["eid"] for o in read_jsonl(target)] == [e["eid"] for _, e in GOOD_LINES]


# Event values as a Kafka record would carry them, with what the service answers: the same
# codec decides, so file mode must give the same reason for the same bytes.
HOSTILE_EVENTS: list[bytes] = [
    b'{"eid":"%s","dtm":"1","ti":"a\\ud800"}',
    b'{"eid":"%s","dtm":"1","ti":"a\xed\xa0\x80"}',
    b'{"eid":"%s","dtm":"1","a\\udc00":"x"}',
    b'{"eid":"%s","dtm":"1","a\xed\xb0\x80":"x"}',
    b'{"eid":"%s","dtm":"1","ti":"a\xff"}',
    b'["%s","\xed\xa0\x80"]',
    b'"\\udc00%s"',
    b'{"eid":"%s","dtm":"1","ti":NaN}',
    b'{"eid":"%s","dtm":"1","co":"{\\"schema\\":\\"x\\",\\"data\\":[{\\"t\\":\\"\\\\ud83d\\"}]}"}',
    b'{"eid":"%s","dtm":"1","co":"{\\"schema\\":\\"x\\",\\"data\\":[{\\"t\\":NaN}]}"}',
    b'{"eid":"%s","dtm":"1","co":"{\\"schema\\":\\"x\\",\\"data\\":[{\\"t\\":-1e400}]}"}',
    b'{"eid":"%s","dtm":"1","co":"{\\"schema\\":\\"x\\",\\"data\\":[{\\"t\\":1.5}]}"}',
    b'{"eid":"%s","dtm":"1","e":"ue","ue_pr":"{\\"data\\":{\\"schema\\":\\"s\\",\\"n\\":Infinity}}"}',
]


def test_file_mode_decodes_events_as_the_service_does(tmp_path: Path) -> None:
    """Lone surrogates (escaped or as CESU-8 bytes) in field values and names, bytes that are
    not UTF-8, NaN: file mode used to read its lines with the standard library alone and
    accepted what the service refuses."""
    values = [v % event_id(n).encode() for n, v in enumerate(HOSTILE_EVENTS, 1)]
    expected = [stream_answer(v) for v in values]
    assert expected.count(None) == 2  # the escaped surrogate and the float in co are fine
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(b"".join(b'{"key":"d","event":' + v + b"}\n" for v in values))
    run_batch(source, target)
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    got: list[str | None] = [None] * len(values)
    for error in errors:
        got[error["position"] - 1] = error["reason"]
    assert got == expected
    for written in read_jsonl(target):
        assert contexts_of(written["event"])[-1]["schema"] == CLIENT_SESSION


@pytest.mark.parametrize("output", ["out.jsonl", "out.avro"])
def test_deep_and_non_finite_contexts_are_dead_lettered(tmp_path: Path, output: str) -> None:
    """Contexts one level beyond MAX_DEPTH crashed the run (orjson cannot write them); NaN,
    Infinity and 1e400 were written back as they came, which is not JSON. Both are dead
    letters now; at the limit the event is enriched, to JSON and to Avro."""
    cases: list[tuple[str | None, dict[str, str]]] = [
        (None, {"co": contexts(MAX_DEPTH)}),
        (None, {"cx": contexts(MAX_DEPTH, field="cx")}),
        (None, {"co": contexts(MAX_DEPTH, "1.25")}),
        ("too_deep", {"co": contexts(MAX_DEPTH + 1)}),
        ("too_deep", {"cx": contexts(600, field="cx")}),
        ("too_deep", {"co": contexts(1021 + 3)}),
        ("invalid_number", {"co": contexts(4, "NaN")}),
        ("invalid_number", {"co": contexts(4, "-Infinity")}),
        ("invalid_number", {"cx": contexts(4, "Infinity", field="cx")}),
        ("invalid_number", {"co": contexts(4, "1e400")}),
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / output
    write_jsonl(
        source,
        [
            ("d", tracker_event(event_id(n), START_MS + n, "struct", extra=extra))
            for n, (_, extra) in enumerate(cases, 1)
        ],
    )
    result = run_batch(source, target)
    bad = [(n, reason) for n, (reason, _) in enumerate(cases, 1) if reason]
    assert summary(result.stdout) == f"events=3 devices=1 sessions=1 errors={len(bad)} blank=0"
    errors = read_jsonl(target.with_name(target.name + ".errors.jsonl"))
    assert [(e["position"], e["reason"]) for e in errors] == bad
    events = (
        [record["event"]["payload"] for record in read_avro(target)]
        if output.endswith(".avro")
        else [json.loads(text, parse_constant=not_json)["event"] for text in target.open("rb")]
    )
    for event, (_, extra) in zip(events, [c for c in cases if c[0] is None], strict=True):
        entities = contexts_of(event)
        assert [e["schema"] for e in entities] == [SCREEN, CLIENT_SESSION]
        assert entities[0] == contexts_of(extra)[0]


def not_json(constant: str) -> None:
    raise AssertionError(f"{constant} in the output")


def test_a_huge_bad_line_is_capped_in_the_errors_file(tmp_path: Path) -> None:
    """A bad line of megabytes keeps its first 64 KiB in its error record (never cutting a
    character), with the size and SHA-256 of the whole: the errors file stays small."""
    pad = "é" * 2_000_000 + "x"  # two bytes a character: the cut falls inside one
    huge = line("d", {"eid": "not-a-uuid", "dtm": "1", "pad": pad})[:-1]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(
        huge
        + b"\n"
        + line(*GOOD_LINES[0])
        + b'{"key":"d","event":['
        + b"\xff" * 3_000_000
        + b"]}\n"
    )
    result = run_batch(source, target)
    assert summary(result.stdout) == "events=1 devices=1 sessions=1 errors=2 blank=0"
    errors_file = tmp_path / "out.jsonl.errors.jsonl"
    assert errors_file.stat().st_size < 2 * 3 * batch.ERROR_RECORD_BYTES
    first, second = read_jsonl(errors_file)
    assert first["reason"] == "invalid_event_id"
    assert first["truncated"] is True
    assert first["size"] == len(huge) > 4_000_000
    assert first["sha256"] == hashlib.sha256(huge).hexdigest()
    kept = first["record"].encode()
    assert batch.ERROR_RECORD_BYTES - 4 < len(kept) <= batch.ERROR_RECORD_BYTES
    assert huge.startswith(kept)  # whole characters only: no replacement character
    assert second["reason"] == "not_json"
    assert second["truncated"] is True
    assert second["size"] == len(b'{"key":"d","event":[]}') + 3_000_000
    assert len(second["record"]) <= batch.ERROR_RECORD_BYTES


@pytest.mark.parametrize("output", ["out.jsonl", "out.avro"])
def test_an_event_that_cannot_be_encoded_is_an_error_and_leaves_no_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    """Whatever the encoder refuses is the event's fault, as in the service: a `not_encodable`
    error record, the device's state as if the event never came, and the run goes on."""
    real = Enriched.fields

    def refusing(enriched: Enriched, *args: Any, **kwargs: Any) -> Fields:
        if enriched.event.event_id == event_id(2):
            raise TypeError("Recursion limit reached")
        return real(enriched, *args, **kwargs)

    monkeypatch.setattr(Enriched, "fields", refusing)
    source, target = tmp_path / "in.jsonl", tmp_path / output
    write_jsonl(source, [("d", tracker_event(event_id(n), START_MS + n)) for n in (1, 2, 3)])
    enricher = Enricher(SessionEngine(SessionConfig(salt="s")))
    result = batch.run(enricher, source, target, batch.MemoryStore(), UNBOUNDED)
    assert result.line() == "events=2 devices=1 sessions=1 errors=1 blank=0"
    (error,) = read_jsonl(target.with_name(target.name + ".errors.jsonl"))
    assert (error["position"], error["reason"]) == (2, "not_encodable")
    if output.endswith(".avro"):
        sessions = [r["event"]["client_session"] for r in read_avro(target)]
    else:
        sessions = sessions_of(target)
    assert [s["eventIndex"] for s in sessions] == [1, 2]


def test_a_huge_bad_avro_record_is_capped_too(tmp_path: Path) -> None:
    source, target = tmp_path / "in.avro", tmp_path / "out.jsonl"
    bad = {"eid": "not-a-uuid", "dtm": "1", "pad": "x" * 1_000_000}
    write_avro(source, [("d", bad), GOOD_LINES[0]])
    result = run_batch(source, target)
    assert summary(result.stdout) == "events=1 devices=1 sessions=1 errors=1 blank=0"
    (error,) = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    whole = json.dumps({"key": "d", "event": {"payload": bad}}, ensure_ascii=False).encode()
    assert error["truncated"] is True
    assert error["size"] == len(whole)
    assert error["sha256"] == hashlib.sha256(whole).hexdigest()
    assert whole.startswith(error["record"].encode())


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
    assert summary(as_json.stdout).endswith(" errors=2 blank=0")
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
        result = batch.run(enricher, source, target, batch.MemoryStore(), UNBOUNDED)
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
    assert small_run.line() == (
        f"events={small} devices={DEVICES} sessions={DEVICES} errors=0 blank=0"
    )
    assert large_run.line() == (
        f"events={large} devices={DEVICES} sessions={DEVICES} errors=0 blank=0"
    )
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)
    # Far below what holding the output would take, beyond the output file's fixed buffer.
    output_size = (tmp_path / f"out-{large}.jsonl").stat().st_size
    assert large_peak < output_size / 4 + batch.WRITE_BUFFER_BYTES


def decoded(decode: Callable[[], tuple[str | None, Any]]) -> object:
    """A line's key, event and fields in order, or the refusal's reason and detail."""
    try:
        key, event = decode()
    except BadInput as error:
        return (error.reason, error.detail)
    return key, event, list(event.fields.items())


line_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.text(),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
line_events = st.one_of(
    line_values,
    st.dictionaries(
        st.sampled_from(["e", "dtm", "x", "co", "\ud800"]) | st.text(max_size=3),
        st.text(st.characters(codec=None), max_size=4) | line_values,
        max_size=4,
    ).map(lambda extra: {"eid": event_id(1), "dtm": str(START_MS), **extra}),
)
line_objects = st.fixed_dictionaries(
    {},
    optional={
        "key": st.sampled_from(["d", "", None, 7]),
        "event": line_events,
        "x": line_values | st.just(float("inf")),
    },
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=48),
        st.builds(
            lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(
                "utf-8", "surrogatepass"
            ),
            line_objects,
            st.booleans(),
        ),
    ),
    st.booleans(),
)
def test_the_usual_line_is_read_as_any_line_is(line: bytes, keyed: bool) -> None:
    """msgspec reads the usual line; what it reads, it reads as the general reader does (the
    same key, event and fields in order, or the same refusal)."""
    assert decoded(lambda: batch.decode_line(line, keyed=keyed)) == decoded(
        lambda: batch._decode_line(line, keyed=keyed)
    )


EVENT = b'{"eid":"%s","dtm":"1767225600000"}' % event_id(1).encode()


@pytest.mark.parametrize(
    "line",
    [
        b'{"key":"d","x":"\xff","event":%s}' % EVENT,  # not UTF-8 in a member of its own
        b'{"key":"d","x":{"\xff":1},"event":%s}' % EVENT,
        b'{"key":"d","x":"\xc0\xaf","event":%s}' % EVENT,  # overlong UTF-8
        b'{"key":"d","event":{"a":"\xff"},"event":%s}' % EVENT,  # an event given twice
        b'{"key":"d","event":5,"event":%s}' % EVENT,
        b'{"key":"d","event":%s,"x":1%s}' % (EVENT, b"0" * 4300),  # beyond int's 4300 digits
        b'{"key":"d","event":%s,"x":1e400}' % EVENT,
        b'{"key":5,"key":"d","event":%s}' % EVENT,
        b'{"key":"d","event":%s,"key":""}' % EVENT,
        b'{"key":"d","event":{"eid":"x","eid":"%s","dtm":"1767225600000"}}' % event_id(1).encode(),
    ],
)
@pytest.mark.parametrize("keyed", [True, False])
def test_a_line_msgspec_would_only_partly_read_gets_the_general_readers_answer(
    line: bytes, keyed: bool
) -> None:
    """Members msgspec skips without checking, or reads twice: the answer is the general
    reader's, whatever it is."""
    assert decoded(lambda: batch.decode_line(line, keyed=keyed)) == decoded(
        lambda: batch._decode_line(line, keyed=keyed)
    )
