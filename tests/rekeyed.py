"""The re-keying hop under test: input whose key is not the device (random, as Snowplow's
collector keys its records), and what its output must be.

- :func:`env_for`: the settings of the hop's instances (short consumer-group timeouts);
- :func:`wait_done`: until both hops are through; :func:`stop`: the instances, cleanly;
- :func:`expected_sessions`: the reference, the engine applied to each device's events in the
  order the hop wrote them (the by-device topic, read back: random keys spread one device's
  records over the input partitions, and the hop can read them in another order than they
  were sent);
- :func:`check`: every expected event once in the output, with the reference's session,
  keyed by its device; :func:`collector_event` reads the one event of an output record of
  the ``snowplow-collector`` format.

(PYTEST_DONT_REWRITE: like ``instances``, test modules import this module; its asserts are
plain asserts.)
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from feeding import Input
from instances import Fleet, Instance
from progress import Progress
from reference import client_session
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT, SALT, service_env
from stack import Record, Stack, TopicSet

from enricher.codecs import collector, tracker
from enricher.enrich import Enricher
from enricher.session import SessionConfig, SessionEngine, SessionState, Timeouts

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


def keyed_at_random(
    items: Sequence[tuple[str, dict[str, str]]], seed: int
) -> tuple[list[Input], dict[str, str]]:
    """The events as JSON records keyed by random UUIDs, each with ``duid`` its device; and
    each event id's device."""
    rng = random.Random(seed)
    messages = [
        Input(uuid.UUID(int=rng.getrandbits(128)).bytes, tracker.dump({**event, "duid": device}))
        for device, event in items
    ]
    return messages, {event["eid"]: device for device, event in items}
