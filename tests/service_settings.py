"""The settings the integration tests run the service with.

- :func:`service_env`: the ``ENRICHER_*`` environment of the instances of one test (its own
  topics, consumer group and Redis prefix; short session timeouts; JSON logs);
- the constants behind it, which the checks need too: :data:`SALT`, the session timeouts
  :data:`FOREGROUND_TIMEOUT` and :data:`BACKGROUND_TIMEOUT`, the session events topic's
  :data:`LATENESS`, the service's :data:`SHUTDOWN_TIMEOUT`;
- :data:`REPO`, the checkout the service runs from.

(PYTEST_DONT_REWRITE: a helper that test modules import, like ``instances``.)
"""

from __future__ import annotations

from pathlib import Path

from stack import Stack, TopicSet

REPO = Path(__file__).resolve().parent.parent
SALT = "integration-test-salt"
# Short timeouts make sessions renew a lot within the generated traffic.
FOREGROUND_TIMEOUT = 60.0
BACKGROUND_TIMEOUT = 15.0
# The session events topic's allowed lateness (event time).
LATENESS = 30.0
# The service's own deadline for a clean SIGTERM.
SHUTDOWN_TIMEOUT = 15.0


def service_env(stack: Stack, topics: TopicSet, **extra: str) -> dict[str, str]:
    """Settings for instances of one test: its own topics, group, Redis prefix, short timeouts."""
    return {
        **stack.env(topics),
        "ENRICHER_GROUP_ID": f"{topics.input}-group",
        "ENRICHER_REDIS_KEY_PREFIX": stack.redis_prefix(),
        "ENRICHER_SALT": SALT,
        "ENRICHER_FOREGROUND_TIMEOUT": str(FOREGROUND_TIMEOUT),
        "ENRICHER_BACKGROUND_TIMEOUT": str(BACKGROUND_TIMEOUT),
        "ENRICHER_SESSION_EVENTS_LATENESS": str(LATENESS),
        "ENRICHER_METRICS_HOST": "127.0.0.1",
        "ENRICHER_METRICS_PORT": "0",
        "ENRICHER_LOG_FORMAT": "json",
        "ENRICHER_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
        **extra,
    }
