"""A real instance given every secret (a Redis ACL user's credentials in its URL, SASL and SSL
secrets librdkafka accepts and, on PLAINTEXT, does not use): none of them is in its log, the
``started`` line with all its settings included."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from instances import Fleet, wait_for
from secret_values import (
    KAFKA_SECRETS,
    REDIS_PASSWORD,
    REDIS_QUERY_PASSWORD,
    REDIS_USER,
    leaked,
    secret_env,
)
from service_settings import service_env
from stack import Stack

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

# The stack's and the test's own settings, not secret_env's placeholders.
_OWN = {
    "ENRICHER_BOOTSTRAP_SERVERS",
    "ENRICHER_INPUT_TOPIC",
    "ENRICHER_OUTPUT_TOPIC",
    "ENRICHER_DLQ_TOPIC",
}


@pytest.fixture
def redis_user(stack: Stack) -> Iterator[str]:
    """An ACL user on the stack's Redis with REDIS_PASSWORD; its name is unique per test."""
    name = f"{REDIS_USER}-{uuid.uuid4().hex[:6]}"
    client = stack.redis()
    client.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{REDIS_PASSWORD}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    try:
        yield name
    finally:
        client.acl_deluser(name)
        client.close()


def started_settings(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    for entry in messages:
        if entry.get("message") == "started":
            settings: dict[str, Any] = entry["settings"]
            return settings
    return None


def test_no_secret_in_the_log_of_a_running_instance(
    stack: Stack, fleet: Fleet, redis_user: str
) -> None:
    topics = stack.new_topics("secrets", partitions=2)
    redis_host = urlsplit(stack.redis_url).netloc
    secrets = {k: v for k, v in secret_env(redis_host=redis_host).items() if k not in _OWN}
    secrets["ENRICHER_REDIS_URL"] = secrets["ENRICHER_REDIS_URL"].replace(REDIS_USER, redis_user)
    instance = fleet.add("secrets", service_env(stack, topics, **secrets)).start()

    def entries() -> list[dict[str, Any]]:
        out = []
        for line in instance.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    wait_for(
        lambda: started_settings(entries()) is not None,
        "the instance to log `started`",
        90.0,
        checks=[instance],
    )
    instance.wait_owning()  # it did reach Redis with the ACL user's credentials
    assert instance.stop() == 0, instance.tail()

    shown = started_settings(entries())
    assert shown is not None
    assert shown["salt"] == shown["session_api_token"] == "***"
    assert shown["redis_url"] == f"redis://***:***@{redis_host}/0?password=***"
    assert shown["schema_registry_url"].startswith("https://***:***@registry:8081/")
    assert {name: shown["kafka"][name] for name in KAFKA_SECRETS} == dict.fromkeys(
        KAFKA_SECRETS, "***"
    )
    log = instance.log(all_starts=True)
    assert not leaked(log), f"secrets {leaked(log)} in the log:\n{instance.tail(200)}"
    assert redis_user not in log
    assert REDIS_QUERY_PASSWORD not in log
