"""Hostile records through a live ``enricher run``: a fixed set of a few hundred generated
records (the generators of ``tests/hostile.py``, derandomized) with hostile keys, values
and headers. Every input offset ends up in exactly one of the output and the dead-letter
topic, with the answer file mode gives the same key and value; the output is strict JSON;
and the service is still up and healthy afterwards.
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from typing import Any

import hostile as fuzz
import pytest
from feeding import Headers, Input, produce_input
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from instances import Fleet
from progress import Progress
from reference import read_all
from service_settings import service_env
from stack import Stack
from support import START_MS, event_id

from enricher.codecs import tracker
from enricher.service import DLQ_HEADER_PREFIX

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

RECORDS = 300
MAX_RECORD_BYTES = 95_000  # the service's other limits (whole records, produce sizes) aside
DONE_TIMEOUT = 180.0

DEVICES = [f"fuzz-device-{n}".encode() for n in range(12)]
BAD_KEYS = [None, b"", b"k\xff", b"k\xed\xa0\x80", b"\xc3", b"\xed\xb0\x80", b"k" * 30_000]
ANY_KEYS = st.binary(min_size=1, max_size=12) | st.text(max_size=8).map(lambda t: t.encode())
HEADER_NAMES = st.one_of(
    st.sampled_from(["trace", "enricher.error.reason", "enricher.error.offset", ""]),
    st.text(st.characters(codec="utf-8"), max_size=8),
)
HEADERS = st.lists(
    st.tuples(HEADER_NAMES, st.none() | st.binary(max_size=16) | st.just(b"\xff" * 2000)),
    max_size=3,
).map(tuple)


def hostile_records(count: int) -> list[Input]:
    """``count`` records, the same ones on every run (derandomized generation only)."""
    records: list[Input] = []

    @settings(
        max_examples=2 * count,  # some come out too big for the service's other limits
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def draw(data: st.DataObject) -> None:
        number = len(records) + 1
        # Every ninth record has one of the hostile keys, in turn; more have drawn ones.
        drawn = data.draw(fuzz.mostly(st.sampled_from(DEVICES), ANY_KEYS, times=8))
        key = BAD_KEYS[number // 9 % len(BAD_KEYS)] if number % 9 == 4 else drawn
        value = data.draw(fuzz.event_value(number))
        headers: Headers = data.draw(HEADERS)
        size = len(key or b"") + len(value) + sum(len(n) + len(v or b"") for n, v in headers)
        if size <= MAX_RECORD_BYTES and len(records) < count:
            records.append(Input(key, value, headers))

    draw()
    return records


def expected_answer(key: bytes | None, value: bytes) -> set[str | None]:
    """What file mode answers for the same key and value (None: enriched)."""
    if not key:
        return {"missing_key"}
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return {"invalid_key"}
    return {fuzz.stream_answer(value)}


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        status: int = response.status
        return status


def test_hostile_records_through_enricher_run(stack: Stack, fleet: Fleet) -> None:
    records = hostile_records(RECORDS)
    assert len(records) == RECORDS
    assert max(len(r.value or b"") for r in records) < 100_000
    topics = stack.new_topics("fuzz", partitions=3)
    env = service_env(stack, topics, ENRICHER_LIFECYCLE_CONTEXT="true")
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("fuzz-a", env).start()
    instance.wait_logged("assigned partitions")

    sent = produce_input(stack, topics.input, records)
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(records))
    assert instance.running, instance.tail()
    assert healthz(instance.metrics_port()) == 200

    output, dead = read_all(stack, topics)
    where: Counter[tuple[int, int]] = Counter()
    answers: dict[tuple[int, int], str | None] = {}
    problems: list[str] = []
    by_number = dict(enumerate(sent, 1))
    for record in output:
        try:
            event: dict[str, Any] = fuzz.strict_json(record.value or b"")
            fuzz.check_contexts(event)
        except (AssertionError, ValueError, KeyError) as error:
            problems.append(
                f"output not strict JSON or wrong contexts ({error!r}): {record!r:.300}"
            )
            continue
        source = by_number[int(event[fuzz.MARKER])]
        place = (source.partition, source.offset)
        where[place] += 1
        answers[place] = None
        if record.key != source.key or record.partition != source.partition:
            problems.append(f"output {place} has another key or partition than its input")
    for letter in dead:
        labels = {
            name[len(DLQ_HEADER_PREFIX) :]: (value or b"").decode(errors="replace")
            for name, value in letter.headers  # the service's own come last
            if name.startswith(DLQ_HEADER_PREFIX)
        }
        place = (int(labels["partition"]), int(labels["offset"]))
        where[place] += 1
        answers[place] = labels["reason"]
    offsets = {(s.partition, s.offset) for s in sent}
    assert not problems, "\n".join(problems[:5])
    assert set(where) == offsets, f"{len(offsets - set(where))} input records went nowhere"
    assert {place: n for place, n in where.items() if n != 1} == {}

    # The answer file mode gives the same key and value.
    disagree = []
    for s in sent:
        expected = expected_answer(s.key, s.value or b"")
        if answers[(s.partition, s.offset)] not in expected:
            got = answers[(s.partition, s.offset)]
            disagree.append(f"{(s.partition, s.offset)}: {got} not in {expected}: {s.value!r:.200}")
    assert not disagree, "\n".join(disagree[:10])
    reasons = Counter(answers.values())
    assert reasons[None] > 20, reasons  # the traffic really mixes good and bad records
    assert len(reasons) > 8, reasons

    # Still alive, healthy, and serving.
    assert instance.running, instance.tail()
    assert healthz(instance.metrics_port()) == 200
    good = [
        Input(
            DEVICES[0], tracker.dump({"e": "se", "eid": event_id(10**9 + n), "dtm": str(START_MS)})
        )
        for n in range(5)
    ]
    produce_input(stack, topics.input, good)
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(records) + len(good))
    assert instance.stop() == 0, instance.tail()
    progress.close()
    output_after, _ = read_all(stack, topics)
    assert len(output_after) == len(output) + len(good)
    eids = {json.loads(r.value or b"").get("eid") for r in output_after}
    assert {event_id(10**9 + n) for n in range(5)} <= eids
