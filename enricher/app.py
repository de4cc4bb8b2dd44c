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
from typing import Any

from confluent_kafka import KafkaException

from enricher.config import ConfigError, Settings
from enricher.enrich import Enricher, EntityOptions
from enricher.ids import IdDeriver
from enricher.session import SessionEngine
from enricher.store import PartitionStore, connect

log = logging.getLogger("enricher")
_ALARM_SLACK_SECONDS = 5


def enricher(settings: Settings) -> Enricher:
    return Enricher(
        SessionEngine(settings.session_config()),
        EntityOptions(
            session_context=settings.session_context,
            lifecycle_context=settings.lifecycle_context,
            keep_tracker_entities=settings.keep_tracker_entities,
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
    store = partition_store(settings)
    try:
        service = Service(settings, enricher(settings), store, factory.codecs(settings), metrics)
    except KafkaException as error:  # settings librdkafka accepts one by one, not together
        print(f"enricher: invalid Kafka settings: {settings.scrub(str(error))}", file=sys.stderr)
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
    try:
        service.run()
    except KafkaException as error:
        log.error("stopping on a fatal Kafka error: %s", error)
        return 1
    except LayoutChanged as error:
        log.error("stopping: %s", error)
        return 2
    finally:
        http.stop()
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


def _overdue(settings: Settings) -> None:
    log.error(
        "shutdown took longer than %.0fs; exiting without a clean leave", settings.shutdown_timeout
    )
    os._exit(3)
