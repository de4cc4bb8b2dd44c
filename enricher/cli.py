"""Entry points: ``enricher batch`` (files) and ``enricher run`` (the streaming service)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enricher import __version__, config
from enricher.enrich import Enricher, EntityOptions
from enricher.session import SessionEngine


def _session_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--foreground-timeout", type=float, metavar="S", help="seconds (1800)")
    parser.add_argument("--background-timeout", type=float, metavar="S", help="seconds (1800)")
    parser.add_argument("--salt", help="secret the user and session ids are derived from")
    parser.add_argument(
        "--session-context",
        action=argparse.BooleanOptionalAction,
        help="attach the client_session entity (default: on)",
    )
    parser.add_argument(
        "--lifecycle-context",
        action=argparse.BooleanOptionalAction,
        help="attach the application_lifecycle entity (default: off)",
    )
    parser.add_argument(
        "--keep-tracker-entities",
        action=argparse.BooleanOptionalAction,
        help="keep a client_session the tracker already attached (default: replace it)",
    )
    parser.add_argument("--storage-mechanism", help="storageMechanism field (LOCAL_STORAGE)")
    parser.add_argument(
        "--redis-url", help="continue the streaming service's sessions: state in this Redis"
    )


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in names}


_SESSION_OVERRIDES = (
    "foreground_timeout",
    "background_timeout",
    "salt",
    "session_context",
    "lifecycle_context",
    "keep_tracker_entities",
    "storage_mechanism",
    "redis_url",
    "input_topic",
)


def build_enricher(settings: config.Settings) -> Enricher:
    return Enricher(
        SessionEngine(settings.session_config()),
        EntityOptions(
            session_context=settings.session_context,
            lifecycle_context=settings.lifecycle_context,
            keep_tracker_entities=settings.keep_tracker_entities,
        ),
    )


def _warn_default_salt(settings: config.Settings) -> None:
    if settings.salt == config.DEFAULT_SALT:
        print(
            "warning: no salt set (--salt or ENRICHER_SALT): ids are reproducible,"
            " but anyone who knows the default salt can link them",
            file=sys.stderr,
        )


def _batch(args: argparse.Namespace) -> int:
    from enricher import batch

    settings = config.load(config_file=args.config, overrides=_overrides(args, _SESSION_OVERRIDES))
    if not args.input.is_file():
        raise config.ConfigError([f"--input {args.input}: no such file"])
    _warn_default_salt(settings)
    store: batch.StateStore
    if args.redis_url:
        from enricher.store import BatchRedisStore, connect

        if not settings.input_topic:
            raise config.ConfigError(
                ["--redis-url needs the service's input topic (--input-topic), to find its state"]
            )
        store = BatchRedisStore(connect(settings), settings, partitions=args.partitions)
    else:
        store = batch.MemoryStore()
    try:
        summary = batch.run(build_enricher(settings), args.input, args.output, store)
    except batch.UnusableFile as error:
        print(f"enricher: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


_RUN_REQUIRED = (
    "bootstrap_servers",
    "input_topic",
    "output_topic",
    "dlq_topic",
    "redis_url",
)


def _run(args: argparse.Namespace) -> int:
    import logging
    import os
    import signal
    import threading

    from confluent_kafka import KafkaException

    from enricher import formats, logs
    from enricher.api import SessionApi
    from enricher.ids import IdDeriver
    from enricher.lookup import SessionLookup
    from enricher.metrics import HttpServer, Metrics
    from enricher.service import Service
    from enricher.store import PartitionStore, connect

    settings = config.load(config_file=args.config, require=_RUN_REQUIRED)
    logs.configure(settings.log_format, settings.log_level)
    log = logging.getLogger("enricher")
    _warn_default_salt(settings)
    # SIGTERM and SIGINT are taken by a thread of their own (below), so that the shutdown
    # deadline is armed even while the main thread is blocked inside librdkafka. Block them
    # before any thread starts (librdkafka's included): threads inherit the mask.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    metrics = Metrics()
    store = PartitionStore(
        connect(settings), settings.redis_key_prefix, settings.input_topic, IdDeriver(settings.salt)
    )
    service = Service(settings, build_enricher(settings), store, formats.codecs(settings), metrics)
    http = HttpServer(metrics, service.ready)
    try:
        lookup = SessionLookup(store, service.input_partitions(), settings.session_config())
    except KafkaException as error:
        log.error("cannot read the input topic's metadata: %s", error)
        return 1
    token = settings.session_api_token if settings.session_api_renew else None
    http.add_route(SessionApi.prefix, SessionApi(lookup, renew_token=token))
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
        second = signal.Signals(signal.sigwait(stop_signals))
        log.warning("second %s: exiting now", second.name)
        os._exit(130)

    threading.Thread(target=watch_signals, name="signals", daemon=True).start()
    try:
        service.run()
    except KafkaException as error:
        log.error("stopping on a fatal Kafka error: %s", error)
        return 1
    finally:
        http.stop()
    log.info("stopped")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from enricher import generate
    from enricher.codecs import avro, tracker

    traffic = generate.Traffic(
        events=args.events,
        devices=args.devices,
        seed=args.seed,
        foreground_timeout=args.foreground_timeout,
        background_timeout=args.background_timeout,
    )
    encode = avro.encode_raw if args.format == "avro" else tracker.dump
    pacer = generate.Pacer(args.rate)
    if args.topic:
        from confluent_kafka import Producer

        settings = config.load(config_file=args.config, require=("bootstrap_servers",))
        producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "partitioner": "murmur2_random",
                "linger.ms": 20,
                **settings.kafka,
            }
        )
        for key, event in generate.events(traffic):
            pacer.wait()
            while True:
                try:
                    producer.produce(args.topic, value=encode(event), key=key)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
        remaining = producer.flush(60)
        if remaining:
            print(f"enricher: {remaining} events not delivered", file=sys.stderr)
            return 1
    else:
        with sys.stdout.buffer as out:
            for key, event in generate.events(traffic):
                pacer.wait()
                out.write(tracker.dump({"key": key, "event": event}) + b"\n")
    return 0


def _session(args: argparse.Namespace) -> int:
    import json

    from enricher.ids import IdDeriver
    from enricher.lookup import SessionLookup
    from enricher.store import PartitionStore, connect

    settings = config.load(config_file=args.config, require=("redis_url", "input_topic"))
    partitions = args.partitions or _topic_partitions(settings)
    store = PartitionStore(
        connect(settings), settings.redis_key_prefix, settings.input_topic, IdDeriver(settings.salt)
    )
    lookup = SessionLookup(store, partitions, settings.session_config())
    if args.action == "renew":
        lookup.renew(args.device_id)
        print(f"renew requested: the next event of {args.device_id!r} starts a new session")
        return 0
    view = lookup.get(args.device_id)
    if view is None:
        print(f"enricher: no session for device {args.device_id!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view.as_dict(), indent=2))
    else:
        rows = view.as_dict()
        width = max(map(len, rows))
        for name, value in rows.items():
            print(f"{name:<{width}}  {'null' if value is None else value}")
    return 0


def _topic_partitions(settings: config.Settings) -> int:
    """The input topic's partition count, from Kafka."""
    from confluent_kafka.admin import AdminClient

    if not settings.bootstrap_servers:
        raise config.ConfigError(["--partitions, or ENRICHER_BOOTSTRAP_SERVERS to look it up"])
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, **settings.kafka})
    topics = admin.list_topics(settings.input_topic, timeout=15).topics
    partitions = topics[settings.input_topic].partitions if settings.input_topic in topics else {}
    if not partitions:
        raise config.ConfigError([f"input topic {settings.input_topic!r} not found in Kafka"])
    return len(partitions)


def _overdue(settings: config.Settings) -> None:
    import logging
    import os

    logging.getLogger("enricher").error(
        "shutdown took longer than %.0fs; exiting without a clean leave", settings.shutdown_timeout
    )
    os._exit(3)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="enricher", description="Snowplow client_session entities, computed server-side."
    )
    root.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = root.add_subparsers(dest="command", required=True)

    batch = commands.add_parser(
        "batch",
        help="enrich a file (JSON Lines, or Avro by the .avro extension)",
        description='Enrich a file: one {"key": device id, "event": {...}} per line, or an'
        " Avro container file. Bad records go to OUTPUT.errors.jsonl.",
    )
    batch.add_argument("--input", type=Path, required=True, metavar="IN")
    batch.add_argument("--output", type=Path, required=True, metavar="OUT")
    _session_flags(batch)
    batch.add_argument("--input-topic", help="the service's input topic, with --redis-url")
    batch.add_argument(
        "--partitions",
        type=int,
        default=12,
        help="partitions of the service's input topic, to find its state in Redis (12)",
    )
    batch.set_defaults(handler=_batch)

    run = commands.add_parser(
        "run",
        help="the streaming service: Kafka in, Kafka out, state in Redis, exactly once",
        description="Consume raw events, enrich them, publish them exactly once. Configured by"
        " ENRICHER_* environment variables and/or --config FILE (TOML); ENRICHER_KAFKA_<NAME>"
        " passes any librdkafka setting through.",
    )
    run.add_argument("--config", type=Path, help="TOML settings file")
    run.set_defaults(handler=_run)

    gen = commands.add_parser(
        "generate",
        help="realistic mobile tracker traffic, to stdout (JSON Lines) or a Kafka topic",
    )
    gen.add_argument("--events", type=int, default=100_000)
    gen.add_argument("--devices", type=int, default=10_000)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--rate", type=float, default=0.0, help="events/s (0: as fast as possible)")
    gen.add_argument("--foreground-timeout", type=float, default=1800.0, metavar="S")
    gen.add_argument("--background-timeout", type=float, default=1800.0, metavar="S")
    gen.add_argument("--topic", help="produce to this topic (ENRICHER_BOOTSTRAP_SERVERS)")
    gen.add_argument("--format", choices=("json", "avro"), default="json", help="topic format")
    gen.add_argument("--config", type=Path, help="TOML settings file")
    gen.set_defaults(handler=_generate)

    session = commands.add_parser(
        "session",
        help="a device's current session (the tracker's getters), or renew it",
        description="Reads the streaming service's state (ENRICHER_REDIS_URL,"
        " ENRICHER_REDIS_KEY_PREFIX, ENRICHER_INPUT_TOPIC, ENRICHER_SALT).",
    )
    session.add_argument("action", choices=("get", "renew"))
    session.add_argument("device_id")
    session.add_argument("--json", action="store_true", help="JSON instead of a table")
    session.add_argument(
        "--partitions", type=int, help="input topic partitions (default: ask Kafka)"
    )
    session.add_argument("--config", type=Path, help="TOML settings file")
    session.set_defaults(handler=_session)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except config.ConfigError as error:
        print(f"enricher: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"enricher: {error}", file=sys.stderr)
        return 2
    return code
