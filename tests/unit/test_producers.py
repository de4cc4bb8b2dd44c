"""Every producer the project creates keeps a device's events in order: idempotent."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, Message, Producer

from enricher import config
from enricher.app import input_producer_config
from enricher.output import Output, producer_config

SETTINGS = config.load(
    env={"ENRICHER_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "ENRICHER_INPUT_TOPIC": "raw"}
)


def test_enricher_generate_produces_idempotently_with_the_java_partitioner() -> None:
    produced = input_producer_config(SETTINGS)
    assert produced["enable.idempotence"] is True
    assert produced["partitioner"] == "murmur2_random"


def test_the_service_produces_transactionally_and_takes_records_up_to_its_limit() -> None:
    produced = producer_config(SETTINGS)
    assert produced["enable.idempotence"] is True
    assert produced["transactional.id"]
    assert produced["message.max.bytes"] > SETTINGS.max_message_bytes
    large = config.load(env={"ENRICHER_MAX_MESSAGE_BYTES": "5000000"})
    assert producer_config(large)["message.max.bytes"] > 5_000_000


def test_output_hands_the_binding_each_argument_in_its_place() -> None:
    """``Output.produce`` passes the producer's arguments by position (keywords cost the
    binding about a microsecond per record): topic, value, key, headers and the callbacks must
    land where librdkafka reads them. No broker: the records are purged from the queue, and
    their delivery reports carry what was produced. (A purged record reports no timestamp:
    the integration tests check that the output carries the input's, ``check_output``.)"""
    reports: list[tuple[str, KafkaError | None, Message]] = []
    output = Output(
        lambda _on_delivery: Producer(
            {
                "bootstrap.servers": "127.0.0.1:9",
                "on_delivery": lambda *report: reports.append(("default", *report)),
            }
        ),
        timeout=1.0,
    )
    output._undelivered_from = lambda source, *report: reports.append((str(source), *report))  # type: ignore[method-assign]
    headers = [("trace", b"t1")]
    output.produce("enriched", b"device-1", b'{"e":"pv"}', headers, 1_767_225_600_123)
    output.produce("enriched", b"device-2", b"{}", None, 1_767_225_600_456, source=(3, 42))
    output.producer.purge(in_queue=True, in_flight=True, blocking=True)
    output.producer.flush(1.0)
    got = [(c, e.code() if e else None, m.topic(), m.key(), m.value()) for c, e, m in reports]
    assert got == [
        ("default", KafkaError._PURGE_QUEUE, "enriched", b"device-1", b'{"e":"pv"}'),
        ("(3, 42)", KafkaError._PURGE_QUEUE, "enriched", b"device-2", b"{}"),
    ]
    # Headers land in the headers' place: there an integer is refused (in the timestamp's
    # place, before it, it would pass).
    with pytest.raises(TypeError):
        output.produce("enriched", b"k", b"v", 1_767_225_600_789, 0)
