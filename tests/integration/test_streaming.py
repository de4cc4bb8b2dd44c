"""`enricher run` end to end on one instance: exactly once, byte-equal to `enricher batch`,
clean SIGTERM, and a restarted instance that continues the sessions it left in Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from feeding import Headers, as_messages, produce_input, traffic
from instances import Fleet
from progress import Progress
from reconcile import reconcile
from reference import BatchReference, check_output, client_session, read_all
from service_settings import service_env
from stack import Stack

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

EVENTS = 20_000
DEVICES = 2_000
PARTITIONS = 12
DONE_TIMEOUT = 180.0


def headers_for(index: int) -> Headers:
    """Some inputs carry headers, including repeated names and a null value."""
    if index % 50 == 0:
        return (("trace", f"t-{index}".encode()), ("trace", b"again"), ("empty", None))
    if index % 5 == 0:
        return (("trace", f"t-{index}".encode()), ("source", b"mobile"))
    return ()


def test_one_instance_publishes_every_event_once_equal_to_batch(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    items = traffic(EVENTS, DEVICES, seed=11)
    reference = BatchReference(items, tmp_path)
    topics = stack.new_topics("stream", partitions=PARTITIONS)
    env = service_env(stack, topics)
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("stream-a", env).start()
    instance.wait_logged("assigned partitions")

    sent = produce_input(stack, topics.input, as_messages(items, headers_for))
    progress.wait_done(DONE_TIMEOUT, fleet, expected=EVENTS)
    instance.wait_counted(EVENTS)
    assert instance.metric("enricher_records_produced_total") == EVENTS
    assert instance.metric("enricher_records_dead_lettered_total") == 0

    assert instance.stop() == 0, instance.tail()
    assert instance.logged("stopped"), instance.tail()

    output, dead = read_all(stack, topics)
    assert not dead, f"{len(dead)} dead letters, e.g. {dead[:2]}"
    assert sum(1 for s in sent if s.headers) > EVENTS // 10
    check_output(output, reference.result(), sent)
    summary = reconcile(stack, topics, output)
    assert summary.ended["next_event"] > 1000, summary
    assert summary.ended["watermark"] > 100, summary


def test_restarted_instance_continues_the_sessions(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    items = traffic(EVENTS, DEVICES, seed=12)
    half = len(items) // 2
    reference = BatchReference(items, tmp_path)
    topics = stack.new_topics("restart", partitions=PARTITIONS)
    env = service_env(stack, topics)
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("restart-a", env)

    sent = produce_input(stack, topics.input, as_messages(items[:half], headers_for))
    instance.start()
    # SIGTERM while it works through the first half: the batch in flight commits or aborts,
    # and the instance leaves the group within the shutdown bound.
    progress.wait_total(half // 4, DONE_TIMEOUT, fleet)
    assert instance.stop() == 0, instance.tail()
    assert instance.logged("stopped"), instance.tail()

    instance.start()  # same transactional id
    progress.wait_done(DONE_TIMEOUT, fleet, expected=half)
    assert instance.stop() == 0, instance.tail()

    sent += produce_input(stack, topics.input, as_messages(items[half:]))
    instance.start()
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(items))
    assert instance.stop() == 0, instance.tail()

    output, dead = read_all(stack, topics)
    assert not dead, f"{len(dead)} dead letters, e.g. {dead[:2]}"
    expected = reference.result()
    check_output(output, expected, sent)
    reconcile(stack, topics, output)

    # The check is only meaningful if sessions do span the restart between the halves.
    first_half = {event["eid"] for _, event in items[:half]}
    continued = sum(
        1
        for _, event in items[half:]
        if client_session(expected[event["eid"]].event)["firstEventId"] in first_half
    )
    assert continued > 50, f"only {continued} second-half events continue a session"
