"""Records Kafka will not take never stall a partition: they become dead letters, and a batch
that keeps failing makes ``/healthz`` fail.

* an input record too large for the producer (the dead letter would be too): its dead letter
  is a truncated copy, labelled with the original's size and hash;
* an event whose enriched record outgrows the limit: a dead letter, the event's siblings
  unaffected;
* an enriched record the broker refuses (the output topic's own ``max.message.bytes``): the
  batch aborts once, and its replay dead-letters that record;
* a dead letter the broker refuses too: nothing can make progress, so ``/healthz`` fails after
  ``MAX_BATCH_ABORTS`` aborts of the same batch.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from feeding import Input, as_messages, produce_input, traffic
from instances import Fleet, Instance, wait_for
from progress import Progress
from reference import BatchReference, check_output, read_all
from service_settings import service_env
from stack import Stack

from enricher.service import DLQ_HEADER_PREFIX

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

DONE_TIMEOUT = 120.0


def set_topic_limit(stack: Stack, topic: str, max_bytes: int) -> None:
    """Set a topic's ``max.message.bytes``, the broker's limit on a record batch."""
    entry = ConfigEntry(
        "max.message.bytes", str(max_bytes), incremental_operation=AlterConfigOpType.SET
    )
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    admin = stack.admin()  # kept alive until the futures resolve
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def error_headers(record_headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    return {
        name[len(DLQ_HEADER_PREFIX) :]: (value or b"").decode()
        for name, value in record_headers
        if name.startswith(DLQ_HEADER_PREFIX)
    }


def health(instance: Instance) -> int:
    url = f"http://127.0.0.1:{instance.metrics_port()}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_records_too_large_for_kafka_become_dead_letters_and_the_partition_moves_on(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    items = traffic(600, 40, seed=41)
    before, after = as_messages(items[:300]), as_messages(items[300:])
    limit = 900_000  # ENRICHER_MAX_MESSAGE_BYTES by default
    # A value over the limit, and just under the producer's own: its dead letter, with the
    # error headers, would be over that too.
    huge = Input(b"p", b"x" * 999_950, (("origin", b"collector-1"),))
    # A valid event that only outgrows the limit once enriched.
    template = json.loads(before[0].value or b"")
    padded = {**template, "eid": "20000000-0000-4000-8000-000000000001", "pad": ""}
    room = limit - len(before[0].key or b"") - len(json.dumps(padded).encode()) - 10
    grows = Input(before[0].key, json.dumps({**padded, "pad": "y" * room}).encode())

    topics = stack.new_topics("unproducible", partitions=1)
    for topic in (topics.input, topics.output, topics.dlq):
        set_topic_limit(stack, topic, 2_000_000)
    env = service_env(stack, topics)
    reference = BatchReference(items, tmp_path)
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("unproducible", env).start()

    sent = produce_input(stack, topics.input, before)
    large = stack.producer(**{"message.max.bytes": 2_000_000})
    large.produce(topics.input, key=huge.key, value=huge.value, headers=list(huge.headers))
    assert large.flush(30) == 0
    sent += produce_input(stack, topics.input, [grows, *after])
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(sent) + 1)
    instance.wait_counted(len(sent) + 1)
    assert instance.running
    assert health(instance) == 200
    aborted = instance.metric("enricher_transactions_total", 'outcome="aborted"')
    assert instance.stop() == 0, instance.tail()

    output, dead = read_all(stack, topics)
    good = [s for s in sent if s.value != grows.value]
    check_output(output, reference.result(), good)
    assert aborted == 0

    by_offset = {int(error_headers(r.headers)["offset"]): r for r in dead}
    grows_sent = next(s for s in sent if s.value == grows.value)
    huge_offset = grows_sent.offset - 1
    assert sorted(by_offset) == [huge_offset, grows_sent.offset]

    letter = by_offset[huge_offset]
    assert letter.key == huge.key
    labels = error_headers(letter.headers)
    assert labels["reason"] == "oversize"
    assert labels["truncated"] == "true"
    assert int(labels["original_size"]) == 1 + 999_950 + len("origin") + len("collector-1")
    assert labels["original_value_sha256"] == hashlib.sha256(huge.value or b"").hexdigest()
    size = len(letter.key or b"") + len(letter.value or b"")
    size += sum(len(n) + len(v or b"") for n, v in letter.headers)
    assert size <= limit
    assert (letter.value or b"") == (huge.value or b"")[: len(letter.value or b"")]

    letter = by_offset[grows_sent.offset]
    labels = error_headers(letter.headers)
    assert labels["reason"] == "oversize"
    assert "enriched record" in labels["message"]
    assert (letter.value or b"") == (grows.value or b"")[: len(letter.value or b"")]


def test_a_record_the_broker_refuses_is_dead_lettered_on_the_replay(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    items = traffic(400, 30, seed=43)
    messages = as_messages(items)
    template = json.loads(messages[0].value or b"")
    refused_event = {**template, "eid": "30000000-0000-4000-8000-000000000001", "pad": "z" * 8000}
    refused = Input(messages[0].key, json.dumps(refused_event).encode())

    topics = stack.new_topics("refused", partitions=1)
    # The output topic takes no batch over 6,000 bytes; the service does not know it.
    set_topic_limit(stack, topics.output, 6_000)
    env = service_env(
        stack,
        topics,
        # One record per produce request, so that only the large one is refused.
        ENRICHER_KAFKA_BATCH_NUM_MESSAGES="1",
    )
    reference = BatchReference(items, tmp_path)
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("refused", env).start()

    sent = produce_input(stack, topics.input, [*messages[:200], refused, *messages[200:]])
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(sent))
    instance.wait_counted(len(sent))
    assert instance.running
    dead_lettered = instance.metric(
        "enricher_records_dead_lettered_total", 'reason="not_producible"'
    )
    assert instance.stop() == 0, instance.tail()

    output, dead = read_all(stack, topics)
    good = [s for s in sent if s.value != refused.value]
    check_output(output, reference.result(), good)
    assert len(dead) == 1
    labels = error_headers(dead[0].headers)
    assert labels["reason"] == "not_producible"
    assert dead[0].value == refused.value
    assert dead_lettered == 1


def test_healthz_fails_when_the_same_batch_keeps_aborting(stack: Stack, fleet: Fleet) -> None:
    messages = as_messages(traffic(50, 5, seed=47))
    topics = stack.new_topics("stuck", partitions=1)
    # Neither the output nor the dead-letter topic takes this batch: no way forward.
    set_topic_limit(stack, topics.output, 1_000)
    set_topic_limit(stack, topics.dlq, 1_000)
    template = json.loads(messages[0].value or b"")
    big = {**template, "eid": "40000000-0000-4000-8000-000000000001", "pad": "w" * 3000}
    env = service_env(
        stack,
        topics,
        ENRICHER_MAX_BATCH_ABORTS="3",
        ENRICHER_KAFKA_BATCH_NUM_MESSAGES="1",
    )
    instance = fleet.add("stuck", env).start()
    produce_input(stack, topics.input, [Input(messages[0].key, json.dumps(big).encode())])
    assert health(instance) == 200
    wait_for(
        lambda: health(instance) == 503,
        "/healthz to fail after 3 aborts of the same batch",
        DONE_TIMEOUT,
        checks=[instance],
    )
    assert instance.metric("enricher_transactions_total", 'outcome="aborted"') >= 3
