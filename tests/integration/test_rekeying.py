"""The re-keying hop: input keyed at random (as Snowplow's collector keys its records), the
device found in each event, every event moved to its device's partition of
``<group>-by-device`` and enriched there, exactly once, also while instances are SIGKILLed.

Random keys spread one device's records over the input partitions, and the hop can read them
in another order than they were sent; so the reference is the engine applied to each device's
events in the order the hop wrote them (the by-device topic, read back), and the output must
carry the sessions that order gives, event for event."""

from __future__ import annotations

import json
import random
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from feeding import Feeder, Input, produce_input, traffic
from instances import Fleet, Instance
from progress import Progress
from reference import client_session
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT, SALT, service_env
from stack import Record, Stack, TopicSet

from enricher.codecs import collector, tracker
from enricher.enrich import Enricher
from enricher.session import SessionConfig, SessionEngine, SessionState, Timeouts

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

PARTITIONS = 6
DONE_TIMEOUT = 240.0
ENGINE = Enricher(
    SessionEngine(
        SessionConfig(SALT, Timeouts.from_seconds(FOREGROUND_TIMEOUT, BACKGROUND_TIMEOUT))
    )
)
GROUP_SETTINGS = {
    "ENRICHER_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "ENRICHER_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "ENRICHER_KAFKA_MAX_POLL_INTERVAL_MS": "20000",
}

EventOf = Callable[[bytes], dict[str, str]]


def json_event(value: bytes) -> dict[str, str]:
    event: dict[str, str] = json.loads(value)
    return event


def collector_event(value: bytes) -> dict[str, str]:
    events = collector.events(collector.decode(value))
    assert events is not None and len(events) == 1
    return events[0]


def expected_sessions(stack: Stack, topic: str, event_of: EventOf) -> dict[str, Any]:
    """The reference: each device's events through the engine in by-device order."""
    states: dict[str, SessionState] = {}
    expected: dict[str, Any] = {}
    records = stack.read_committed([topic])
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert record.key is not None and record.value is not None
        device = record.key.decode()
        event = tracker.from_fields(event_of(record.value))
        step, enriched = ENGINE.enrich(device, states.get(device), event)
        states[device] = step.state
        expected[event.event_id] = enriched.client_session
    return expected


def check(
    output: Sequence[Record], expected: dict[str, Any], event_of: EventOf, devices: dict[str, str]
) -> None:
    """Every expected event once, with the reference's session, keyed by its device."""
    seen: dict[str, int] = {}
    problems = []
    for record in output:
        assert record.value is not None
        event = event_of(record.value)
        eid = event["eid"]
        seen[eid] = seen.get(eid, 0) + 1
        got, want = client_session(event), expected.get(eid)
        if want is None or got != want["data"]:
            problems.append(f"{eid}: {got} != {want}")
        if record.key != devices[eid].encode():
            problems.append(f"{eid}: key {record.key!r}, device {devices[eid]}")
    duplicates = {eid: n for eid, n in seen.items() if n > 1}
    missing = set(expected) - set(seen)
    assert not duplicates and not missing, f"{len(duplicates)} duplicated, {len(missing)} missing"
    assert not problems, f"{len(problems)} events differ, e.g. {problems[:3]}"


def env_for(stack: Stack, topics: TopicSet, **extra: str) -> dict[str, str]:
    return service_env(stack, topics, **GROUP_SETTINGS, **extra)


def by_device(env: dict[str, str]) -> str:
    return f"{env['ENRICHER_GROUP_ID']}-by-device"


def wait_done(stack: Stack, env: dict[str, str], fleet: Fleet, records: int, enriched: int) -> None:
    """Until both hops are through: the input committed up to its end (``records``), and
    ``enriched`` events committed to the output (the by-device topic is written in
    transactions, so its end holds commit markers no consumer commits past)."""
    group = env["ENRICHER_GROUP_ID"]
    Progress(stack, group, env["ENRICHER_INPUT_TOPIC"]).wait_done(
        DONE_TIMEOUT, fleet, expected=records
    )
    stack.consume(
        [env["ENRICHER_OUTPUT_TOPIC"]], lambda output: len(output) >= enriched, timeout=DONE_TIMEOUT
    )


def stop(instances: list[Instance]) -> None:
    for instance in instances:
        if instance.running:
            assert instance.stop() == 0, instance.tail()


def test_json_events_keyed_at_random_are_enriched_by_their_duid(stack: Stack, fleet: Fleet) -> None:
    items = traffic(20_000, 2_000, seed=91)
    rng = random.Random(91)
    devices = {event["eid"]: device for device, event in items}
    messages = [
        Input(uuid.UUID(int=rng.getrandbits(128)).bytes, tracker.dump({**event, "duid": device}))
        for device, event in items
    ]
    no_device = {**items[0][1], "eid": str(uuid.UUID(int=1))}
    missing = Input(b"random", tracker.dump(no_device))
    topics = stack.new_topics("rekey", partitions=PARTITIONS)
    env = env_for(stack, topics, ENRICHER_DEVICE_ID="duid")
    instance = fleet.add("rekey", env).start()
    produce_input(stack, topics.input, [*messages, missing])
    wait_done(stack, env, fleet, len(messages) + 1, len(messages))
    stop([instance])

    dead = stack.read_committed([topics.dlq])
    assert [dict(d.headers).get("enricher.error.reason") for d in dead] == [b"missing_device_id"]
    expected = expected_sessions(stack, by_device(env), json_event)
    check(stack.read_committed([topics.output]), expected, json_event, devices)


def collector_records(items: list[tuple[str, dict[str, str]]], seed: int) -> list[Input]:
    """Each device's events as a tracker sends them: POST batches of up to 10 events, every
    fifth request a GET of one event; the collector keys each record at random."""
    rng = random.Random(seed)
    pending: dict[str, list[dict[str, str]]] = {}
    records = []

    def request(events: list[dict[str, str]], get: bool) -> Input:
        body = json.dumps({"schema": collector.PAYLOAD_DATA_SCHEMA, "data": events})
        payload = collector.CollectorPayload(
            ip_address="10.0.0.1",
            timestamp=int(events[0]["stm"]),
            encoding="UTF-8",
            collector="ssc-3.2.0-kafka",
            user_agent="Snowplow/Android",
            path=collector.PIXEL_PATH if get else collector.TP2_PATH,
            querystring=urllib.parse.urlencode(events[0]) if get else None,
            body=None if get else body,
            headers=("Host: collector.example.com",),
            content_type=None if get else "application/json",
            hostname="collector.example.com",
            network_user_id=str(uuid.UUID(int=rng.getrandbits(128))),
        )
        return Input(str(uuid.UUID(int=rng.getrandbits(128))).encode(), collector.encode(payload))

    for device, event in items:
        batch = pending.setdefault(device, [])
        batch.append({**event, "duid": device})
        if rng.random() < 0.2:
            records.append(request(pending.pop(device), get=len(batch) == 1))
        elif len(batch) == 10:
            records.append(request(pending.pop(device), get=False))
    records += [request(batch, get=len(batch) == 1) for batch in pending.values()]
    return records


def test_collector_records_are_split_per_event_and_enriched_by_device(
    stack: Stack, fleet: Fleet
) -> None:
    items = traffic(15_000, 1_500, seed=92)
    devices = {event["eid"]: device for device, event in items}
    records = collector_records(items, seed=92)
    other_path = collector.CollectorPayload(
        ip_address="10.0.0.2", timestamp=1, encoding="UTF-8", collector="c", path="/com.acme/v1"
    )
    passthrough = Input(b"webhook", collector.encode(other_path))
    bad = Input(b"junk", b"\x0b\x00\x64 not thrift")
    topics = stack.new_topics("collector", partitions=PARTITIONS)
    env = env_for(
        stack,
        topics,
        ENRICHER_INPUT_FORMAT="snowplow-collector",
        ENRICHER_OUTPUT_FORMAT="snowplow-collector",
    )
    instance = fleet.add("collector", env).start()
    produce_input(stack, topics.input, [*records, passthrough, bad])
    wait_done(stack, env, fleet, len(records) + 2, len(items) + 1)
    instance.wait_counted(len(items))
    assert instance.metric("enricher_rekeyed_events_total") == len(items)
    stop([instance])

    dead = stack.read_committed([topics.dlq])
    assert [dict(d.headers).get("enricher.error.reason") for d in dead] == [b"invalid_thrift"]
    output = stack.read_committed([topics.output])
    passed = [r for r in output if r.value == passthrough.value]
    assert len(passed) == 1 and passed[0].key == b"webhook"
    enriched = [r for r in output if r.value != passthrough.value]
    assert len(enriched) == len(items) > len(records)
    expected = expected_sessions(stack, by_device(env), collector_event)
    check(enriched, expected, collector_event, devices)


def test_the_hop_loses_and_duplicates_nothing_when_instances_are_sigkilled(
    stack: Stack, fleet: Fleet
) -> None:
    items = traffic(40_000, 4_000, seed=93)
    rng = random.Random(93)
    devices = {event["eid"]: device for device, event in items}
    messages = [
        Input(uuid.UUID(int=rng.getrandbits(128)).bytes, tracker.dump({**event, "duid": device}))
        for device, event in items
    ]
    topics = stack.new_topics("rekey-chaos", partitions=PARTITIONS)
    env = env_for(stack, topics, ENRICHER_DEVICE_ID="duid")
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instances = [fleet.add(f"rekey-chaos-{i}", env).start() for i in range(2)]
    feeder = Feeder(stack, topics.input, messages, rate=3_000).start()
    kills = 0
    while not feeder.done and kills < 8:
        fleet.check()
        progress.wait_total(progress.total() + 2_000, DONE_TIMEOUT, fleet)
        victim = instances[kills % 2]
        victim.kill()
        victim.start()
        kills += 1
    feeder.join()
    assert kills >= 3, f"only {kills} kills while the input was consumed"
    wait_done(stack, env, fleet, len(messages), len(messages))
    stop(instances)

    expected = expected_sessions(stack, by_device(env), json_event)
    check(stack.read_committed([topics.output]), expected, json_event, devices)
