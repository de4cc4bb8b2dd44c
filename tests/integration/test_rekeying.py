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

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)
from feeding import Input, produce_input, traffic
from instances import Fleet, wait_for
from rekeyed import (
    by_device,
    check,
    collector_event,
    env_for,
    expected_sessions,
    json_event,
    keyed_at_random,
    stop,
    wait_done,
)
from stack import Stack

from enricher.codecs import collector, tracker

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

PARTITIONS = 6


def test_json_events_keyed_at_random_are_enriched_by_their_duid(stack: Stack, fleet: Fleet) -> None:
    items = traffic(20_000, 2_000, seed=91)
    messages, devices = keyed_at_random(items, seed=91)
    no_device = {**items[0][1], "eid": str(uuid.UUID(int=1))}
    missing = Input(b"random", tracker.dump(no_device))
    topics = stack.new_topics("rekey", partitions=PARTITIONS)
    admin = stack.admin()  # held: its requests end with it
    retention = ConfigEntry(
        "retention.ms", "123456789", incremental_operation=AlterConfigOpType.SET
    )
    resource = ConfigResource("topic", topics.input, incremental_configs=[retention])

    def retention_set() -> bool:  # a topic just created may not be known to the broker yet
        try:
            for future in admin.incremental_alter_configs([resource]).values():
                future.result(timeout=30)
        except KafkaException as error:
            errors.append(str(error))
            return False
        return True

    errors: list[str] = []
    wait_for(retention_set, "the input's retention to be set", 60, detail=lambda: errors[-1])
    env = env_for(stack, topics, ENRICHER_DEVICE_ID="duid")
    instance = fleet.add("rekey", env).start()
    produce_input(stack, topics.input, [*messages, missing])
    wait_done(stack, env, fleet, len(messages) + 1, len(messages))
    stop([instance])
    # The hop's topic keeps the input as long as the input does: repairs replay it.
    hop_topic = ConfigResource("topic", by_device(env))
    configs = admin.describe_configs([hop_topic])[hop_topic].result(timeout=30)
    assert configs["retention.ms"].value == "123456789"

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
    assert instance.metric("enricher_rekey_records_consumed_total") == len(records) + 2
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
