"""Entry points: ``enricher run`` (the streaming service), ``enricher batch`` (file mode),
``enricher generate`` (traffic) and ``enricher session`` (a device's session). This module
only parses arguments and settings; :mod:`enricher.app` builds what each command runs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from enricher import __version__, app, config, gc_tuning


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


def _warn_default_salt(settings: config.Settings) -> None:
    if settings.salt == config.DEFAULT_SALT:
        print(
            "warning: no salt set (--salt or ENRICHER_SALT): ids are reproducible,"
            " but anyone who knows the default salt can link them",
            file=sys.stderr,
        )


def _batch(args: argparse.Namespace) -> int:
    from enricher import batch
    from enricher.devices import DeviceId, sources_for

    settings = config.load(config_file=args.config, overrides=_overrides(args, _SESSION_OVERRIDES))
    if not args.input.is_file():
        raise config.ConfigError([f"--input {args.input}: no such file"])
    _warn_default_salt(settings)
    store: batch.StateStore
    if args.redis_url:
        from enricher.store import FileModeStore

        if not settings.input_topic:
            raise config.ConfigError(
                ["--redis-url needs the service's input topic (--input-topic), to find its state"]
            )
        store = FileModeStore(app.partition_store(settings), partitions=args.partitions)
    else:
        store = batch.MemoryStore()
    reference_ms = args.reference_time
    if reference_ms is None:
        reference_ms = int(time.time() * 1000)
    bound = batch.TimeBound(reference_ms, round(settings.max_event_ahead * 1000))
    gc_tuning.tune()
    try:
        device_id = DeviceId(sources_for(settings.device_id, settings.input_format))
        summary = batch.run(
            app.enricher(settings), args.input, args.output, store, bound, device_id=device_id
        )
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
    from enricher import logs

    settings = config.load(config_file=args.config, require=_RUN_REQUIRED)
    logs.configure(settings.log_format, settings.log_level)
    _warn_default_salt(settings)
    return app.run_service(settings)


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
        settings = config.load(config_file=args.config, require=("bootstrap_servers",))
        producer_config = app.input_producer_config(settings)
        records: Iterable[tuple[str | bytes, bytes]]
        if args.format == "snowplow-collector":
            records = generate.collector_requests(traffic)
        else:
            records = ((key, encode(event)) for key, event in generate.events(traffic))
        remaining = generate.produce(records, args.topic, pacer, producer_config)
        if remaining:
            print(f"enricher: {remaining} records not delivered", file=sys.stderr)
            return 1
    else:
        with sys.stdout.buffer as out:
            for key, event in generate.events(traffic):
                pacer.wait()
                out.write(tracker.dump({"key": key, "event": event}) + b"\n")
    return 0


def _session(args: argparse.Namespace) -> int:
    import json

    from enricher.lookup import SessionLookup

    settings = config.load(config_file=args.config, require=("redis_url", "input_topic"))
    partitions = args.partitions or app.input_partitions(settings)
    lookup = SessionLookup(app.partition_store(settings), partitions, settings.session_config())
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


def _state(args: argparse.Namespace) -> int:
    settings = config.load(
        config_file=args.config, require=("bootstrap_servers", "input_topic", "redis_url")
    )
    return app.migrate_state(settings, args.partitions)


def _reference_time(text: str) -> int:
    """``--reference-time``: epoch milliseconds, or an ISO 8601 time with its offset."""
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected epoch milliseconds or an ISO 8601 time, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give the time's offset (Z or +hh:mm): {text!r}")
    return round(moment.timestamp() * 1000)


def _partition_count(text: str) -> int:
    """``--partitions``: a whole number, at least 1 (argparse exits 2 otherwise)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


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
        "--reference-time",
        type=_reference_time,
        metavar="T",
        help="event times more than ENRICHER_MAX_EVENT_AHEAD past this are dead-lettered"
        " (epoch ms or ISO 8601; default: now), as the service checks them against each"
        " record's Kafka timestamp",
    )
    batch.add_argument(
        "--partitions",
        type=_partition_count,
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
    gen.add_argument(
        "--format",
        choices=("json", "avro", "snowplow-collector"),
        default="json",
        help="topic format (snowplow-collector: POST requests of up to 10 events, random keys)",
    )
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
        "--partitions", type=_partition_count, help="input topic partitions (default: ask Kafka)"
    )
    session.add_argument("--config", type=Path, help="TOML settings file")
    session.set_defaults(handler=_session)

    state = commands.add_parser(
        "state",
        help="maintain the service's state in Redis",
        description="Acts on the streaming service's state (ENRICHER_REDIS_URL,"
        " ENRICHER_REDIS_KEY_PREFIX, ENRICHER_INPUT_TOPIC, ENRICHER_GROUP_ID,"
        " ENRICHER_BOOTSTRAP_SERVERS). Stop every instance first.",
    )
    state.add_argument("action", choices=("migrate",))
    state.add_argument(
        "--partitions",
        type=_partition_count,
        required=True,
        help="migrate: the input topic's new partition count",
    )
    state.add_argument("--config", type=Path, help="TOML settings file")
    state.set_defaults(handler=_state)
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
