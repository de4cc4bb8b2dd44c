"""Settings: read from ``ENRICHER_*`` variables and/or a TOML file, validated up front.

Every problem is collected and reported at once (:class:`ConfigError`), before anything
connects anywhere. Precedence: command-line flags, then environment, then the file, then the
defaults. Each setting is read by its parser (:mod:`enricher.validation`), then the settings
are checked against each other. Secrets are kept out of ``repr`` and logs
(:mod:`enricher.redaction`).
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from enricher import devices, redaction
from enricher.session import DEFAULT_TIMEOUT_SECONDS, STORAGE_MECHANISMS, SessionConfig, Timeouts
from enricher.validation import (
    MAX_BATCH_SIZE,
    MAX_MESSAGE_BYTES,
    MAX_TRANSACTION_TIMEOUT_MS,
    Problems,
    choice,
    kafka_problems,
    number,
    parse_app_timeouts,
    parse_bool,
    parse_duration,
    parse_key_prefix,
    read_kafka_table,
    redis_url_problems,
    registry_url_problems,
    toml_type_problem,
)

ENV_PREFIX = "ENRICHER_"
KAFKA_PREFIX = "KAFKA_"
FORMATS = ("json", "avro", "avro-registry", "snowplow-collector", "snowplow-enriched")
SNOWPLOW_FORMATS = ("snowplow-collector", "snowplow-enriched")
"""formats whose events only the same format can write back"""
ENTITY_FIELDS = ("derived_contexts", "contexts")
DEFAULT_SALT = "session-enricher-default-salt"


class ConfigError(ValueError):
    """One or more settings are missing or invalid."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    """Everything the enricher can be told."""

    bootstrap_servers: str = ""
    input_topic: str = ""
    output_topic: str = ""
    dlq_topic: str = ""
    session_events_topic: str = ""
    session_events_lateness: float = 300.0
    group_id: str = "session-enricher"
    transactional_id: str = ""
    redis_url: str = field(default="", repr=False)
    redis_cluster: bool = False
    redis_key_prefix: str = "enricher:"
    state_ttl_days: float = 0.0
    state_sweep_interval: float = 3600.0
    foreground_timeout: float = DEFAULT_TIMEOUT_SECONDS
    background_timeout: float = DEFAULT_TIMEOUT_SECONDS
    app_timeouts: Mapping[str, Timeouts] = field(default_factory=dict)
    salt: str = field(default=DEFAULT_SALT, repr=False)
    session_context: bool = True
    lifecycle_context: bool = False
    keep_tracker_entities: bool = False
    anonymous_apps: str = ""
    """comma-separated app ids whose events get the anonymous session entity"""
    storage_mechanism: str = "LOCAL_STORAGE"
    input_format: str = "json"
    output_format: str = "json"
    entity_field: str = "derived_contexts"
    device_id: str = ""
    """the device's sources, first non-empty wins (:mod:`enricher.devices`); empty: the
    input format's default"""
    """``snowplow-enriched``: the contexts column the entities go into"""
    schema_registry_url: str = field(default="", repr=False)
    batch_size: int = 1000
    batch_timeout_ms: int = 200
    max_message_bytes: int = 900_000
    max_event_ahead: float = 86_400.0
    max_batch_aborts: int = 20
    transaction_timeout_ms: int = 30_000
    shutdown_timeout: float = 20.0
    session_api_renew: bool = False
    session_api_token: str = field(default="", repr=False)
    session_api_anonymous_reads: bool = False
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9108
    log_format: str = "text"
    log_level: str = "INFO"
    kafka: Mapping[str, str] = field(default_factory=dict, repr=False)

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            salt=self.salt,
            timeouts=Timeouts.from_seconds(self.foreground_timeout, self.background_timeout),
            app_timeouts=self.app_timeouts,
            storage_mechanism=self.storage_mechanism,
        )

    def effective_transactional_id(self) -> str:
        return self.transactional_id or f"{self.group_id}-{socket.gethostname()}"

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict fit for a log line, secrets masked by rule, not by list:

        - a URL (a field whose name ends in ``_url``) is shown with its credentials masked
          (:func:`~enricher.redaction.redact_url`);
        - any other field declared with ``repr=False`` is a secret, shown as ``***``;
        - ``kafka``: each property as :func:`~enricher.redaction.redact_kafka_property` shows
          it (a secret one is ``***``, a URL is redacted).
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "kafka":
                value = {k: redaction.redact_kafka_property(k, v) for k, v in value.items()}
            elif f.name == "app_timeouts":
                value = {
                    k: [t.foreground_ms / 1000, t.background_ms / 1000] for k, t in value.items()
                }
            elif f.name.endswith("_url"):
                value = redaction.redact_url(value)
            elif not f.repr:
                value = redaction.MASK
            out[f.name] = value
        return out

    def secrets(self) -> list[str]:
        """Every secret value :meth:`redacted` masks (longest first, none empty)."""
        found: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "kafka":
                for name, text in value.items():
                    found += redaction.kafka_property_secrets(name, text)
            elif f.name.endswith("_url"):
                found += redaction.url_redaction(value)[1]
            elif not f.repr and isinstance(value, str):
                found.append(value)
        return sorted({s for s in found if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` (an error message from a client library) with every secret masked."""
        return redaction.scrub(text, self.secrets())


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "redis_cluster": parse_bool,
    "session_context": parse_bool,
    "lifecycle_context": parse_bool,
    "keep_tracker_entities": parse_bool,
    "session_api_renew": parse_bool,
    "session_api_anonymous_reads": parse_bool,
    "state_ttl_days": number(float, 0, 3650, " (10 years)"),
    "session_events_lateness": parse_duration,
    "state_sweep_interval": parse_duration,
    "foreground_timeout": parse_duration,
    "background_timeout": parse_duration,
    "app_timeouts": parse_app_timeouts,
    "storage_mechanism": choice(*STORAGE_MECHANISMS),
    "input_format": choice(*FORMATS),
    "output_format": choice(*FORMATS),
    "entity_field": choice(*ENTITY_FIELDS),
    "batch_size": number(int, 1, MAX_BATCH_SIZE, " (librdkafka's limit per consume call)"),
    "batch_timeout_ms": number(int, 1, 60_000, " (1 minute)"),
    "max_message_bytes": number(int, 1, MAX_MESSAGE_BYTES),
    "max_event_ahead": number(float, 0, 366 * 86_400, " (366 days)"),
    "max_batch_aborts": number(int, 1, 10_000),
    "transaction_timeout_ms": number(
        int, 1000, MAX_TRANSACTION_TIMEOUT_MS, " (the broker's default transaction.max.timeout.ms)"
    ),
    "shutdown_timeout": number(float, 0, 3600, " (1 hour)"),
    "metrics_port": number(int, 0, 65535),
    "log_format": choice("text", "json"),
    "log_level": choice("DEBUG", "INFO", "WARNING", "ERROR"),
    "redis_key_prefix": parse_key_prefix,
}
_NAMES = {f.name for f in fields(Settings)} - {"kafka"}
_SECRET_FIELDS = {f.name for f in fields(Settings) if not f.repr}
_FIELD_TYPES = {f.name: str(f.type) for f in fields(Settings)}


def load(
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    require: tuple[str, ...] = (),
) -> Settings:
    """Build settings from the file, the environment and flags; raise every problem at once."""
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, tuple[str, Any]] = {}
    kafka: dict[str, str] = {}
    kafka_origins: dict[str, str] = {}

    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError([f"{config_file}: {error}"]) from None
        for key, value in document.items():
            origin = f"{config_file}:{key}"
            if key == "kafka":
                problems += read_kafka_table(value, origin, kafka, kafka_origins)
            elif key in _NAMES:
                mistyped = toml_type_problem(key, _FIELD_TYPES[key], value)
                if mistyped:
                    problems.append(f"{origin}: {mistyped}")
                else:
                    raw[key] = (origin, value)
            else:
                problems.append(f"{config_file}: unknown setting {key!r}")

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :]
        if key.startswith(KAFKA_PREFIX):
            prop = key[len(KAFKA_PREFIX) :].lower().replace("_", ".")
            kafka[prop] = value
            kafka_origins[prop] = name
        elif key.lower() in _NAMES:
            raw[key.lower()] = (name, value)
        else:
            problems.append(f"{name}: unknown setting")

    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = (f"--{key.replace('_', '-')}", value)

    values: dict[str, Any] = {}
    for key, (origin, value) in raw.items():
        parse = _PARSERS.get(key, str)
        try:
            values[key] = parse(value)
        except (TypeError, ValueError) as error:
            messages = error.problems if isinstance(error, Problems) else [str(error)]
            if key in _SECRET_FIELDS:  # never echo a secret
                secrets = [str(value), *redaction.url_redaction(str(value))[1]]
                messages = [redaction.scrub(m, secrets) for m in messages]
            problems += [f"{origin}: {message}" for message in messages]

    settings = Settings(**values, kafka=kafka)
    problems += kafka_problems(kafka, kafka_origins)
    problems += _check(settings, require)
    if problems:
        raise ConfigError(problems)
    return settings


def _check(settings: Settings, require: tuple[str, ...]) -> list[str]:
    problems = [
        f"{ENV_PREFIX}{name.upper()} is required" for name in require if not getattr(settings, name)
    ]
    try:
        settings.session_config()
    except ValueError as error:
        problems.append(f"session timeouts: {error}")
    if settings.redis_url:
        problems += redis_url_problems(
            f"{ENV_PREFIX}REDIS_URL", settings.redis_url, cluster=settings.redis_cluster
        )
    if settings.schema_registry_url:
        problems += registry_url_problems(
            f"{ENV_PREFIX}SCHEMA_REGISTRY_URL", settings.schema_registry_url
        )
    if settings.session_api_renew and not settings.session_api_token:
        problems.append(
            f"{ENV_PREFIX}SESSION_API_RENEW needs {ENV_PREFIX}SESSION_API_TOKEN"
            " (at least 16 characters)"
        )
    if 0 < len(settings.session_api_token) < 16:
        problems.append(f"{ENV_PREFIX}SESSION_API_TOKEN must be at least 16 characters")
    formats = (settings.input_format, settings.output_format)
    snowplow = [f for f in formats if f in SNOWPLOW_FORMATS]
    if snowplow and formats[0] != formats[1]:
        problems.append(
            f"{ENV_PREFIX}INPUT_FORMAT and {ENV_PREFIX}OUTPUT_FORMAT must both be {snowplow[0]}"
            " when either is: its events are written back as they came, with the session"
            " entity added"
        )
    if settings.input_format in FORMATS:
        allowed = devices.allowed_sources(settings.input_format)
        unknown = [
            s
            for s in devices.sources_for(settings.device_id, settings.input_format)
            if s not in allowed
        ]
        if unknown:
            problems.append(
                f"{ENV_PREFIX}DEVICE_ID: {', '.join(unknown)} not a source of the"
                f" {settings.input_format} format (one of {', '.join(allowed)})"
            )
    registry_needed = "avro-registry" in (settings.input_format, settings.output_format)
    if registry_needed and not settings.schema_registry_url:
        problems.append(f"{ENV_PREFIX}SCHEMA_REGISTRY_URL is required for the avro-registry format")
    topics = [
        settings.input_topic,
        settings.output_topic,
        settings.dlq_topic,
        settings.session_events_topic,
    ]
    if settings.input_topic and settings.input_topic in topics[1:]:
        problems.append(
            "the input topic must differ from the output, dead-letter and session events topics"
        )
    return problems
