"""The events the benchmark feeds: the load generator's traffic, in Kafka and in files.

The preloaded traffic goes to four input topics, the same events in each: keyed by device
(what ``enricher run`` reads where it is), keyed at random with ``duid`` set (what the
re-keying hop moves by device), as the Snowplow collector writes tracker requests
(:func:`enricher.generate.collector_request`, keyed at random), and as Snowplow Enrich writes
enriched events (:func:`enricher.generate.enriched_record`, keyed by device)."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer

from bench.common import BenchError, say
from bench.stack import Kafka
from enricher import generate
from enricher.codecs import tracker
from enricher.output import produce_waiting

Payload = tuple[bytes, bytes]  # (key, value) as produced
PROGRESS_EVERY = 100_000
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
FEED_TICK_SECONDS = 0.005
REQUEST_EVENTS = 10
"""events per tracker request in the collector's input (a device's last request: what is left)"""


def producer(kafka: Kafka, linger_ms: int) -> Producer:
    """An idempotent, non-transactional producer with the Java clients' partitioner (what a
    collector writes with): the input's offsets are then exactly its records."""
    return Producer(
        kafka.config(
            **{
                "partitioner": "murmur2_random",
                "enable.idempotence": True,
                "linger.ms": linger_ms,
            }
        )
    )


class Delivery:
    """Counts failed deliveries of one producer; with ``timestamps``, also keeps the timestamp
    of every delivered record."""

    def __init__(self, *, timestamps: bool = False) -> None:
        self.failures = 0
        self.first: str | None = None
        self.timestamps: list[int] | None = [] if timestamps else None

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failures += 1
            self.first = self.first or str(error)
        elif self.timestamps is not None:
            self.timestamps.append(message.timestamp()[1])

    def finish(self, producer: Producer, topic: str) -> None:
        remaining = int(producer.flush(60))
        if remaining or self.failures:
            raise BenchError(
                f"producing to {topic}: {self.failures} failed ({self.first}),"
                f" {remaining} not delivered within 60s"
            )


@dataclass(frozen=True)
class Inputs:
    """The input topics the same traffic is preloaded into."""

    keyed: str
    """tracker-protocol JSON, keyed by device"""
    random_keys: str
    """the same JSON with ``duid`` set to the device, keyed by a random UUID"""
    collector: str
    """collector records of tracker-protocol-2 POSTs, keyed by a random UUID"""
    enriched: str
    """the events as Snowplow Enrich writes them (131-field TSV), keyed by device"""

    def topics(self) -> list[str]:
        return [self.keyed, self.random_keys, self.collector, self.enriched]


@dataclass(frozen=True)
class Preloaded:
    devices: int  # distinct devices in the traffic
    latest_ms: int  # the latest device time of any event
    requests: int  # collector records in the collector's input


def preload(kafka: Kafka, inputs: Inputs, traffic: generate.Traffic, jsonl: Path) -> Preloaded:
    """Write the traffic to each of the ``inputs`` and, the same events, to a JSON Lines file
    for ``enricher batch``. The collector's input holds one POST per :data:`REQUEST_EVENTS`
    events of a device, sent with the last of them; a device's remaining events (fewer) go in
    one last request each, after every full one."""
    out = producer(kafka, linger_ms=20)
    report = Delivery()
    keys = random.Random(traffic.seed)
    devices: set[str] = set()
    pending: dict[str, list[dict[str, str]]] = {}
    latest_ms = 0
    requests = 0
    started = time.monotonic()

    def send(topic: str, key: bytes, value: bytes) -> None:
        produce_waiting(out, topic, key=key, value=value, on_delivery=report)
        out.poll(0)

    with jsonl.open("wb") as lines:
        for count, (device, event) in enumerate(generate.events(traffic), start=1):
            devices.add(device)
            latest_ms = max(latest_ms, int(event["dtm"]))
            send(inputs.keyed, device.encode(), tracker.dump(event))
            send(inputs.enriched, device.encode(), generate.enriched_record(device, event))
            tagged = {**event, "duid": device}
            send(inputs.random_keys, random_key(keys), tracker.dump(tagged))
            batch = pending.setdefault(device, [])
            batch.append(tagged)
            if len(batch) == REQUEST_EVENTS:
                del pending[device]
                send(inputs.collector, random_key(keys), generate.collector_request(device, batch))
                requests += 1
            lines.write(tracker.dump({"key": device, "event": event}) + b"\n")
            if count % PROGRESS_EVERY == 0:
                say(f"preloading: {count:,} of {traffic.events:,} events")
    for device, batch in pending.items():
        send(inputs.collector, random_key(keys), generate.collector_request(device, batch))
    requests += len(pending)
    report.finish(out, ", ".join(inputs.topics()))
    rate = traffic.events / (time.monotonic() - started)
    say(
        f"preloaded {traffic.events:,} events of {len(devices):,} devices ({rate:,.0f}/s) to"
        f" each input; {requests:,} collector requests"
    )
    return Preloaded(len(devices), latest_ms, requests)


def random_key(rng: random.Random) -> bytes:
    """A random UUID as text, as the collector keys its records."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()


def returning(traffic: generate.Traffic, count: int, after_ms: int) -> list[Payload]:
    """``count`` more events of the same devices, as Kafka keys and values: the generator with
    the next seed, every device time moved past ``after_ms`` (a day later than the preloaded
    traffic ends), so that each device comes back to a new session. Generated ahead, so that
    producing them at a fixed rate costs the benchmark little CPU.

    No device time may lie in the future: the service dead-letters an event more than
    ``ENRICHER_MAX_EVENT_AHEAD`` (a day) ahead of its record's Kafka timestamp, the time it is
    offered, and a dead letter never reaches the output. A long timeline (many events per
    device) moved past ``after_ms`` would cross today (the 300,000-event run's latency phase
    lost 7 % of its records to ``future_timestamp`` so); it is moved only so far that its last
    event is an hour old, and its first events may then lie before the preloaded traffic's
    end: late events for their devices, enriched and delivered all the same."""
    source = generate.Traffic(count, traffic.devices, traffic.seed + 1)
    events = list(generate.events(source))
    last_ms = max((int(event["dtm"]) for _, event in events), default=generate.START_MS)
    latest_allowed_ms = int(time.time() * 1000) - HOUR_MS
    offset = min(after_ms + DAY_MS, latest_allowed_ms - (last_ms - generate.START_MS))
    offset -= generate.START_MS
    items = []
    for key, event in events:
        moved = {**event, "dtm": str(int(event["dtm"]) + offset)}
        moved["stm"] = str(int(event["stm"]) + offset)
        items.append((key.encode(), tracker.dump(moved)))
    return items


@dataclass(frozen=True)
class Fed:
    started: float  # epoch seconds
    seconds: float
    timestamps: list[int]  # of every record, epoch ms


def feed(kafka: Kafka, topic: str, items: list[Payload], rate: float) -> Fed:
    """Produce ``items`` at ``rate`` per second; each record's timestamp is its produce time."""
    out = producer(kafka, linger_ms=5)
    report = Delivery(timestamps=True)
    sent = 0
    wall_start = time.time()
    started = time.monotonic()
    next_report = started + 5
    while sent < len(items):
        now = time.monotonic()
        due = min(len(items), int((now - started) * rate) + 1)
        for key, value in items[sent:due]:
            produce_waiting(out, topic, key=key, value=value, on_delivery=report)
        sent = max(sent, due)
        out.poll(0)
        if now >= next_report:
            say(f"  offered {sent:,} of {len(items):,} events")
            next_report += 5
        time.sleep(FEED_TICK_SECONDS)
    elapsed = time.monotonic() - started
    report.finish(out, topic)
    return Fed(wall_start, elapsed, report.timestamps or [])


def one_event_per_device(path: Path, devices: int, seed: int) -> None:
    """A JSON Lines file with one structured event for each of ``devices`` devices."""
    rng = random.Random(seed)
    with path.open("wb") as lines:
        for index in range(devices):
            lines.write(tracker.dump(_single_event(index, rng)) + b"\n")


def _single_event(index: int, rng: random.Random) -> dict[str, object]:
    time_ms = generate.START_MS + rng.randrange(0, 86_400_000)
    event = {
        "e": "se",
        "se_ca": "ui",
        "se_ac": "tap",
        "eid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "dtm": str(time_ms),
        "stm": str(time_ms + rng.randrange(0, 2_000)),
        "p": "mob",
        "aid": "demo-app",
        "tv": "rn-4.10.1",
        "tna": "demo",
    }
    return {"key": generate.device_id(index), "event": event}
