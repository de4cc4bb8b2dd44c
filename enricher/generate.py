"""Realistic mobile tracker traffic, for the demo, the compose file, the benchmark and tests.

Devices follow a skewed (Zipf-like) activity distribution. Each visit is a foreground burst
of screen views and structured events, often ended by a Background event and followed by a
Foreground event when the user returns; the pauses between visits are drawn around the
session timeouts, so sessions both continue and expire. Events come out in the order a
collector would receive them: by event time, except that a few visits were made offline and
arrive minutes to hours late (in order for their device). Output is deterministic for a seed.
"""

from __future__ import annotations

import heapq
import json
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from enricher.entities import (
    BACKGROUND_EVENT_SCHEMA,
    FOREGROUND_EVENT_SCHEMA,
    UNSTRUCT_EVENT_SCHEMA,
)

SCREEN_VIEW_SCHEMA = "iglu:com.snowplowanalytics.mobile/screen_view/jsonschema/1-0-0"
SCREENS = ("home", "search", "product", "cart", "checkout", "profile", "settings", "feed")
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
OFFLINE_VISITS = 0.03  # the share of visits delivered late
OFFLINE_DELAY_MS = (300_000, 3 * 3_600_000)


@dataclass(frozen=True, slots=True)
class Traffic:
    """What to generate."""

    events: int
    devices: int
    seed: int = 1
    foreground_timeout: float = 1800.0
    background_timeout: float = 1800.0
    app_id: str = "demo-app"


def device_id(index: int) -> str:
    return f"device-{index:07d}"


def _unstruct(schema: str, data: Mapping[str, object]) -> str:
    inner = {"schema": schema, "data": data}
    return json.dumps({"schema": UNSTRUCT_EVENT_SCHEMA, "data": inner}, separators=(",", ":"))


class _Device:
    """One device's timeline, produced lazily."""

    def __init__(self, traffic: Traffic, index: int, rng: random.Random) -> None:
        self.traffic = traffic
        self.key = device_id(index)
        self.rng = rng
        self.time_ms = START_MS + rng.randrange(0, 3_600_000)
        self.in_background = False
        self.burst = rng.randint(1, 12)
        self.delay_ms = 0
        self.arrival_ms = 0

    def _pause_ms(self) -> int:
        """A pause between visits, around the timeout that will apply to it."""
        rng = self.rng
        timeout_s = (
            self.traffic.background_timeout
            if self.in_background
            else self.traffic.foreground_timeout
        )
        timeout_ms = int(timeout_s * 1000)
        choice = rng.random()
        if choice < 0.1:
            return timeout_ms
        if choice < 0.2:
            return timeout_ms + 1
        if choice < 0.5:
            return rng.randrange(1, max(2, timeout_ms))
        return timeout_ms + rng.randrange(1, 24 * 3_600_000)

    def _new_visit(self) -> None:
        rng = self.rng
        self.burst = rng.randint(1, 12)
        offline = rng.random() < OFFLINE_VISITS
        self.delay_ms = rng.randrange(*OFFLINE_DELAY_MS) if offline else 0

    def next_delivery(self) -> tuple[int, dict[str, str]]:
        """The device's next event and when the collector receives it: its time, or later
        for a visit made offline; never before the device's previous event arrived."""
        event = self.next_event()
        self.arrival_ms = max(self.arrival_ms, self.time_ms + self.delay_ms)
        if self.delay_ms:
            event["stm"] = str(self.arrival_ms)
        return self.arrival_ms, event

    def next_event(self) -> dict[str, str]:
        rng = self.rng
        fields: dict[str, str]
        if self.burst == 0:
            if self.in_background:
                self.time_ms += self._pause_ms()
                self.in_background = False
                self._new_visit()
                fields = {"e": "ue", "ue_pr": _unstruct(FOREGROUND_EVENT_SCHEMA, {})}
            elif rng.random() < 0.7:
                self.time_ms += rng.randrange(100, 5_000)
                self.in_background = True
                fields = {"e": "ue", "ue_pr": _unstruct(BACKGROUND_EVENT_SCHEMA, {})}
            else:
                self.time_ms += self._pause_ms()
                self._new_visit()
                return self.next_event()
        else:
            self.burst -= 1
            self.time_ms += rng.randrange(200, 90_000)
            if rng.random() < 0.6:
                screen = rng.choice(SCREENS)
                data = {"name": screen, "id": str(uuid.UUID(int=rng.getrandbits(128), version=4))}
                fields = {"e": "ue", "ue_pr": _unstruct(SCREEN_VIEW_SCHEMA, data)}
            else:
                fields = {"e": "se", "se_ca": "ui", "se_ac": rng.choice(("tap", "swipe", "scroll"))}
        sent_ms = self.time_ms + rng.randrange(0, 2_000)
        return {
            **fields,
            "eid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "dtm": str(self.time_ms),
            "stm": str(sent_ms),
            "p": "mob",
            "aid": self.traffic.app_id,
            "tv": "rn-4.10.1",
            "tna": "demo",
        }


def events(traffic: Traffic) -> Iterator[tuple[str, dict[str, str]]]:
    """``(device id, tracker event)`` pairs in the order a collector receives them."""
    rng = random.Random(traffic.seed)
    weights = [1.0 / (rank + 1) ** 0.7 for rank in range(traffic.devices)]
    # Each device gets a share of the events proportional to its weight; the most active
    # devices take the remainder of the rounding.
    total = sum(weights)
    quota = [int(traffic.events * w / total) for w in weights]
    for index in range(traffic.events - sum(quota)):
        quota[index % traffic.devices] += 1
    devices = [
        _Device(traffic, i, random.Random(rng.getrandbits(64))) for i in range(traffic.devices)
    ]
    heap: list[tuple[int, int, dict[str, str]]] = []
    for index in range(traffic.devices):
        if quota[index] > 0:
            arrival, event = devices[index].next_delivery()
            heap.append((arrival, index, event))
    heapq.heapify(heap)
    produced = 0
    while heap and produced < traffic.events:
        _, index, event = heapq.heappop(heap)
        produced += 1
        quota[index] -= 1
        yield devices[index].key, event
        if quota[index] > 0:
            arrival, following = devices[index].next_delivery()
            heapq.heappush(heap, (arrival, index, following))


class Pacer:
    """Spaces calls to a target rate (``rate <= 0``: as fast as possible)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = time.monotonic()

    def wait(self) -> None:
        if self.interval:
            self.next_at += self.interval
            delay = self.next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)


# What Snowplow Enrich writes in ``event`` for a tracker-protocol ``e``.
_ENRICHED_EVENT = {"pv": "page_view", "pp": "page_ping", "se": "struct", "ue": "unstruct"}


def enriched_record(device: str, event: Mapping[str, str]) -> bytes:
    """A generated event as Snowplow Enrich writes it to its enriched stream (the fields the
    session rules read, and the ones Enrich always fills), with ``domain_userid`` the device."""
    from enricher.codecs.enriched_tsv import FIELDS, format_tstamp

    def tstamp(name: str) -> str:
        return format_tstamp(int(event[name])) if name in event else ""

    unstruct = event.get("ue_pr", "")
    columns = {
        "app_id": event.get("aid", ""),
        "platform": event.get("p", ""),
        "etl_tstamp": tstamp("stm"),
        "collector_tstamp": tstamp("stm"),
        "dvce_created_tstamp": tstamp("dtm"),
        "event": _ENRICHED_EVENT.get(event.get("e", ""), event.get("e", "")),
        "event_id": event["eid"],
        "name_tracker": event.get("tna", ""),
        "v_tracker": event.get("tv", ""),
        "v_collector": "ssc-3.2.0-kafka",
        "v_etl": "snowplow-enrich-kafka-5.0.0",
        "domain_userid": device,
        "contexts": event.get("co", ""),
        "se_category": event.get("se_ca", ""),
        "se_action": event.get("se_ac", ""),
        "unstruct_event": unstruct,
        "dvce_sent_tstamp": tstamp("stm"),
        "derived_tstamp": tstamp("dtm"),
    }
    if unstruct:
        schema = orjson.loads(unstruct)["data"]["schema"]
        vendor, name, form, version = schema.removeprefix("iglu:").split("/")
        columns.update(event_vendor=vendor, event_name=name, event_format=form)
        columns["event_version"] = version
    return "\t".join(columns.get(field, "") for field in FIELDS).encode()


def collector_request(device: str, events: list[dict[str, str]]) -> bytes:
    """A mobile tracker's POST of ``events`` of ``device``, as the collector writes it: a
    ``CollectorPayload`` whose body is a ``payload_data`` of the events, received when the
    last of them was sent, with the device's network user id cookie."""
    from enricher.codecs import collector

    body = orjson.dumps({"schema": collector.PAYLOAD_DATA_SCHEMA, "data": events}).decode()
    payload = collector.CollectorPayload(
        ip_address="203.0.113.7",
        timestamp=int(events[-1]["stm"]),
        encoding="UTF-8",
        collector="ssc-3.2.0-kafka",
        user_agent="Snowplow/ReactNative",
        path=collector.TP2_PATH,
        body=body,
        headers=("Host: collector.example.com", "Content-Type: application/json; charset=UTF-8"),
        content_type="application/json; charset=UTF-8",
        hostname="collector.example.com",
        network_user_id=str(uuid.uuid5(uuid.NAMESPACE_URL, device)),
    )
    return collector.encode(payload)


def collector_requests(traffic: Traffic) -> Iterator[tuple[bytes, bytes]]:
    """The traffic as Snowplow's collector writes it to Kafka: each device's events in POST
    requests of up to 10 (:func:`collector_request`; a request is sent early now and then, as
    trackers flush on a timer), every event with ``duid`` set to its device, each request
    keyed by a random id."""
    rng = random.Random(traffic.seed + 1)
    pending: dict[str, list[dict[str, str]]] = {}

    def request(device: str) -> tuple[bytes, bytes]:
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
        return key, collector_request(device, pending.pop(device))

    for device, event in events(traffic):
        batch = pending.setdefault(device, [])
        batch.append({**event, "duid": device})
        if len(batch) == 10 or rng.random() < 0.2:
            yield request(device)
    for device in list(pending):
        yield request(device)


def produce(
    records: Iterable[tuple[str | bytes, bytes]],
    topic: str,
    pacer: Pacer,
    producer_config: dict[str, Any],
) -> int:
    """Produce ``(key, value)`` records to ``topic``; returns how many were not delivered."""
    from confluent_kafka import Producer

    from enricher.output import produce_waiting

    producer = Producer(producer_config)
    for key, value in records:
        pacer.wait()
        produce_waiting(producer, topic, value=value, key=key)
        producer.poll(0)
    return int(producer.flush(60))
