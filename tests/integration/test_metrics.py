"""`/metrics` after a known run holds the right counts, and `/readyz` follows the assignment."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter

import pytest
from feeding import Input, as_messages, produce_input, traffic
from instances import Fleet, Instance, wait_for
from progress import Progress
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT, SALT, service_env
from stack import Stack

from enricher.codecs import tracker
from enricher.session import SessionConfig, SessionEngine, SessionState, Timeouts

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

EVENTS = 3_000
DEVICES = 200
BAD = 7


def probe(instance: Instance, path: str) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{instance.metrics_port()}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def expected_counts(items: list[tuple[str, dict[str, str]]]) -> tuple[Counter[str], Counter[str]]:
    """Sessions started by cause and events by lifecycle state, from the engine itself."""
    engine = SessionEngine(
        SessionConfig(
            salt=SALT, timeouts=Timeouts.from_seconds(FOREGROUND_TIMEOUT, BACKGROUND_TIMEOUT)
        )
    )
    states: dict[str, SessionState] = {}
    causes: Counter[str] = Counter()
    lifecycle: Counter[str] = Counter()
    for device, event in items:
        step = engine.advance(device, states.get(device), tracker.from_fields(event).facts)
        states[device] = step.state
        if step.started is not None:
            causes[step.started.value] += 1
        lifecycle["background" if step.state.in_background else "foreground"] += 1
    return causes, lifecycle


def test_metrics_count_a_known_run(stack: Stack, fleet: Fleet) -> None:
    items = traffic(EVENTS, DEVICES, seed=5)
    topics = stack.new_topics("metrics", partitions=4)
    env = service_env(stack, topics, ENRICHER_KAFKA_STATISTICS_INTERVAL_MS="500")
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("metrics", env).start()
    instance.wait_logged("assigned partitions")
    bad = [Input(f"bad-{i}".encode(), b"{not json") for i in range(BAD)]
    produce_input(stack, topics.input, as_messages(items) + bad)
    progress.wait_done(120, fleet, expected=EVENTS + BAD)
    instance.wait_counted(EVENTS + BAD)
    progress.close()

    m = instance.metric
    assert m("enricher_records_consumed_total") == EVENTS + BAD
    assert m("enricher_records_produced_total") == EVENTS
    assert m("enricher_records_dead_lettered_total", 'reason="not_json"') == BAD
    causes, lifecycle = expected_counts(items)
    for cause in ("new_device", "foreground_timeout", "background_timeout"):
        assert m("enricher_sessions_started_total", f'cause="{cause}"') == causes[cause], cause
    assert causes["new_device"] == DEVICES
    for state in ("foreground", "background"):
        assert m("enricher_events_total", f'state="{state}"') == lifecycle[state], state
    assert m("enricher_batch_size_records_sum") == EVENTS + BAD
    committed = m("enricher_transactions_total", 'outcome="committed"')
    assert committed == m("enricher_batch_size_records_count") >= 1
    assert m("enricher_transactions_total", 'outcome="aborted"') == 0
    for clock in ("device", "kafka"):
        assert m("enricher_end_to_end_latency_seconds_count", f'clock="{clock}"') == EVENTS
    hits = m("enricher_state_cache_lookups_total", 'result="hit"')
    misses = m("enricher_state_cache_lookups_total", 'result="miss"')
    assert misses >= DEVICES
    assert hits + misses <= EVENTS
    assert m("enricher_redis_duration_seconds_count", 'operation="save"') == committed
    assert m("enricher_redis_errors_total", 'operation="save"') == 0
    assert m("enricher_assigned_partitions") == 4
    assert m("enricher_build_info", 'version="0.1.0"') == 1

    def lag_is_zero() -> bool:
        return all(m("enricher_consumer_lag_records", f'partition="{p}"') == 0 for p in range(4))

    wait_for(lag_is_zero, "the lag gauge to read 0 on every partition", 60, checks=[fleet])


def test_readiness_follows_the_assignment(stack: Stack, fleet: Fleet) -> None:
    topics = stack.new_topics("ready", partitions=1)
    env = service_env(stack, topics, ENRICHER_KAFKA_SESSION_TIMEOUT_MS="6000")
    first = fleet.add("ready-a", env).start()
    first.wait_logged("assigned partitions")
    second = fleet.add("ready-b", env).start()
    wait_for(lambda: probe(second, "/healthz")[0] == 200, "ready-b to be alive", 60, checks=[fleet])
    status, body = probe(second, "/readyz")
    assert (status, body["partitions"]) == (503, [])
    assert probe(first, "/readyz") == (
        200,
        {"ready": True, "partitions": [0], "repairing": [], "kafka": True, "redis": True},
    )
    # The probes need no token; the session API without ENRICHER_SESSION_API_TOKEN is closed.
    assert probe(first, "/v1/devices/d/session")[0] == 403

    assert first.stop() == 0
    wait_for(
        lambda: probe(second, "/readyz")[0] == 200,
        "ready-b to become ready once it owns the partition",
        60,
        checks=[second],
    )
    assert probe(second, "/readyz")[1]["partitions"] == [0]
