"""Settings: environment, TOML file and flags, validated all at once, secrets kept out of logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from enricher import cli, config, redaction, validation
from enricher.session import Timeouts

SECRETS = ("s3cret-salt", "hunter2", "kafka-pw", "registry-pw", "rw-user", "reader")


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
            "ENRICHER_REDIS_URL": "redis://rw-user:hunter2@redis:6379/0",
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
    assert shown["redis_url"] == "redis://***:***@redis:6379/0"
    assert shown["schema_registry_url"] == "https://***:***@registry:8081"
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
        ("rediss://user:hunter2@redis", "rediss://***:***@redis"),
        ("redis://hunter2:hunter2@redis", "redis://***:***@redis"),
        ("redis://redis?password=hunter2", "redis://redis?password=***"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redaction.redact_url(url) == shown


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
    assert any(word in error.problems[0] for word in ("finite", "negative", "at most"))


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


# -- bounds, types, URLs and librdkafka names: every problem, before anything connects ------

DAYS_30 = 30 * 86_400


@pytest.mark.parametrize(
    ("name", "highest", "too_high"),
    [
        ("FOREGROUND_TIMEOUT", str(DAYS_30), "1e300"),
        ("BACKGROUND_TIMEOUT", str(DAYS_30), str(DAYS_30 + 1)),
        ("SESSION_EVENTS_LATENESS", str(DAYS_30), "1e300"),
        ("STATE_SWEEP_INTERVAL", str(DAYS_30), str(DAYS_30 + 0.5)),
        ("STATE_TTL_DAYS", "3650", "3651"),
        ("SHUTDOWN_TIMEOUT", "3600", "3601"),
        ("METRICS_PORT", "65535", "70000"),
        ("BATCH_SIZE", "1000000", "1000001"),
        ("BATCH_TIMEOUT_MS", "60000", "60001"),
        ("MAX_MESSAGE_BYTES", "100000000", "100000001"),
        ("TRANSACTION_TIMEOUT_MS", "900000", "900001"),
    ],
)
def test_upper_bounds(name: str, highest: str, too_high: str) -> None:
    variable = f"ENRICHER_{name}"
    assert getattr(config.load(env={variable: highest}), name.lower()) == float(highest)
    error = load_error({variable: too_high})
    assert len(error.problems) == 1
    assert error.problems[0].startswith(f"{variable}: must be at most {highest}")


@pytest.mark.parametrize(
    ("name", "lowest", "too_low"),
    [
        ("TRANSACTION_TIMEOUT_MS", "1000", "999"),
        ("BATCH_SIZE", "1", "0"),
        ("METRICS_PORT", "0", "-1"),
        ("FOREGROUND_TIMEOUT", "0", "-0.5"),
    ],
)
def test_lower_bounds(name: str, lowest: str, too_low: str) -> None:
    variable = f"ENRICHER_{name}"
    assert getattr(config.load(env={variable: lowest}), name.lower()) == float(lowest)
    assert load_error({variable: too_low}).problems[0].startswith(f"{variable}: must")


def test_app_timeouts_are_bounded_and_every_bad_entry_is_reported() -> None:
    value = f"ok=1:2,big=1e300:1,neg=1:-1,word=x:1,one=5,=1:1,bare,ok=3:4,max={DAYS_30}:0"
    error = load_error({"ENRICHER_APP_TIMEOUTS": value})
    assert len(error.problems) == 7, error.problems
    assert all(p.startswith("ENRICHER_APP_TIMEOUTS: ") for p in error.problems)
    for needle in ("'big'", "'neg'", "'word'", "'one'", "empty", "'bare'", "'ok': given twice"):
        assert sum(needle in p for p in error.problems) == 1, needle
    settings = config.load(env={"ENRICHER_APP_TIMEOUTS": f"max={DAYS_30}:0"})
    assert settings.app_timeouts == {"max": Timeouts(DAYS_30 * 1000, 0)}


def test_toml_values_of_the_wrong_type_are_rejected(tmp_path: Path) -> None:
    file = tmp_path / "enricher.toml"
    file.write_text(
        "\n".join(
            [
                "batch_size = true",  # a bool for an int (was 1)
                "metrics_port = 9108.9",  # a float for an int (was 9108)
                "foreground_timeout = false",  # a bool for a number
                "group_id = 42",  # a number for a string
                'session_context = "yes"',  # a string for a bool
                'input_topic = ["raw"]',  # an array for a string
                "salt = { value = 'not shown' }",  # a table for a string
                "app_timeouts = [[1, 2]]",  # an array for a table
                "lifecycle_context = 1",  # a number for a bool
                "[kafka]",
                '"client.id" = ["a", "b"]',  # an array for a property
            ]
        )
    )
    error = load_error({}, file)
    assert len(error.problems) == 10, error.problems
    expected = {
        "batch_size": "expected an integer, got a boolean",
        "metrics_port": "expected an integer, got a float",
        "foreground_timeout": "expected a number, got a boolean",
        "group_id": "expected a string, got an integer",
        "session_context": "expected true or false, got a string",
        "input_topic": "expected a string, got an array",
        "salt": "expected a string, got a table",
        "app_timeouts": "expected a table, got an array",
        "lifecycle_context": "expected true or false, got an integer",
        "kafka.client.id": "expected a string, number or boolean",
    }
    for key, message in expected.items():
        assert f"{file}:{key}: {message}" in error.problems, key
    assert "not shown" not in str(error)


def test_toml_values_of_the_right_type(tmp_path: Path) -> None:
    file = tmp_path / "enricher.toml"
    file.write_text(
        "\n".join(
            [
                "foreground_timeout = 100",  # an integer is a number
                "background_timeout = 7.5",
                "batch_size = 500",
                "redis_cluster = true",
                'log_level = "DEBUG"',
                'app_timeouts = "shop=1:2"',  # the environment's form is fine too
                "[kafka]",
                "ssl.endpoint.identification.algorithm = 'none'",  # bare dotted key
                '"enable.idempotence" = false',
                '"linger.ms" = 5',
                '"queue.buffering.max.ms" = 0.5',
            ]
        )
    )
    settings = config.load(env={}, config_file=file)
    assert (settings.foreground_timeout, settings.background_timeout) == (100, 7.5)
    assert (settings.batch_size, settings.redis_cluster, settings.log_level) == (500, True, "DEBUG")
    assert settings.app_timeouts == {"shop": Timeouts(1000, 2000)}
    assert settings.kafka == {
        "ssl.endpoint.identification.algorithm": "none",
        "enable.idempotence": "false",
        "linger.ms": "5",
        "queue.buffering.max.ms": "0.5",
    }


def test_toml_app_timeouts_entries_are_typed(tmp_path: Path) -> None:
    file = tmp_path / "enricher.toml"
    file.write_text("app_timeouts = { a = [true, 5], b = [1, 2, 3], c = 5, d = [1, 2] }\n")
    error = load_error({}, file)
    assert len(error.problems) == 3, error.problems
    assert "app 'a': expected a number, got a boolean" in error.problems[0]


@pytest.mark.parametrize(
    "url",
    [
        "redis://host:notaport",
        "redis://[::1",
        "redis://:pw-secret@host:99999",
        "redis://host:-1",
        "redis://host?socket_timeout=soon",
        "redis://host?no_such_option=1",
        "rediss://host?ssl_cert_reqs=sometimes",
        "http://host:6379",
        "host:6379",
    ],
)
def test_malformed_redis_url(url: str) -> None:
    error = load_error({"ENRICHER_REDIS_URL": url})
    assert len(error.problems) == 1
    assert error.problems[0].startswith("ENRICHER_REDIS_URL: ")
    assert "pw-secret" not in str(error)


@pytest.mark.parametrize(
    "url", ["redis://h", "redis://u:p@h:6380/2?socket_timeout=3", "rediss://h", "unix:///s?db=1"]
)
def test_good_redis_urls(url: str) -> None:
    assert config.load(env={"ENRICHER_REDIS_URL": url}).redis_url == url


def test_redis_cluster_has_only_database_0() -> None:
    env = {"ENRICHER_REDIS_URL": "redis://h:7000/3", "ENRICHER_REDIS_CLUSTER": "true"}
    assert "only database 0" in load_error(env).problems[0]
    assert config.load(env={**env, "ENRICHER_REDIS_URL": "redis://h:7000/0"})


def test_unknown_librdkafka_properties_each_a_problem(tmp_path: Path) -> None:
    file = tmp_path / "enricher.toml"
    file.write_text('[kafka]\n"sasl.mechanisms" = "PLAIN"\n"bogus.thing" = "1"\n')
    env = {
        "ENRICHER_KAFKA_SASL_PASWORD": "x",  # a typo
        "ENRICHER_KAFKA_FETCH_MAX_BYTE": "5",
        "ENRICHER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",  # fine
        "ENRICHER_KAFKA_BATCH_NUM_MESSAGES": "many",  # known, invalid value
        "ENRICHER_KAFKA_ACKS": "all",
        "ENRICHER_KAFKA_ENABLE_SSL_CERTIFICATE_VERIFICATION": "maybe",
    }
    error = load_error(env, file)
    assert sorted(error.problems) == sorted(
        [
            "ENRICHER_KAFKA_SASL_PASWORD: unknown librdkafka property 'sasl.pasword'",
            "ENRICHER_KAFKA_FETCH_MAX_BYTE: unknown librdkafka property 'fetch.max.byte'",
            f"{file}:kafka.bogus.thing: unknown librdkafka property 'bogus.thing'",
            "ENRICHER_KAFKA_BATCH_NUM_MESSAGES: Invalid value for configuration property"
            ' "batch.num.messages"',
            'ENRICHER_KAFKA_ENABLE_SSL_CERTIFICATE_VERIFICATION: Expected bool value for "enable'
            '.ssl.certificate.verification": true or false',
        ]
    )


def test_librdkafka_names_are_checked_without_a_client() -> None:
    """No thread (librdkafka starts several per client) and no socket appears."""

    def tasks() -> int:
        return sum(1 for _ in Path(f"/proc/{os.getpid()}/task").iterdir())

    properties = {"bootstrap.servers": "127.0.0.1:1", "sasl.password": "x", "linger.ms": "5"}
    before = tasks()
    assert validation.kafka_problems(properties) == []
    assert validation.kafka_problems({"no.such.thing": "1"}) == [
        "kafka property 'no.such.thing': unknown librdkafka property 'no.such.thing'"
    ]
    assert tasks() == before


def run_main(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``enricher ARGV`` in this process, with only ``env`` for ENRICHER_* variables."""
    for name in [n for n in os.environ if n.startswith("ENRICHER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code if isinstance(stop.code, int) else 1
    return code


def test_enricher_run_reports_every_problem_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "ENRICHER_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "ENRICHER_INPUT_TOPIC": "raw",
        "ENRICHER_OUTPUT_TOPIC": "out",
        "ENRICHER_DLQ_TOPIC": "dlq",
        "ENRICHER_SALT": "salt-never-shown",
        "ENRICHER_REDIS_URL": "redis://user:pw-never-shown@redis:notaport",
        "ENRICHER_FOREGROUND_TIMEOUT": "1e300",
        "ENRICHER_BACKGROUND_TIMEOUT": "1e300",
        "ENRICHER_APP_TIMEOUTS": "a=1e300:1,b=1:1e300",
        "ENRICHER_METRICS_PORT": "70000",
        "ENRICHER_BATCH_SIZE": "2000000",
        "ENRICHER_TRANSACTION_TIMEOUT_MS": "3600000",
        "ENRICHER_KAFKA_SASL_PASWORD": "pw2-never-shown",
        "ENRICHER_KAFKA_NO_SUCH_THING": "1",
    }
    code = run_main(["run"], env, monkeypatch)
    captured = capsys.readouterr()
    assert code == 2, captured
    problems = [line for line in captured.err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 10, captured.err
    for name in env:
        if name.endswith(("_TIMEOUT", "_TIMEOUTS", "_PORT", "_SIZE", "_MS", "URL")):
            assert name in captured.err, name
    assert "ENRICHER_KAFKA_SASL_PASWORD: unknown librdkafka property" in captured.err
    assert "ENRICHER_KAFKA_NO_SUCH_THING: unknown librdkafka property" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "never-shown" not in captured.err + captured.out


@pytest.mark.parametrize("command", [["batch", "--input", "in", "--output", "out"], ["session"]])
@pytest.mark.parametrize("partitions", ["0", "-3", "two"])
def test_partitions_must_be_at_least_1(
    command: list[str],
    partitions: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*command, "--partitions", partitions]
    if command == ["session"]:
        argv = ["session", "get", "device-1", "--partitions", partitions]
    code = run_main(argv, {}, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert "--partitions" in err
    assert "Traceback" not in err


def test_kafka_settings_refused_together_exit_2_without_traceback() -> None:
    """Properties librdkafka accepts one by one but not together fail when the clients are
    created: a configuration error too."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENRICHER_")}
    env = {
        **base,
        "ENRICHER_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "ENRICHER_INPUT_TOPIC": "raw",
        "ENRICHER_OUTPUT_TOPIC": "out",
        "ENRICHER_DLQ_TOPIC": "dlq",
        "ENRICHER_REDIS_URL": "redis://127.0.0.1:1",
        "ENRICHER_METRICS_HOST": "127.0.0.1",
        "ENRICHER_METRICS_PORT": "0",
        "ENRICHER_KAFKA_ENABLE_IDEMPOTENCE": "false",  # the producer is transactional
        "ENRICHER_KAFKA_SASL_PASSWORD": "kafka-pw-never-shown",
    }
    done = subprocess.run(
        [sys.executable, "-m", "enricher", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "invalid Kafka settings" in done.stderr
    assert "enable.idempotence" in done.stderr
    assert "Traceback" not in done.stderr
    assert "never-shown" not in done.stderr + done.stdout
