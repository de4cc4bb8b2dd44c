"""Wiring: what each command is made of, built from settings in this one place.

The CLI (:mod:`enricher.cli`) parses arguments and settings and calls these; nothing else
builds a store, an enricher, a service or a lookup.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException

from enricher import gc_tuning, rekey
from enricher.config import ConfigError, Settings
from enricher.devices import DeviceId, sources_for
from enricher.enrich import Enricher, EntityOptions
from enricher.ids import IdDeriver
from enricher.session import SessionEngine
from enricher.store import PartitionStore, connect

if TYPE_CHECKING:
    from enricher.codecs.factory import Codecs
    from enricher.metrics import Metrics
    from enricher.service import Service

log = logging.getLogger("enricher")
_ALARM_SLACK_SECONDS = 5


def enricher(settings: Settings) -> Enricher:
    return Enricher(
        SessionEngine(settings.session_config()),
        EntityOptions(
            session_context=settings.session_context,
            lifecycle_context=settings.lifecycle_context,
            keep_tracker_entities=settings.keep_tracker_entities,
            anonymous_apps=frozenset(
                a.strip() for a in settings.anonymous_apps.split(",") if a.strip()
            ),
        ),
    )


def partition_store(settings: Settings) -> PartitionStore:
    """The service's state in Redis (also what file mode and the session lookup read)."""
    return PartitionStore(
        connect(settings), settings.redis_key_prefix, settings.input_topic, IdDeriver(settings.salt)
    )


def input_partitions(settings: Settings) -> int:
    """The input topic's partition count, from Kafka."""
    from confluent_kafka.admin import AdminClient

    if not settings.bootstrap_servers:
        raise ConfigError(["--partitions, or ENRICHER_BOOTSTRAP_SERVERS to look it up"])
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, **settings.kafka})
    topics = admin.list_topics(settings.input_topic, timeout=15).topics
    partitions = topics[settings.input_topic].partitions if settings.input_topic in topics else {}
    if not partitions:
        raise ConfigError([f"input topic {settings.input_topic!r} not found in Kafka"])
    return len(partitions)


def input_producer_config(settings: Settings) -> dict[str, Any]:
    """How ``enricher generate --topic`` produces: as a collector does, with the Java clients'
    partitioner, and idempotent, so that retries cannot reorder a device's events (its
    sessions depend on their order)."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "partitioner": "murmur2_random",
        "linger.ms": 20,
        "enable.idempotence": True,
        **settings.kafka,
    }


def run_service(settings: Settings) -> int:
    """``enricher run``: the service, its HTTP endpoints and its signal handling, until
    SIGTERM; the process's exit code."""
    from enricher.api import SessionApi
    from enricher.codecs import factory
    from enricher.http import HttpServer
    from enricher.lookup import SessionLookup
    from enricher.metrics import Metrics
    from enricher.service import LayoutChanged, Service

    # SIGTERM and SIGINT are taken by a thread of their own (below), so that the shutdown
    # deadline is armed even while the main thread is blocked inside librdkafka. Block them
    # before any thread starts (librdkafka's included): threads inherit the mask.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    metrics = Metrics()
    codecs = factory.codecs(settings)
    gc_tuning.tune()
    device_id = DeviceId(sources_for(settings.device_id, settings.input_format))
    hop = settings.input_format == "snowplow-collector" or not device_id.only_key
    enrich_settings = settings
    try:
        if hop:
            topic = rekey.by_device_topic(settings.group_id)
            create_by_device_topic(settings, topic)
            enrich_settings = replace(settings, input_topic=topic)
        store = partition_store(enrich_settings)
        service = Service(enrich_settings, enricher(settings), store, codecs, metrics)
        hopper = rekeyer(settings, codecs, device_id, metrics, service.stopping) if hop else None
    except KafkaException as error:  # settings librdkafka accepts one by one, not together
        print(f"enricher: invalid Kafka settings: {settings.scrub(str(error))}", file=sys.stderr)
        return 2
    except ConfigError as error:
        print(f"enricher: {error}", file=sys.stderr)
        return 2
    http = HttpServer(metrics, service.ready, service.live)
    try:
        service.check_layout()
        lookup = SessionLookup(store, service.partition_count, settings.session_config())
    except KafkaException as error:
        log.error("cannot read the input topic's metadata: %s", error)
        return 1
    except LayoutChanged as error:
        log.error("refusing to start: %s", error)
        return 2
    api = SessionApi(
        lookup,
        token=settings.session_api_token or None,
        renew=settings.session_api_renew,
        anonymous_reads=settings.session_api_anonymous_reads,
    )
    http.add_route(SessionApi.prefix, api)
    service.on_progress = http.heartbeat
    port = http.start(settings.metrics_host, settings.metrics_port)
    log.info("http on %s:%d (/metrics, /healthz, /readyz)", settings.metrics_host, port)

    def watch_signals() -> None:
        first = signal.Signals(signal.sigwait(stop_signals))
        log.info("%s: finishing the batch and leaving the group", first.name)
        service.stop()
        deadline = threading.Timer(settings.shutdown_timeout, _overdue, (settings,))
        deadline.daemon = True
        deadline.start()
        # The backstop, should a call into librdkafka hold the GIL past the deadline: SIGALRM's
        # default action ends the process without Python.
        signal.alarm(math.ceil(settings.shutdown_timeout) + _ALARM_SLACK_SECONDS)
        second = signal.Signals(signal.sigwait(stop_signals))
        log.warning("second %s: exiting now", second.name)
        os._exit(130)

    threading.Thread(target=watch_signals, name="signals", daemon=True).start()
    failed: list[BaseException] = []
    hop_thread = None
    if hopper is not None:
        hop_thread = threading.Thread(
            target=_run_hop, args=(hopper, service, failed), name="rekey", daemon=True
        )
        hop_thread.start()
    try:
        service.run()
    except KafkaException as error:
        log.error("stopping on a fatal Kafka error: %s", error)
        return 1
    except LayoutChanged as error:
        log.error("stopping: %s", error)
        return 2
    finally:
        service.stop()
        if hop_thread is not None:
            hop_thread.join(settings.shutdown_timeout)
        http.stop()
    if failed:
        return 1
    log.info("stopped")
    return 0


def migrate_state(settings: Settings, partitions: int) -> int:
    """``enricher state migrate``: move the device state to a new input partition count."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    from enricher.migrate import MigrationError, migrate
    from enricher.output import consumer_config

    consumer = Consumer(consumer_config(settings))
    try:
        wanted = [TopicPartition(settings.input_topic, p) for p in range(partitions)]
        found = consumer.committed(wanted, timeout=30)
    finally:
        consumer.close()
    committed = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
    try:
        done = migrate(partition_store(settings), committed, partitions, int(time.time() * 1000))
    except MigrationError as error:
        print(f"enricher: {error}", file=sys.stderr)
        return 2
    print(
        f"state migrated from {done.partitions_before} to {done.partitions_after} partitions:"
        f" {done.moved} devices moved, {done.dropped} uncommitted records dropped"
    )
    return 0


def create_by_device_topic(settings: Settings, topic: str) -> None:
    """The re-keying hop's topic, created if missing with the input's partition count and
    retention (a state repair replays it as it would the input)."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AdminClient,
        ConfigResource,
        NewTopic,
    )

    partitions = input_partitions(settings)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, **settings.kafka})
    source = ConfigResource(ConfigResource.Type.TOPIC, settings.input_topic)
    described = admin.describe_configs([source])[source].result(timeout=30)
    retention = {
        name: entry.value
        for name, entry in described.items()
        if name in ("retention.ms", "retention.bytes") and entry.value is not None
    }
    new_topic = NewTopic(topic, num_partitions=partitions, config=retention)
    futures = admin.create_topics([new_topic])
    try:
        futures[topic].result(timeout=30)
        log.info("created the re-keying topic %s (%d partitions, %s)", topic, partitions, retention)
    except KafkaException as error:
        if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    existing = admin.list_topics(topic, timeout=15).topics[topic].partitions
    if len(existing) != partitions:
        raise ConfigError(
            [f"the re-keying topic {topic} has {len(existing)} partitions, the input {partitions}"]
        )


def rekeyer(
    settings: Settings,
    codecs: Codecs,
    device_id: DeviceId,
    metrics: Metrics,
    stopping: threading.Event,
) -> rekey.Rekeyer:
    """The re-keying hop of ``enricher run`` (:mod:`enricher.rekey`)."""
    from confluent_kafka import Consumer, Producer

    from enricher.output import Output, consumer_config, producer_config

    transactional_id = f"{settings.effective_transactional_id()}-rekey"
    output = Output(
        lambda on_delivery: Producer(
            {
                **producer_config(settings),
                "transactional.id": transactional_id,
                "on_delivery": on_delivery,
            },
            logger=logging.getLogger("enricher.kafka"),
        ),
        max(10.0, settings.transaction_timeout_ms / 1000),
    )
    splits = settings.input_format == "snowplow-collector"
    return rekey.Rekeyer(
        Consumer(consumer_config(settings), logger=logging.getLogger("enricher.kafka")),
        output,
        rekey.Router(
            codecs.decode,
            device_id,
            splits=splits,
            max_message_bytes=settings.max_message_bytes,
        ),
        input_topic=settings.input_topic,
        topics={
            "device": rekey.by_device_topic(settings.group_id),
            "output": settings.output_topic,
            "dead_letters": settings.dlq_topic,
        },
        batch_size=settings.batch_size,
        batch_timeout=settings.batch_timeout_ms / 1000,
        max_message_bytes=settings.max_message_bytes,
        metrics=metrics,
        stopping=stopping,
    )


def _run_hop(hopper: rekey.Rekeyer, service: Service, failed: list[BaseException]) -> None:
    """The re-keying hop's thread: a failure stops the whole service."""
    try:
        hopper.run()
    except BaseException as error:
        log.error("the re-keying hop stopped: %s", error)
        failed.append(error)
        service.stop()


def _overdue(settings: Settings) -> None:
    log.error(
        "shutdown took longer than %.0fs; exiting without a clean leave", settings.shutdown_timeout
    )
    os._exit(3)
