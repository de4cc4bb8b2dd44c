"""Input for the integration tests: generated traffic, and producing it to the input topic.

- :func:`traffic` and :func:`as_messages`: generated multi-device tracker events, as compact
  JSON :class:`Input` records keyed by device;
- :func:`produce_input` and :class:`Feeder` (in a background thread, at a given rate): produce
  them with the Java client's partitioner, and report where each one landed (:class:`Sent`);
- :func:`as_stored`: the same records read back, with the timestamps the broker kept.

(PYTEST_DONT_REWRITE: like ``instances``, test modules import this module; its asserts are
plain asserts.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT
from stack import Stack

from enricher import generate
from enricher.codecs import tracker
from enricher.output import produce_waiting

Headers = tuple[tuple[str, bytes | None], ...]
Event = dict[str, str]
Item = tuple[str, Event]  # (device id, tracker event)


@dataclass(frozen=True)
class Input:
    """An input record to produce."""

    key: bytes | None
    value: bytes | None
    headers: Headers = ()


@dataclass(frozen=True)
class Sent:
    """An input record and where it landed."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int
    offset: int
    timestamp_ms: int
    """the record's timestamp as the broker stored it (the service's output carries it on)"""


def traffic(events: int, devices: int, seed: int) -> list[Item]:
    """Generated multi-device traffic (short timeouts: many session renewals)."""
    spec = generate.Traffic(
        events=events,
        devices=devices,
        seed=seed,
        foreground_timeout=FOREGROUND_TIMEOUT,
        background_timeout=BACKGROUND_TIMEOUT,
    )
    return list(generate.events(spec))


def as_messages(
    items: Iterable[Item], headers: Callable[[int], Headers] | None = None
) -> list[Input]:
    """Compact-JSON input records keyed by device, with headers chosen by position."""
    return [
        Input(key.encode(), tracker.dump(event), headers(i) if headers else ())
        for i, (key, event) in enumerate(items)
    ]


def _input_producer(stack: Stack) -> Any:
    # The Java client's partitioner, as a JVM collector would use.
    return stack.producer(partitioner="murmur2_random", **{"linger.ms": 20})


def _produce(
    producer: Any,
    topic: str,
    messages: Sequence[Input],
    sent: list[Sent | None],
    errors: list[str],
    *,
    pace: Callable[[int], None] | None = None,
) -> None:
    base = len(sent)
    sent.extend([None] * len(messages))

    def delivered(index: int) -> Callable[[KafkaError | None, Message], None]:
        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                errors.append(str(error))
                return
            m = messages[index]
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            timestamp_ms = message.timestamp()[1]
            sent[base + index] = Sent(m.key, m.value, m.headers, partition, offset, timestamp_ms)

        return report

    for index, m in enumerate(messages):
        if pace is not None:
            pace(index)
        headers = list(m.headers) if m.headers else None
        produce_waiting(
            producer, topic, key=m.key, value=m.value, headers=headers, on_delivery=delivered(index)
        )
        producer.poll(0)


def _finish(producer: Any, topic: str, sent: list[Sent | None], errors: list[str]) -> list[Sent]:
    remaining = producer.flush(60)
    if errors or remaining:
        raise AssertionError(
            f"producing to {topic}: {len(errors)} errors {errors[:3]}, {remaining} undelivered"
        )
    missing = [i for i, s in enumerate(sent) if s is None]
    if missing:
        raise AssertionError(f"producing to {topic}: no delivery report for {len(missing)} records")
    return [s for s in sent if s is not None]


def produce_input(stack: Stack, topic: str, messages: Sequence[Input]) -> list[Sent]:
    """Produce (idempotent, not transactional: the input's end offsets then equal the
    service's committed offsets once it is done) and return where each record landed."""
    producer = _input_producer(stack)
    sent: list[Sent | None] = []
    errors: list[str] = []
    _produce(producer, topic, messages, sent, errors)
    return _finish(producer, topic, sent, errors)


class Feeder:
    """Produces records in a background thread at about ``rate`` records per second."""

    def __init__(self, stack: Stack, topic: str, messages: Sequence[Input], rate: float) -> None:
        self.stack = stack
        self.topic = topic
        self.messages = messages
        self.rate = rate
        self.sent: list[Sent] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            producer = _input_producer(self.stack)
            started = time.monotonic()

            def pace(index: int) -> None:
                ahead = started + index / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # rate limiting, not synchronisation
                    producer.poll(0)

            sent: list[Sent | None] = []
            errors: list[str] = []
            _produce(producer, self.topic, self.messages, sent, errors, pace=pace)
            self.sent = _finish(producer, self.topic, sent, errors)
        except BaseException as error:
            self.error = error

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float = 300.0) -> list[Sent]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"producing to {self.topic} took longer than {timeout}s", pytrace=False)
        if self.error is not None:
            raise self.error
        return self.sent


def as_stored(stack: Stack, topic: str, sent: Sequence[Sent]) -> list[Sent]:
    """``sent`` as the broker stored it, read back from ``topic``. A produce retried across a
    broker failure can be reported with a later timestamp than the one the broker kept from
    its first attempt, and the service's output carries the kept one on. Read once the run
    is over, so that reading takes no time from it; every sent record must be there once,
    where its delivery report put it."""
    stored = {
        (r.partition, r.offset): Sent(
            r.key, r.value, r.headers, r.partition, r.offset, r.timestamp_ms
        )
        for r in stack.read_committed([topic])
    }
    places = {(s.partition, s.offset) for s in sent}
    assert len(stored) == len(sent) and places == set(stored), (
        f"{topic} holds {len(stored)} records, {len(sent)} were sent;"
        f" {len(places - set(stored))} of them are not where their delivery report put them"
    )
    return [stored[place] for place in sorted(stored)]
