"""The service behind Snowplow Enrich: enriched TSV in, the same TSV out with the
``client_session`` entity in ``derived_contexts``, exactly once.

The input is generated traffic written as Enrich writes it, keyed by device as Enrich's Kafka
sink does when told to partition by ``domain_userid`` (so the device is the key, and no
re-keying hop runs). The reference is ``enricher batch`` on
the same events as tracker-protocol JSON (held to Snowplow's tracker by the differential
test): every event must carry the same session, and every other field must come out as it
went in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from feeding import Input, produce_input, traffic
from instances import Fleet
from progress import Progress
from reference import BatchReference, client_session
from service_settings import service_env
from stack import Stack
from support import CLIENT_SESSION, enriched_tsv

from enricher.codecs.enriched_tsv import INDEX

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

EVENTS = 20_000


def test_enriched_tsv_gets_the_sessions_of_the_tracker_events_exactly_once(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    items = traffic(EVENTS, 2_000, seed=81)
    reference = BatchReference(items, tmp_path)
    records = {
        event["eid"]: enriched_tsv(event, domain_userid=device, etl_tags="\u00e9t\u00e9")
        for device, event in items
    }
    bad = Input(b"device-bad", b"one\ttwo\tthree")
    topics = stack.new_topics("tsv", partitions=6)
    env = service_env(
        stack,
        topics,
        ENRICHER_INPUT_FORMAT="snowplow-enriched",
        ENRICHER_OUTPUT_FORMAT="snowplow-enriched",
        ENRICHER_DEVICE_ID="key",  # keyed by device upstream: no re-keying hop
    )
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("tsv", env).start()
    messages = [Input(device.encode(), records[event["eid"]]) for device, event in items]
    produce_input(stack, topics.input, [*messages[:100], bad, *messages[100:]])
    progress.wait_done(240, fleet, expected=EVENTS + 1)
    assert instance.stop() == 0, instance.tail()

    output = stack.read_committed([topics.output])
    dead = stack.read_committed([topics.dlq])
    assert [dict(d.headers).get("enricher.error.reason") for d in dead] == [b"invalid_field_count"]
    expected = reference.result()
    seen: dict[str, int] = {}
    problems = []
    for record in output:
        assert record.value is not None
        fields = record.value.decode().split("\t")
        eid = fields[INDEX["event_id"]]
        seen[eid] = seen.get(eid, 0) + 1
        sent = records[eid].decode().split("\t")
        derived = json.loads(fields[INDEX["derived_contexts"]])["data"]
        [session] = [e["data"] for e in derived if e["schema"] == CLIENT_SESSION]
        if session != client_session(expected[eid].event):
            problems.append(f"{eid}: {session} != {client_session(expected[eid].event)}")
        others = [i for i, (a, b) in enumerate(zip(sent, fields, strict=True)) if a != b]
        if others != [INDEX["derived_contexts"]]:
            problems.append(f"{eid}: fields {others} changed")
    assert not problems, f"{len(problems)} events differ, e.g. {problems[:3]}"
    assert seen.keys() == expected.keys() and set(seen.values()) == {1}
