"""The ceiling: ``enricher run``'s Kafka loop with no session state.

``python -m bench.passthrough`` reads the same ``ENRICHER_*`` settings as the service and
builds its consumer and producer with the service's own ``consumer_config`` and
``producer_config``. Per batch of up to ``ENRICHER_BATCH_SIZE`` records it decodes each value
(``tracker.decode``), encodes the fields again (``tracker.dump``), produces them with the
input's key, headers and timestamp inside a transaction, adds the input offsets to it and
commits. No Redis, no enrichment, no dead-letter handling (the benchmark feeds it generated,
valid events only): whatever the service does beyond this is its own cost. SIGTERM or SIGINT
ends it after the current batch.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from enricher import config
from enricher.codecs import tracker
from enricher.output import consumer_config, producer_config

log = logging.getLogger("bench.passthrough")


def relay(
    consumer: Consumer,
    producer: Producer,
    settings: config.Settings,
    messages: list[Message],
    timeout: float,
) -> None:
    """One batch, exactly once: produce it and commit its offsets in one transaction."""
    producer.begin_transaction()
    ends: dict[int, int] = {}
    for message in messages:
        event = tracker.decode(message.value() or b"")
        producer.produce(
            settings.output_topic,
            value=tracker.dump(event.fields),
            key=message.key(),
            headers=message.headers(),
            timestamp=message.timestamp()[1],
        )
        ends[message.partition() or 0] = message.offset() or 0
    offsets = [TopicPartition(settings.input_topic, p, end + 1) for p, end in ends.items()]
    producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), timeout)
    producer.commit_transaction(timeout)


def usable(message: Message) -> bool:
    """Like the service: a fatal error stops the process, any other is logged and skipped."""
    error = message.error()
    if error is None:
        return True
    if error.fatal():
        raise KafkaException(error)
    log.warning("consume: %s", error.str())
    return False


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = config.load(require=("bootstrap_servers", "input_topic", "output_topic"))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    timeout = max(10.0, settings.transaction_timeout_ms / 1000)
    consumer = Consumer(consumer_config(settings))
    producer = Producer(producer_config(settings))
    producer.init_transactions(timeout)
    consumer.subscribe([settings.input_topic])
    log.info("relaying %s -> %s", settings.input_topic, settings.output_topic)
    try:
        while not stopping.is_set():
            batch = consumer.consume(settings.batch_size, settings.batch_timeout_ms / 1000)
            messages = [m for m in batch if usable(m)]
            if messages:
                relay(consumer, producer, settings, messages, timeout)
    finally:
        consumer.close()
        producer.flush(settings.shutdown_timeout)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
