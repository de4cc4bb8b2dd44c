"""Each setting's value checked on its own, without connecting anywhere.

The parsers turn a value from the environment (text), the TOML file (typed) or a flag into the
setting, within its bounds, or raise a message that names the problem and, for a secret,
never echoes it. A TOML value of the wrong type is a problem, never coerced. librdkafka
properties are checked by librdkafka itself (:func:`kafka_problems`), the Redis and Schema
Registry URLs as their clients would read them. Settings checked against each other, and the
table of which parser reads which setting, are :mod:`enricher.config`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from enricher.redaction import is_secret_kafka_key, scrub, url_redaction
from enricher.session import Timeouts

# Upper bounds (README's configuration table; see enricher.config._PARSERS): session timeouts
# and the other durations in seconds at most 30 days (a timeout of 1e300 s overflowed at the
# first Redis write), and Kafka's own limits.
MAX_DURATION_SECONDS = 30 * 86_400
MAX_BATCH_SIZE = 1_000_000  # librdkafka's limit for one consume call
MAX_TRANSACTION_TIMEOUT_MS = 900_000  # the broker's default transaction.max.timeout.ms
MAX_MESSAGE_BYTES = 100_000_000  # librdkafka's default receive.message.max.bytes
# No librdkafka property has this name: see kafka_problems.
_PROBE_PROPERTY = "enricher.config.probe"


class Problems(ValueError):
    """Several problems with one setting, each to be reported on its own."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# -- parsers: a value into the setting, within its bounds ------------------------------------


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_app_timeouts(value: Any) -> dict[str, Timeouts]:
    """``{"app": [fg, bg]}`` in TOML, or ``app=fg:bg,other=fg:bg`` in the environment. Every
    bad entry is reported, each timeout bounded like the foreground and background ones."""
    entries: list[tuple[str, Any]] = []
    problems: list[str] = []
    if isinstance(value, Mapping):
        entries = [(str(app), pair) for app, pair in value.items()]
    else:
        for part in filter(None, (p.strip() for p in str(value).split(","))):
            app, sep, pair = part.partition("=")
            if sep:
                entries.append((app.strip(), pair.split(":")))
            else:
                problems.append(f"expected app=foreground:background, got {part!r}")
    out: dict[str, Timeouts] = {}
    for app, pair in entries:
        if not app:
            problems.append("an app id must not be empty")
        elif app in out:
            problems.append(f"app {app!r}: given twice")
        elif not isinstance(pair, list) or len(pair) != 2:
            problems.append(f"app {app!r}: expected two timeouts (foreground, background)")
        else:
            try:
                foreground, background = (parse_duration(_toml_number(t)) for t in pair)
                out[app] = Timeouts.from_seconds(foreground, background)
            except (TypeError, ValueError) as error:
                problems.append(f"app {app!r}: {error}")
    if problems:
        raise Problems(problems)
    return out


def _toml_number(value: Any) -> Any:
    """A TOML number, or text to parse: not a TOML bool (which ``float`` would take as 0/1)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {_toml_type(value)}")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if str(value) not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return parse


def number(kind: Callable[[Any], float], low: float, high: float, why: str = "") -> Any:
    """A parser for a finite number from ``low`` to ``high``; ``why`` explains the maximum."""

    def parse(value: Any) -> Any:
        parsed = kind(value)
        if not math.isfinite(parsed):
            raise ValueError(f"must be a finite number, got {value!r}")
        if parsed < low:
            raise ValueError(
                f"must not be negative, got {value!r}"
                if low == 0
                else f"must be at least {low:.15g}, got {value!r}"
            )
        if parsed > high:
            raise ValueError(f"must be at most {high:.15g}{why}, got {value!r}")
        return parsed

    return parse


parse_duration = number(float, 0, MAX_DURATION_SECONDS, " (30 days)")


def parse_key_prefix(value: Any) -> str:
    text = str(value)
    if "{" in text or "}" in text:
        raise ValueError("must not contain '{' or '}' (they are the Redis Cluster hash tag)")
    return text


# -- TOML types: a value of the wrong type is a problem, never coerced ------------------------

_TOML_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def _toml_type(value: Any) -> str:
    """What TOML calls the type of ``value`` (for messages: never the value, a secret maybe)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return "a date or time"


def toml_type_problem(key: str, declared: str, value: Any) -> str | None:
    """Why ``value`` from the file cannot be setting ``key``, whose field is declared of type
    ``declared``: ``batch_size = true`` or ``metrics_port = 9108.9`` are not silently turned
    into numbers."""
    if key == "app_timeouts":  # a table, or the environment's text form
        if isinstance(value, Mapping | str):
            return None
        return f"expected a table, got {_toml_type(value)}"
    if declared not in _TOML_TYPES:
        return None
    check, expected = _TOML_TYPES[declared]
    return None if check(value) else f"expected {expected}, got {_toml_type(value)}"


def read_kafka_table(
    table: Any, origin: str, kafka: dict[str, str], origins: dict[str, str]
) -> list[str]:
    """The file's ``[kafka]`` table into ``kafka``. Dotted keys written bare
    (``ssl.key.password = "..."``) are nested tables in TOML: they are joined back into the
    property name. Values are strings, numbers or booleans (``true``, ``false``)."""
    if not isinstance(table, Mapping):
        return [f"{origin}: expected a table of librdkafka settings, got {_toml_type(table)}"]
    problems = []
    for name, value in _flatten(table):
        if isinstance(value, bool):
            kafka[name] = "true" if value else "false"
        elif isinstance(value, int | float | str):
            kafka[name] = str(value)
        else:
            problems.append(f"{origin}.{name}: expected a string, number or boolean")
            continue
        origins[name] = f"{origin}.{name}"
    return problems


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in table.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# -- librdkafka properties and URLs, checked without connecting anywhere -----------------------


def kafka_problems(kafka: Mapping[str, str], origins: Mapping[str, str] | None = None) -> list[str]:
    """librdkafka's own verdict on each property, one problem per property it refuses (an
    unknown name, or an invalid value), named by its origin (``ENRICHER_KAFKA_...``).

    No client is created. confluent_kafka hands a new client's properties to librdkafka one by
    one, in order, and raises at the first one refused, before any client exists. Each property
    is tried followed by :data:`_PROBE_PROPERTY`, which librdkafka does not know: when the
    refusal names the probe, the property (name and value) was accepted. A check takes about
    10 microseconds; creating a real client takes about 2 ms, starts threads and connects.
    """
    if not kafka:
        return []
    from confluent_kafka import KafkaException, Producer

    problems = []
    for name, value in kafka.items():
        origin = (origins or {}).get(name, f"kafka property {name!r}")
        if name == "logger":  # confluent_kafka's, a Python object: not from text
            problems.append(f"{origin}: 'logger' is not a librdkafka property")
            continue
        try:
            Producer({name: value, _PROBE_PROPERTY: ""})
        except KafkaException as error:
            message = error.args[0].str()
        except (TypeError, ValueError, AttributeError) as error:
            message = str(error)  # a callback or table confluent_kafka handles itself
        else:  # librdkafka accepted the probe (it cannot): the client is dropped at once
            continue
        if f'"{_PROBE_PROPERTY}"' in message:
            continue
        if message.startswith("No such configuration property"):
            problems.append(f"{origin}: unknown librdkafka property {name!r}")
            continue
        if is_secret_kafka_key(name):
            message = scrub(message, [value])
        problems.append(f"{origin}: {message}")
    return problems


def redis_url_problems(name: str, url: str, *, cluster: bool) -> list[str]:
    """What redis-py would refuse in ``url`` at the first command (a scheme, a port that is
    not a number or out of range, a broken IPv6 host, an unknown or invalid query
    parameter), found by building a connection object without connecting. Each problem is
    named ``name``; the URL is shown redacted and the error scrubbed of its credentials."""
    import redis

    shown, secrets = url_redaction(url)
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        return [f"{name}: scheme must be redis, rediss or unix, not {scheme!r} ({shown})"]
    try:
        pool = redis.ConnectionPool.from_url(url)
        pool.make_connection()  # checks the parameters; connects only when first used
    except Exception as error:  # any refusal is a configuration problem, never a traceback
        return [f"{name}: {scrub(str(error), secrets)} ({shown})"]
    database = pool.connection_kwargs.get("db") or 0
    if cluster and database != 0:
        return [f"{name}: Redis Cluster has only database 0, not {database} ({shown})"]
    return []


def registry_url_problems(name: str, url: str) -> list[str]:
    """Why ``url`` is no Schema Registry URL (an http:// or https:// one with a host and a
    valid port), each problem named ``name``, the URL redacted."""
    shown, secrets = url_redaction(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port that is not a number or out of range)
    except ValueError as error:
        return [f"{name}: {scrub(str(error), secrets)} ({shown})"]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [f"{name}: expected an http:// or https:// URL ({shown})"]
    return []
