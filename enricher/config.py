"""Settings: read from ``ENRICHER_*`` variables and/or a TOML file, validated up front.

Every problem is collected and reported at once (:class:`ConfigError`), before anything
connects anywhere. Precedence: command-line flags, then environment, then the file, then the
defaults. Secrets are kept out of ``repr`` and logs.
"""

from __future__ import annotations

import math
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from enricher.session import DEFAULT_TIMEOUT_SECONDS, STORAGE_MECHANISMS, SessionConfig, Timeouts

ENV_PREFIX = "ENRICHER_"
KAFKA_PREFIX = "KAFKA_"
FORMATS = ("json", "avro", "avro-registry")
DEFAULT_SALT = "session-enricher-default-salt"
_SECRET_KAFKA_KEYS = ("password", "secret", "key.pem", "token")


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
    storage_mechanism: str = "LOCAL_STORAGE"
    input_format: str = "json"
    output_format: str = "json"
    schema_registry_url: str = field(default="", repr=False)
    batch_size: int = 1000
    batch_timeout_ms: int = 200
    max_message_bytes: int = 900_000
    transaction_timeout_ms: int = 30_000
    shutdown_timeout: float = 20.0
    session_api_renew: bool = False
    session_api_token: str = field(default="", repr=False)
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
        """The settings as a dict fit for a log line: secrets masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("salt", "session_api_token"):
                value = "***"
            elif f.name in ("redis_url", "schema_registry_url"):
                value = redact_url(value)
            elif f.name == "kafka":
                value = {k: ("***" if is_secret_kafka_key(k) else v) for k, v in value.items()}
            elif f.name == "app_timeouts":
                value = {
                    k: [t.foreground_ms / 1000, t.background_ms / 1000] for k, t in value.items()
                }
            out[f.name] = value
        return out


def is_secret_kafka_key(key: str) -> bool:
    return any(word in key for word in _SECRET_KAFKA_KEYS)


def redact_url(url: str) -> str:
    """``redis://user:pw@host`` -> ``redis://user:***@host``."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_app_timeouts(value: Any) -> dict[str, Timeouts]:
    """``{"app": [fg, bg]}`` in TOML, or ``app=fg:bg,other=fg:bg`` in the environment."""
    items: dict[str, Any]
    if isinstance(value, Mapping):
        items = dict(value)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in str(value).split(","))):
            app, sep, pair = part.partition("=")
            if not sep:
                raise ValueError(f"expected app=foreground:background, got {part!r}")
            items[app.strip()] = pair.split(":")
    out: dict[str, Timeouts] = {}
    for app, pair in items.items():
        if len(pair) != 2:
            raise ValueError(f"app {app!r}: expected two timeouts (foreground, background)")
        out[app] = Timeouts.from_seconds(float(pair[0]), float(pair[1]))
    return out


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if str(value) not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return parse


def _non_negative(kind: Callable[[Any], float]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        number = kind(value)
        if number < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {value!r}")
        return number

    return parse


def _positive_int(value: Any) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return number


def _prefix(value: Any) -> str:
    text = str(value)
    if "{" in text or "}" in text:
        raise ValueError("must not contain '{' or '}' (they are the Redis Cluster hash tag)")
    return text


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "redis_cluster": _parse_bool,
    "session_context": _parse_bool,
    "lifecycle_context": _parse_bool,
    "keep_tracker_entities": _parse_bool,
    "session_api_renew": _parse_bool,
    "state_ttl_days": _non_negative(float),
    "session_events_lateness": _non_negative(float),
    "state_sweep_interval": _non_negative(float),
    "foreground_timeout": _non_negative(float),
    "background_timeout": _non_negative(float),
    "app_timeouts": _parse_app_timeouts,
    "storage_mechanism": _choice(*STORAGE_MECHANISMS),
    "input_format": _choice(*FORMATS),
    "output_format": _choice(*FORMATS),
    "batch_size": _positive_int,
    "batch_timeout_ms": _positive_int,
    "max_message_bytes": _positive_int,
    "transaction_timeout_ms": _positive_int,
    "shutdown_timeout": _non_negative(float),
    "metrics_port": _non_negative(int),
    "log_format": _choice("text", "json"),
    "log_level": _choice("DEBUG", "INFO", "WARNING", "ERROR"),
    "redis_key_prefix": _prefix,
}
_NAMES = {f.name for f in fields(Settings)} - {"kafka"}


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

    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError([f"{config_file}: {error}"]) from None
        for key, value in document.items():
            if key == "kafka" and isinstance(value, Mapping):
                kafka.update({str(k): str(v) for k, v in value.items()})
            elif key in _NAMES:
                raw[key] = (f"{config_file}:{key}", value)
            else:
                problems.append(f"{config_file}: unknown setting {key!r}")

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :]
        if key.startswith(KAFKA_PREFIX):
            kafka[key[len(KAFKA_PREFIX) :].lower().replace("_", ".")] = value
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
            problems.append(f"{origin}: {error}")

    settings = Settings(**values, kafka=kafka)
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
        scheme = urlsplit(settings.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            problems.append(
                f"{ENV_PREFIX}REDIS_URL: scheme must be redis, rediss or unix, not {scheme!r}"
            )
    if settings.session_api_renew and len(settings.session_api_token) < 16:
        problems.append(
            f"{ENV_PREFIX}SESSION_API_RENEW needs {ENV_PREFIX}SESSION_API_TOKEN"
            " (at least 16 characters)"
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
