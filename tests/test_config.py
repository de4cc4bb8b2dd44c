"""Settings: environment, TOML file and flags, validated all at once, secrets kept out of logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enricher import config
from enricher.session import Timeouts

SECRETS = ("s3cret-salt", "hunter2", "kafka-pw", "registry-pw")


def load_error(env: dict[str, str], file: Path | None = None) -> config.ConfigError:
    with pytest.raises(config.ConfigError) as caught:
        config.load(env=env, config_file=file)
    return caught.value


def test_defaults() -> None:
    settings = config.load(env={})
    assert settings.salt == config.DEFAULT_SALT
    assert (settings.foreground_timeout, settings.background_timeout) == (1800, 1800)
    assert settings.session_config().timeouts == Timeouts(1_800_000, 1_800_000)
    assert settings.session_config().storage_mechanism == "LOCAL_STORAGE"
    assert settings.kafka == {}
    assert settings.app_timeouts == {}
    assert (settings.session_context, settings.lifecycle_context) == (True, False)


def test_every_problem_is_reported_at_once() -> None:
    env = {
        "ENRICHER_FOREGROUND_TIMEOUT": "-1",
        "ENRICHER_BACKGROUND_TIMEOUT": "soon",
        "ENRICHER_BATCH_SIZE": "0",
        "ENRICHER_STORAGE_MECHANISM": "DISK",
        "ENRICHER_SESSION_CONTEXT": "maybe",
        "ENRICHER_FOO": "1",
        "ENRICHER_REDIS_URL": "http://redis:6379",
        "PATH": "/usr/bin",  # not ours: ignored
    }
    error = load_error(env)
    named = [name for name in env if name.startswith("ENRICHER_")]
    assert len(error.problems) == len(named)
    for name in named:
        assert sum(name in problem for problem in error.problems) == 1, name
        assert name in str(error)
    assert str(error).startswith("invalid configuration:")


def test_problems_from_file_and_env_together(tmp_path: Path) -> None:
    file = tmp_path / "enricher.toml"
    file.write_text('log_level = "LOUD"\ncolour = "blue"\n')
    error = load_error({"ENRICHER_METRICS_PORT": "-80"}, file)
    assert len(error.problems) == 3
    assert any("log_level" in p and "LOUD" in p for p in error.problems)
    assert any("colour" in p and "unknown setting" in p for p in error.problems)
    assert any("ENRICHER_METRICS_PORT" in p for p in error.problems)


def test_unknown_environment_setting_is_an_error() -> None:
    error = load_error({"ENRICHER_FOO": "bar", "FOO": "ignored", "ENRICHERFOO": "ignored"})
    assert error.problems == ["ENRICHER_FOO: unknown setting"]


def test_kafka_settings_from_environment() -> None:
    settings = config.load(
        env={
            "ENRICHER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "ENRICHER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        }
    )
    assert settings.kafka == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "enricher.toml"
    file.write_text(
        "\n".join(
            [
                'salt = "from-file"',
                "foreground_timeout = 100",
                "background_timeout = 50",
                'storage_mechanism = "SQLITE"',
                "session_context = true",
                "app_timeouts = { shop = [10, 5] }",
                "[kafka]",
                '"security.protocol" = "SSL"',
                '"client.id" = "from-file"',
            ]
        )
    )
    env = {
        "ENRICHER_FOREGROUND_TIMEOUT": "200",
        "ENRICHER_SESSION_CONTEXT": "false",
        "ENRICHER_KAFKA_CLIENT_ID": "from-env",
    }
    settings = config.load(env=env, config_file=file)
    assert settings.salt == "from-file"
    assert (settings.foreground_timeout, settings.background_timeout) == (200, 50)
    assert settings.storage_mechanism == "SQLITE"
    assert settings.session_context is False
    assert settings.app_timeouts == {"shop": Timeouts(10_000, 5_000)}
    assert settings.kafka == {"security.protocol": "SSL", "client.id": "from-env"}

    flags = {"foreground_timeout": 300.0, "background_timeout": None, "session_context": True}
    settings = config.load(env=env, config_file=file, overrides=flags)
    assert (settings.foreground_timeout, settings.background_timeout) == (300, 50)
    assert settings.session_context is True  # a flag beats the environment
    assert settings.session_config().timeouts == Timeouts(300_000, 50_000)


def test_flags_override_environment() -> None:
    env = {"ENRICHER_SALT": "env-salt", "ENRICHER_LIFECYCLE_CONTEXT": "yes"}
    settings = config.load(env=env, overrides={"salt": "flag-salt", "lifecycle_context": False})
    assert settings.salt == "flag-salt"
    assert settings.lifecycle_context is False
    assert config.load(env=env, overrides={"salt": None}).salt == "env-salt"


def test_flag_values_are_validated_and_named() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(env={}, overrides={"foreground_timeout": -5.0, "storage_mechanism": "DISK"})
    assert len(caught.value.problems) == 2
    assert any(p.startswith("--foreground-timeout:") for p in caught.value.problems)
    assert any(p.startswith("--storage-mechanism:") for p in caught.value.problems)


def test_redacted_masks_secrets() -> None:
    settings = config.load(
        env={
            "ENRICHER_SALT": "s3cret-salt",
            "ENRICHER_REDIS_URL": "redis://enricher:hunter2@redis:6379/0",
            "ENRICHER_KAFKA_SASL_USERNAME": "kafka-user",
            "ENRICHER_KAFKA_SASL_PASSWORD": "kafka-pw",
            "ENRICHER_SCHEMA_REGISTRY_URL": "https://reader:registry-pw@registry:8081",
            "ENRICHER_APP_TIMEOUTS": "shop=360:15",
        }
    )
    assert settings.salt == "s3cret-salt"
    assert settings.kafka["sasl.password"] == "kafka-pw"
    shown = settings.redacted()
    assert shown["salt"] == "***"
    assert shown["redis_url"] == "redis://enricher:***@redis:6379/0"
    assert shown["schema_registry_url"] == "https://reader:***@registry:8081"
    assert shown["kafka"] == {"sasl.username": "kafka-user", "sasl.password": "***"}
    assert shown["app_timeouts"] == {"shop": [360, 15]}
    assert shown["foreground_timeout"] == 1800
    text = json.dumps(shown) + repr(settings)
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://:hunter2@redis:6379", "redis://:***@redis:6379"),
        ("rediss://user:hunter2@redis", "rediss://user:***@redis"),
        ("redis://hunter2:hunter2@redis", "redis://hunter2:***@redis"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert config.redact_url(url) == shown


def test_app_timeouts_from_environment() -> None:
    settings = config.load(env={"ENRICHER_APP_TIMEOUTS": "shop=360:15, news=0:1.5,"})
    assert settings.app_timeouts == {"shop": Timeouts(360_000, 15_000), "news": Timeouts(0, 1_500)}
    session = settings.session_config()
    assert session.timeouts_for("shop") == Timeouts(360_000, 15_000)
    assert session.timeouts_for("other") == session.timeouts_for(None) == session.timeouts


@pytest.mark.parametrize(
    "value", ["shop", "shop=1", "shop=1:2:3", "shop=a:b", "shop=-1:5", "shop=inf:1", "shop=1:nan"]
)
def test_bad_app_timeouts(value: str) -> None:
    error = load_error({"ENRICHER_APP_TIMEOUTS": value})
    assert len(error.problems) == 1
    assert error.problems[0].startswith("ENRICHER_APP_TIMEOUTS: ")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e306"])
def test_timeouts_must_be_finite(value: str) -> None:
    error = load_error({"ENRICHER_BACKGROUND_TIMEOUT": value})
    assert len(error.problems) == 1
    assert "finite" in error.problems[0] or "negative" in error.problems[0]


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("TRUE", True), ("on", True), ("0", False), ("No", False)]
)
def test_booleans(value: str, expected: bool) -> None:
    assert config.load(env={"ENRICHER_KEEP_TRACKER_ENTITIES": value}).keep_tracker_entities is (
        expected
    )


def test_broken_file_is_reported(tmp_path: Path) -> None:
    file = tmp_path / "broken.toml"
    file.write_text("salt = \n")
    error = load_error({}, file)
    assert str(file) in error.problems[0]
    error = load_error({}, tmp_path / "missing.toml")
    assert "missing.toml" in error.problems[0]


def test_required_settings() -> None:
    error = load_error({"ENRICHER_INPUT_FORMAT": "avro-registry"})
    assert error.problems == [
        "ENRICHER_SCHEMA_REGISTRY_URL is required for the avro-registry format"
    ]
    with pytest.raises(config.ConfigError) as caught:
        config.load(env={}, require=("bootstrap_servers", "input_topic"))
    assert caught.value.problems == [
        "ENRICHER_BOOTSTRAP_SERVERS is required",
        "ENRICHER_INPUT_TOPIC is required",
    ]


def test_session_events_settings() -> None:
    settings = config.load(
        env={
            "ENRICHER_SESSION_EVENTS_TOPIC": "sessions",
            "ENRICHER_SESSION_EVENTS_LATENESS": "45.5",
        }
    )
    assert (settings.session_events_topic, settings.session_events_lateness) == ("sessions", 45.5)
    assert config.load(env={}).session_events_lateness == 300
    error = load_error(
        {
            "ENRICHER_INPUT_TOPIC": "raw",
            "ENRICHER_SESSION_EVENTS_TOPIC": "raw",
            "ENRICHER_SESSION_EVENTS_LATENESS": "-1",
        }
    )
    assert len(error.problems) == 2
    assert "ENRICHER_SESSION_EVENTS_LATENESS: must not be negative" in error.problems[0]
    assert "session events" in error.problems[1]
