"""The session events topic on a running service, event by event: ends found by the next
event (timeouts in the foreground and the background, renews) and by the watermark, a late
event that reopens a session declared ended, and the metrics that count them."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from feeding import as_messages, produce_input
from instances import Fleet
from progress import Progress
from reference import read_all
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT, LATENESS, SALT, service_env
from stack import Stack
from support import SECOND, START_MS, Kind, event_id, tracker_event

from enricher.codecs import avro, session_events
from enricher.ids import IdDeriver
from enricher.store import PartitionStore

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

T = START_MS
assert (FOREGROUND_TIMEOUT, BACKGROUND_TIMEOUT, LATENESS) == (60, 15, 30), "the story below"


_numbers = itertools.count(1)


def events(*timeline: tuple[str, int, Kind]) -> list[tuple[str, dict[str, str]]]:
    """(device, seconds after T, kind) -> input items with unique event ids."""
    return [
        (device, tracker_event(event_id(next(_numbers)), T + seconds * SECOND, kind))
        for device, seconds, kind in timeline
    ]


def summary(record: dict[str, Any]) -> tuple[Any, ...]:
    """The parts of a session event the story pins down."""
    end = record["end"]
    if end is None:
        return ("started", record["session_index"], record["start_cause"])
    watermark = None if end["watermark"] is None else (end["watermark"] - T) // SECOND
    return (
        "ended",
        record["session_index"],
        end["cause"],
        end["detected_by"],
        watermark,
        end["revision"],
        end["event_count"],
        end["in_background"],
    )


def test_sessions_end_by_the_next_event_or_the_watermark(stack: Stack, fleet: Fleet) -> None:
    topics = stack.new_topics("lifecycle", partitions=1)
    env = service_env(stack, topics, ENRICHER_OUTPUT_FORMAT="avro")
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("lifecycle", env).start()
    instance.wait_logged("assigned partitions")
    sent = 0

    def feed(items: list[tuple[str, dict[str, str]]]) -> None:
        nonlocal sent
        produce_input(stack, topics.input, as_messages(items))
        sent += len(items)
        progress.wait_done(120, fleet, expected=sent)
        instance.wait_counted(sent)

    feed(
        events(
            ("a", 0, "screen_view"),
            ("a", 10, "screen_view"),
            ("b", 0, "screen_view"),
            ("b", 5, "background"),
            ("c", 1, "screen_view"),
            ("d", 0, "screen_view"),
            ("e", 0, "screen_view"),
        )
    )
    store = PartitionStore(
        stack.redis(), env["ENRICHER_REDIS_KEY_PREFIX"], topics.input, IdDeriver(SALT)
    )
    store.request_renew(0, "d")
    store.request_renew(0, "e")
    # The clock reaches T+100 s: the watermark, T+70 s, passes c's expiry (T+61 s) and that
    # of b's second session (T+40 s, background).
    feed(
        events(
            ("a", 80, "screen_view"),  # 70 s > 60 s in the foreground
            ("b", 25, "screen_view"),  # 20 s > 15 s in the background
            ("d", 20, "screen_view"),  # renewed before its timeout
            ("e", 100, "screen_view"),  # renewed, but it had timed out anyway
        )
    )
    feed(events(("c", 2, "screen_view")))  # late: joins c's ended session, which ends again
    feed(events(("z", 200, "screen_view")))  # the watermark moves to T+170 s

    fg, bg = "foreground_timeout", "background_timeout"

    def ended(cause: str, detected_by: str) -> float:
        labels = f'cause="{cause}",detected_by="{detected_by}"'
        return instance.metric("enricher_sessions_ended_total", labels)

    assert ended(fg, "next_event") == 2  # a and e
    assert ended(bg, "next_event") == 1
    assert ended("renew", "next_event") == 1
    assert ended(fg, "watermark") == 5
    assert ended(bg, "watermark") == 1
    assert instance.metric("enricher_sessions_reopened_total") == 1
    assert instance.metric("enricher_sessions_started_total", 'cause="renew"') == 1
    watermark = instance.metric("enricher_watermark_timestamp_seconds", 'partition="0"')
    assert watermark == (T + 170 * SECOND) / 1000
    assert instance.stop() == 0, instance.tail()
    records = stack.read_committed([topics.sessions], timeout=60)
    by_device: dict[str, list[tuple[Any, ...]]] = {}
    for record in sorted(records, key=lambda r: r.offset):
        data = session_events.decode_avro(record.value or b"")
        assert record.key == data["device_id"].encode()
        by_device.setdefault(data["device_id"], []).append(summary(data))

    assert by_device == {
        "a": [
            ("started", 1, "new_device"),
            ("ended", 1, fg, "next_event", None, 0, 2, False),
            ("started", 2, fg),
            ("ended", 2, fg, "watermark", 170, 0, 1, False),
        ],
        "b": [
            ("started", 1, "new_device"),
            ("ended", 1, bg, "next_event", None, 0, 2, True),
            ("started", 2, bg),
            ("ended", 2, bg, "watermark", 70, 0, 1, True),
        ],
        "c": [
            ("started", 1, "new_device"),
            ("ended", 1, fg, "watermark", 70, 0, 1, False),
            ("ended", 1, fg, "watermark", 70, 1, 2, False),
        ],
        "d": [
            ("started", 1, "new_device"),
            ("ended", 1, "renew", "next_event", None, 0, 1, False),
            ("started", 2, "renew"),
            ("ended", 2, fg, "watermark", 170, 0, 1, False),
        ],
        "e": [
            ("started", 1, "new_device"),
            ("ended", 1, fg, "next_event", None, 0, 1, False),
            ("started", 2, fg),
            ("ended", 2, fg, "watermark", 170, 0, 1, False),
        ],
        "z": [("started", 1, "new_device")],
    }

    # The records carry the sessions of the enriched output.
    output, _ = read_all(stack, topics)
    entities = [avro.decode_enriched(r.value or b"")["client_session"] for r in output]
    starts = {
        (data["session_id"], data["first_event_id"], data["previous_session_id"])
        for data in map(session_events.decode_avro, (r.value or b"" for r in records))
    }
    assert starts == {(e["sessionId"], e["firstEventId"], e["previousSessionId"]) for e in entities}
