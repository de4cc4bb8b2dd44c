"""Realistic mobile tracker traffic, for the demo, the compose file, the benchmark and tests.

Devices follow a skewed (Zipf-like) activity distribution. Each visit is a foreground burst
of screen views and structured events, often ended by a Background event and followed by a
Foreground event when the user returns; the pauses between visits are drawn around the
session timeouts, so sessions both continue and expire. Output is deterministic for a seed.
"""

from __future__ import annotations

import heapq
import json
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from enricher.entities import (
    BACKGROUND_EVENT_SCHEMA,
    FOREGROUND_EVENT_SCHEMA,
    UNSTRUCT_EVENT_SCHEMA,
)

SCREEN_VIEW_SCHEMA = "iglu:com.snowplowanalytics.mobile/screen_view/jsonschema/1-0-0"
SCREENS = ("home", "search", "product", "cart", "checkout", "profile", "settings", "feed")
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


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

    def next_event(self) -> dict[str, str]:
        rng = self.rng
        fields: dict[str, str]
        if self.burst == 0:
            if self.in_background:
                self.time_ms += self._pause_ms()
                self.in_background = False
                self.burst = rng.randint(1, 12)
                fields = {"e": "ue", "ue_pr": _unstruct(FOREGROUND_EVENT_SCHEMA, {})}
            elif rng.random() < 0.7:
                self.time_ms += rng.randrange(100, 5_000)
                self.in_background = True
                fields = {"e": "ue", "ue_pr": _unstruct(BACKGROUND_EVENT_SCHEMA, {})}
            else:
                self.time_ms += self._pause_ms()
                self.burst = rng.randint(1, 12)
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
    """``(device id, tracker event)`` pairs in device-time order across devices."""
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
    heap = [(d.time_ms, i) for i, d in enumerate(devices) if quota[i] > 0]
    heapq.heapify(heap)
    produced = 0
    while heap and produced < traffic.events:
        _, index = heapq.heappop(heap)
        device = devices[index]
        event = device.next_event()
        produced += 1
        quota[index] -= 1
        yield device.key, event
        if quota[index] > 0:
            heapq.heappush(heap, (device.time_ms, index))


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
