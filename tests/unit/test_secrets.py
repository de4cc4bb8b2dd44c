"""Secrets never leave the process: not in ``Settings.redacted()`` (the ``started`` log line),
not in a configuration error, not in anything ``enricher run`` writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from secret_values import (
    KAFKA_SECRETS,
    REDIS_PASSWORD,
    REDIS_QUERY_PASSWORD,
    REDIS_USER,
    REGISTRY_PASSWORD,
    REGISTRY_USER,
    SALT,
    SECRETS,
    SESSION_API_TOKEN,
    leaked,
    secret_env,
)

from enricher import config, redaction, validation

REPO = Path(__file__).resolve().parents[2]

LIBRDKAFKA_NAMES = {
    "sasl.password": True,
    "ssl.key.password": True,
    "ssl.keystore.password": True,
    "ssl.key.pem": True,
    "ssl_key": True,
    "sasl.jaas.config": True,
    "sasl.oauthbearer.config": True,
    "sasl.oauthbearer.client.secret": True,
    "sasl.oauthbearer.client.credentials.client.secret": True,
    "sasl.oauthbearer.assertion.private.key.passphrase": True,
    "sasl.oauthbearer.assertion.private.key.pem": True,
    "oauthbearer_token_refresh_cb": True,  # a callback, not settable from text: masked anyway
    "ssl.key.location": False,  # a file path
    "ssl.keystore.location": False,
    "sasl.kerberos.keytab": False,
    "sasl.oauthbearer.assertion.private.key.file": False,
    "sasl.oauthbearer.token.endpoint.url": False,  # shown through redact_url
    "sasl.oauthbearer.client.credentials.client.id": False,
    "ssl.ca.pem": False,  # certificates are public
    "ssl.certificate.pem": False,
    "https.ca.pem": False,
    "ssl_engine_callback_data": False,
    "default_topic_conf": False,
    "sasl.username": False,
}


@pytest.mark.parametrize(("name", "secret"), sorted(LIBRDKAFKA_NAMES.items()))
def test_secret_kafka_properties_by_rule(name: str, secret: bool) -> None:
    assert redaction.is_secret_kafka_key(name) is secret


def test_the_names_are_librdkafka_properties() -> None:
    problems = validation.kafka_problems(dict.fromkeys(LIBRDKAFKA_NAMES, "x"))
    assert not [p for p in problems if "unknown librdkafka property" in p]


def test_redacted_masks_every_secret_kafka_property() -> None:
    settings = config.Settings(
        kafka={
            **dict.fromkeys(LIBRDKAFKA_NAMES, "value"),
            **KAFKA_SECRETS,
            "sasl.oauthbearer.token.endpoint.url": f"https://u:{REGISTRY_PASSWORD}@idp/token",
        }
    )
    shown = settings.redacted()["kafka"]
    for name, secret in LIBRDKAFKA_NAMES.items():
        if secret:
            assert shown[name] == "***", name
    assert shown["ssl.key.location"] == "value"
    assert shown["sasl.oauthbearer.token.endpoint.url"] == "https://***:***@idp/token"
    assert not leaked(json.dumps(shown) + repr(settings))


# -- URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://:hunter2@redis:6379", "redis://:***@redis:6379"),
        ("rediss://user:hunter2@redis", "rediss://***:***@redis"),
        ("redis://default@redis", "redis://***@redis"),
        ("redis://redis:6379/0?password=hunter2", "redis://redis:6379/0?password=***"),
        (
            "redis://redis?db=1&PassWord=a&auth_token=b&ssl_keyfile=c&username=d&x=e",
            "redis://redis?db=1&PassWord=***&auth_token=***&ssl_keyfile=***&username=***&x=e",
        ),
        ("redis://redis?pass%77ord=hunter2", "redis://redis?pass%77ord=***"),
        ("redis://u:p@ss/w?rd#x@redis:1", "redis://***:***@redis:1"),  # raw @ / ? # in it
        ("unix://:hunter2@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("redis://u:hunter2@[::1", "redis://***:***@[::1"),  # malformed: redacted anyway
        ("https://reader:pw@registry:8081/x?token=t", "https://***:***@registry:8081/x?token=***"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redaction.redact_url(url) == shown


# -- everything ----------------------------------------------------------------------------


def test_redacted_settings_show_no_secret() -> None:
    settings = config.load(env=secret_env())
    assert settings.salt == SALT  # the values are there...
    assert settings.kafka["sasl.password"] == KAFKA_SECRETS["sasl.password"]
    shown = settings.redacted()
    text = json.dumps(shown) + repr(settings) + str(settings)
    assert not leaked(text)  # ...and shown nowhere
    assert shown["salt"] == shown["session_api_token"] == "***"
    assert shown["redis_url"] == "redis://***:***@127.0.0.1:1/0?password=***"
    assert shown["schema_registry_url"] == "https://***:***@registry:8081/?token=***"
    assert shown["kafka"]["sasl.username"] == "kafka-user"
    assert all(shown["kafka"][name] == "***" for name in KAFKA_SECRETS)
    known = settings.secrets()  # what scrub() masks
    assert all(any(s in secret for secret in known) for s in SECRETS), known
    message = f"failed: {REDIS_PASSWORD} {KAFKA_SECRETS['sasl.oauthbearer.config']} {SALT}"
    assert not leaked(settings.scrub(message))


@pytest.mark.parametrize(
    "bad",
    [
        {"ENRICHER_REDIS_URL": f"redis://{REDIS_USER}:{REDIS_PASSWORD}@host:notaport"},
        {"ENRICHER_REDIS_URL": f"redis://{REDIS_USER}:{REDIS_PASSWORD}@[::1"},
        {"ENRICHER_REDIS_URL": f"redis://:{REDIS_PASSWORD}@host:99999"},
        {"ENRICHER_REDIS_URL": f"redis://host?password={REDIS_QUERY_PASSWORD}&timeout=9"},
        {"ENRICHER_REDIS_URL": f"http://{REDIS_USER}:{REDIS_PASSWORD}@host"},
        {"ENRICHER_SCHEMA_REGISTRY_URL": f"https://{REGISTRY_USER}:{REGISTRY_PASSWORD}@r:x"},
        {"ENRICHER_SESSION_API_TOKEN": SESSION_API_TOKEN[:10]},  # too short
        {"ENRICHER_KAFKA_SASL_PASWORD": KAFKA_SECRETS["sasl.password"]},  # a typo
        {"ENRICHER_SALTT": SALT},
    ],
)
def test_configuration_errors_never_show_a_secret(bad: dict[str, str]) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(env={**secret_env(), **bad})
    assert caught.value.problems
    assert not leaked(str(caught.value))


def test_file_errors_never_show_a_secret(tmp_path: Path) -> None:
    file = tmp_path / "enricher.toml"
    file.write_text(
        f'salt = ["{SALT}"]\nsession_api_token = 1234567890123456789\n'
        f'redis_url = "redis://{REDIS_USER}:{REDIS_PASSWORD}@h:port"\n'
        f'[kafka]\n"sasl.password" = ["{KAFKA_SECRETS["sasl.password"]}"]\n'
    )
    with pytest.raises(config.ConfigError) as caught:
        config.load(env={}, config_file=file)
    assert len(caught.value.problems) == 4
    assert not leaked(str(caught.value))
    assert "1234567890123456789" not in str(caught.value)


def test_enricher_run_writes_no_secret(tmp_path: Path) -> None:
    """A real ``enricher run`` with every secret set, pointed at a broker and a Redis that are
    not there (it cannot get as far as its ``started`` line: see
    tests/integration/test_secrets.py for that), SIGTERM after a few seconds: nothing it
    writes, its errors included, shows a secret."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENRICHER_")}
    env = {
        **base,
        **secret_env(),
        "ENRICHER_LOG_FORMAT": "json",
        "ENRICHER_LOG_LEVEL": "DEBUG",
        "ENRICHER_METRICS_HOST": "127.0.0.1",
        "ENRICHER_METRICS_PORT": "0",
        "ENRICHER_TRANSACTION_TIMEOUT_MS": "1000",  # its Kafka calls give up after 10 s
        "ENRICHER_SHUTDOWN_TIMEOUT": "5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "enricher", "run"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode(errors="replace") + err.decode(errors="replace")
    assert proc.returncode in (0, 1), text
    assert "Traceback" not in text, text
    assert "cannot read the input topic's metadata" in text, text  # it did get that far
    assert not leaked(text), text
