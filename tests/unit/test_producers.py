"""Every producer the project creates keeps a device's events in order: idempotent."""

from __future__ import annotations

from enricher import config
from enricher.app import input_producer_config
from enricher.output import producer_config

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
