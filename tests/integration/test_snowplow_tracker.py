"""Snowplow's Python tracker, over HTTP, through a collector, to the service: 40 mobile devices
send screen views, structured events and app background and foreground events, half of them in
pixel requests (GET, one event each), half in POST batches of 10 events; the collector records
each request keyed at random, and the service must attach to every event the session the rules
give it.

The tracker stamps an event's device-created time (``dtm``, the time the rules read first) with
its own clock when the event is tracked, and its ``true_timestamp`` argument sets ``ttm`` only.
So the tracker runs here on a device clock: the clock its module reads is replaced by one that
tells the time of the event being tracked, in timelines whose pauses are drawn around the
session timeouts, so that sessions both go on and time out. The input topic has one partition:
the service reads the requests in the order the trackers sent them, so each device's sessions
follow its timeline, and are checked against the timeouts as well as against the reference
(the reordering that random keys bring over several partitions is ``test_rekeying``'s).
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
import snowplow_tracker.tracker
from collector_endpoint import CollectorEndpoint
from instances import Fleet
from reference import client_session
from rekeyed import (
    by_device,
    check,
    collector_event,
    env_for,
    expected_sessions,
    stop,
    wait_done,
)
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT
from snowplow_tracker.emitters import Emitter
from snowplow_tracker.events.event import Event
from snowplow_tracker.events.screen_view import ScreenView
from snowplow_tracker.events.self_describing import SelfDescribing
from snowplow_tracker.events.structured_event import StructuredEvent
from snowplow_tracker.self_describing_json import SelfDescribingJson
from snowplow_tracker.subject import Subject
from snowplow_tracker.tracker import Tracker
from stack import Stack

from enricher.codecs import collector
from enricher.entities import BACKGROUND_EVENT_SCHEMA, FOREGROUND_EVENT_SCHEMA
from enricher.generate import SCREENS, START_MS

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

SEED = 94
DEVICES = 40
VISITS = 4
BATCH_SIZE = 10
BACKGROUND_PAUSES_MS = (8_000, 40_000, 100_000)
"""From an app's background event to its next foreground event: within the background
timeout (15 s), beyond it but within the foreground one (60 s), beyond both"""
FOREGROUND_PAUSES_MS = (45_000, 150_000)
"""From an app's last event to its next one, left in the foreground: within the foreground
timeout, beyond it"""
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Tracked:
    """One event of a device's timeline."""

    time_ms: int
    device: int
    event: Event


@dataclass
class Plan:
    """What the devices do: their events in the order they are tracked, the sessions the
    timeouts give each device, and the pauses drawn, by whether the app was in the background."""

    tracked: list[Tracked]
    sessions: dict[int, int]
    pauses: Counter[tuple[bool, int]]


class DeviceClock:
    """The clock the tracker module reads (``time.time()``): the time of the event being
    tracked."""

    def __init__(self) -> None:
        self.now_ms = 0

    def time(self) -> float:
        # The middle of the millisecond: the tracker's int(seconds * 1000) truncates back to it.
        return (self.now_ms + 0.5) / 1000


def timeline(device: int, rng: random.Random, plan: Plan) -> None:
    """One device's visits: each a burst of screen views and structured events, often ended by
    a background event (and the next visit opened by a foreground event), then a pause. The
    first pause outlasts its timeout, so every device renews its session at least once."""
    now_ms = START_MS + rng.randrange(600_000)
    background = False
    sessions = 1
    previous_screen: tuple[str, str] | None = None
    counts = Counter[str]()

    def track(event: Event, gap_ms: int) -> None:
        nonlocal now_ms
        now_ms += gap_ms
        plan.tracked.append(Tracked(now_ms, device, event))

    def lifecycle(schema: str, index: str) -> Event:
        counts[schema] += 1
        return SelfDescribing(SelfDescribingJson(schema, {index: counts[schema]}))

    for visit in range(VISITS):
        gap_ms = 0
        if visit:
            timeout_ms = (BACKGROUND_TIMEOUT if background else FOREGROUND_TIMEOUT) * 1000
            pauses = BACKGROUND_PAUSES_MS if background else FOREGROUND_PAUSES_MS
            gap_ms = rng.choice([p for p in pauses if visit > 1 or p > timeout_ms])
            plan.pauses[(background, gap_ms)] += 1
            sessions += gap_ms > timeout_ms
        if background:
            track(lifecycle(FOREGROUND_EVENT_SCHEMA, "foregroundIndex"), gap_ms)
            background, gap_ms = False, rng.randint(500, 3_000)
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.7:
                screen = (rng.choice(SCREENS), str(uuid.UUID(int=rng.getrandbits(128))))
                previous_name, previous_id = previous_screen or (None, None)
                event: Event = ScreenView(
                    id_=screen[1],
                    name=screen[0],
                    previous_name=previous_name,
                    previous_id=previous_id,
                )
                previous_screen = screen
            else:
                action = rng.choice(("add_to_cart", "like", "share"))
                event = StructuredEvent("shop", action, value=rng.randint(1, 100))
            track(event, gap_ms)
            gap_ms = rng.randint(1_000, 12_000)
        if rng.random() < 0.7:
            track(lifecycle(BACKGROUND_EVENT_SCHEMA, "backgroundIndex"), rng.randint(500, 3_000))
            background = True
    plan.sessions[device] = sessions


def make_plan() -> Plan:
    rng = random.Random(SEED)
    plan = Plan([], {}, Counter())
    for device in range(DEVICES):
        timeline(device, rng, plan)
    plan.tracked.sort(key=lambda t: (t.time_ms, t.device))
    return plan


def test_the_python_tracker_over_get_and_post_gets_its_sessions(
    stack: Stack,
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="snowplow_tracker.emitters")  # a line per request
    plan = make_plan()
    rng = random.Random(SEED)
    duids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(DEVICES)]
    clock = DeviceClock()
    monkeypatch.setattr(snowplow_tracker.tracker, "time", clock)
    topics = stack.new_topics("tracker", partitions=1)
    unsent: list[dict[str, Any]] = []

    def failed(_sent: int, events: list[dict[str, Any]]) -> None:
        unsent.extend(events)

    devices: dict[str, str] = {}
    times: dict[str, int] = {}
    with CollectorEndpoint(stack, topics.input) as endpoint:
        pixel = Emitter(
            endpoint.url, method="get", on_failure=failed, request_timeout=REQUEST_TIMEOUT
        )
        batches = Emitter(
            endpoint.url,
            method="post",
            batch_size=BATCH_SIZE,
            on_failure=failed,
            request_timeout=REQUEST_TIMEOUT,
        )
        trackers = [
            Tracker(
                "mobile",
                pixel if device % 2 else batches,
                Subject().set_platform("mob").set_domain_user_id(duids[device]),
                app_id="shop",
            )
            for device in range(DEVICES)
        ]
        for tracked in plan.tracked:
            clock.now_ms = tracked.time_ms
            eid = trackers[tracked.device].track(tracked.event)
            assert eid is not None
            devices[eid] = duids[tracked.device]
            times[eid] = tracked.time_ms
        pixel.flush()
        batches.flush()
        requests = endpoint.requests

    assert not unsent, f"{len(unsent)} events not sent"
    by_get = sum(1 for t in plan.tracked if t.device % 2)
    posts = math.ceil((len(plan.tracked) - by_get) / BATCH_SIZE)
    assert requests == by_get + posts
    records = stack.read_committed([topics.input])
    assert Counter(collector.decode(r.value or b"").path for r in records) == {
        collector.PIXEL_PATH: by_get,
        collector.TP2_PATH: posts,
    }
    keys = {r.key.decode() for r in records if r.key is not None}
    assert len(keys) == len(records) and not keys & set(duids), "keys are not random"

    env = env_for(
        stack,
        topics,
        ENRICHER_INPUT_FORMAT="snowplow-collector",
        ENRICHER_OUTPUT_FORMAT="snowplow-collector",
    )
    instance = fleet.add("tracker", env).start()
    wait_done(stack, env, fleet, requests, len(plan.tracked))
    stop([instance])

    assert stack.read_committed([topics.dlq]) == []
    output = stack.read_committed([topics.output])
    expected = expected_sessions(stack, by_device(env), collector_event)
    check(output, expected, collector_event, devices)

    sessions: dict[str, set[str]] = defaultdict(set)
    for record in output:
        assert record.value is not None
        event = collector_event(record.value)
        assert event["dtm"] == str(times[event["eid"]])
        sessions[devices[event["eid"]]].add(client_session(event)["sessionId"])
    assert {device: len(ids) for device, ids in sessions.items()} == {
        duids[device]: count for device, count in plan.sessions.items()
    }
    assert min(plan.sessions.values()) >= 2
    drawn = {(True, p) for p in BACKGROUND_PAUSES_MS} | {(False, p) for p in FOREGROUND_PAUSES_MS}
    assert set(plan.pauses) == drawn
