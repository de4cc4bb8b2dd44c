"""Malformed input goes to the dead-letter topic, intact and labelled; good input is unaffected.

Bad records are interleaved with the good traffic of the same devices (same keys, so same
partitions), so a bad record that touched a device's state would show in the comparison of
the good output with `enricher batch` on the good records alone."""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from pathlib import Path

import pytest
from feeding import Headers, Input, as_messages, produce_input, traffic
from instances import Fleet
from progress import Progress
from reference import BatchReference, check_output, read_all
from service_settings import service_env
from stack import Stack

from enricher.service import DLQ_HEADER_PREFIX

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

MAX_MESSAGE_BYTES = 2000
DONE_TIMEOUT = 120.0


def bad_records(
    template: dict[str, str], keys: list[str], rng: random.Random
) -> list[tuple[str, Input]]:
    """(expected reason, record) for every kind of bad input the service must dead-letter."""

    def event(**changes: object) -> dict[str, object]:
        fields: dict[str, object] = {**template, "eid": str(uuid.UUID(int=rng.getrandbits(128)))}
        for name, value in changes.items():
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        return fields

    def record(value: bytes | None, headers: Headers = (), key: bytes | None = None) -> Input:
        return Input(rng.choice(keys).encode() if key is None else key, value, headers)

    def unkeyed(value: bytes | None, headers: Headers = ()) -> Input:
        return Input(None, value, headers)

    def dump(fields: dict[str, object]) -> bytes:
        return json.dumps(fields, separators=(",", ":")).encode()

    good = dump(event())
    origin: Headers = (("origin", b"collector-7"), ("empty", None))
    return [
        ("not_json", record(b"\xff\xfe\x00\x9c binary garbage")),
        ("not_json", record(b'{"e":"pv","eid":', origin)),
        ("not_json", record(None)),  # a tombstone
        ("not_an_object", record(b'["not", "an", "object"]')),
        ("missing_key", unkeyed(good, origin)),
        ("missing_key", record(dump(event()), key=b"")),
        ("invalid_key", record(dump(event()), key=b"\xff\xfedevice")),
        ("missing_timestamp", record(dump(event(dtm=None, stm=None, ttm=None)))),
        ("invalid_timestamp", record(dump(event(dtm="yesterday")), origin)),
        ("invalid_timestamp", record(dump(event(dtm="-1767225600000")))),
        ("invalid_timestamp", record(dump(event(dtm="99999999999999999")))),
        ("future_timestamp", record(dump(event(dtm="253402300799999")))),
        ("future_timestamp", record(dump(event(dtm=None, ttm="4102444800000")), origin)),
        ("invalid_ue", record(dump(event(e="ue", ue_pr='{"schema":"iglu:x","data":{')))),
        ("invalid_ue", record(dump(event(e="ue", ue_pr='{"schema":"iglu:x","data":[]}')))),
        ("invalid_contexts", record(dump(event(co='{"schema":"iglu:c","data":[{]}')))),
        ("invalid_contexts", record(dump(event(co='{"schema":"iglu:c","data":"x"}')))),
        ("invalid_base64", record(dump(event(cx="!!not*base64@@")))),
        ("invalid_base64", record(dump(event(e="ue", ue_pr=None, ue_px="%%%")), origin)),
        ("missing_event_id", record(dump(event(eid=None)))),
        ("invalid_event_id", record(dump(event(eid="not-a-uuid")))),
        ("oversize", record(dump(event(pad="x" * 4600)), origin)),
        ("non_string_field", record(dump(event(dtm=1767225600000)))),
        ("non_string_field", record(dump(event(extra={"nested": True})))),
    ]


def test_bad_records_go_to_the_dead_letter_topic_and_good_ones_are_unaffected(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    rng = random.Random(31)
    items = traffic(3_000, 300, seed=31)
    first, second = items[:2_500], items[2_500:]
    good = as_messages(first)
    assert all(len(m.value or b"") < MAX_MESSAGE_BYTES for m in good)
    bad = bad_records(items[0][1], sorted({key for key, _ in items}), rng)
    oversize = next(r for reason, r in bad if reason == "oversize")
    assert len(oversize.value or b"") > 2 * MAX_MESSAGE_BYTES

    # Interleave: the bad records spread over the good traffic, devices' streams included.
    mixed = list(good)
    expected_reasons: list[str | None] = [None] * len(mixed)
    step = len(good) // (len(bad) + 1)
    for number, (reason, record) in enumerate(reversed(bad)):
        position = (len(bad) - number) * step
        mixed.insert(position, record)
        expected_reasons.insert(position, reason)

    reference = BatchReference(items, tmp_path)
    topics = stack.new_topics("dlq", partitions=6)
    env = service_env(stack, topics, ENRICHER_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES))
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("dlq-a", env).start()

    sent = produce_input(stack, topics.input, mixed)
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(mixed))
    # Still serving: more good traffic after the bad records.
    assert instance.running
    sent_after = produce_input(stack, topics.input, as_messages(second))
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(mixed) + len(second))
    instance.wait_counted(len(mixed) + len(second))
    assert instance.running

    reasons_by_metric = {
        reason: instance.metric("enricher_records_dead_lettered_total", f'reason="{reason}"')
        for reason in {r for r, _ in bad}
    }
    assert instance.stop() == 0, instance.tail()

    output, dead = read_all(stack, topics)
    good_sent = [s for s, reason in zip(sent, expected_reasons, strict=True) if reason is None]
    check_output(output, reference.result(), good_sent + sent_after)

    # Every dead letter: the original key, value and headers, then the error headers.
    expected_by_offset = {
        (s.partition, s.offset): (s, reason)
        for s, reason in zip(sent, expected_reasons, strict=True)
        if reason is not None
    }
    seen: Counter[tuple[int, int]] = Counter()
    problems = []
    for letter in dead:
        errors = {
            name[len(DLQ_HEADER_PREFIX) :]: (value or b"").decode()
            for name, value in letter.headers
            if name.startswith(DLQ_HEADER_PREFIX)
        }
        where = (int(errors.get("partition", -1)), int(errors.get("offset", -1)))
        seen[where] += 1
        found = expected_by_offset.get(where)
        if found is None:
            problems.append(f"dead letter for an unexpected input {where}: {letter}")
            continue
        source, reason = found
        original = letter.headers[: len(source.headers)]
        # A dead letter over the limit carries a truncated copy of its value, identified.
        truncated = errors.get("truncated") == "true"
        value = source.value or b""
        checks = {
            "reason": errors.get("reason") == reason,
            "topic": errors.get("topic") == topics.input,
            "message": bool(errors.get("message")),
            "key": letter.key == source.key,
            "value": letter.value == source.value
            or (truncated and value.startswith(letter.value or b"")),
            "truncated only if too large": truncated == (reason == "oversize"),
            "size": sum(len(n) + len(v or b"") for n, v in letter.headers)
            + len(letter.key or b"")
            + len(letter.value or b"")
            <= MAX_MESSAGE_BYTES,
            "original headers first": original == source.headers,
            "only error headers added": all(
                name.startswith(DLQ_HEADER_PREFIX)
                for name, _ in letter.headers[len(source.headers) :]
            ),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            problems.append(f"{reason} at {where}: wrong {failed}: {errors} {letter}")
    assert not problems, "\n".join(problems)

    # Each input offset ends up in exactly one place: the output (by event id) or the DLQ.
    output_eids = {json.loads(r.value or b"")["eid"] for r in output}
    published = Counter(
        (s.partition, s.offset)
        for s in good_sent + sent_after
        if json.loads(s.value or b"")["eid"] in output_eids
    )
    everywhere = published + seen
    all_offsets = {(s.partition, s.offset) for s in sent + sent_after}
    assert set(everywhere) == all_offsets
    assert {k: n for k, n in everywhere.items() if n != 1} == {}
    assert len(dead) == len(bad)

    assert reasons_by_metric == dict(Counter(reason for reason, _ in bad))
