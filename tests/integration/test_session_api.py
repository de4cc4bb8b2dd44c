"""The tracker's getters server-side (Python, CLI, HTTP) and renew on demand, on a running
service: they agree with the entity on each device's last enriched event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from typing import Any

import pytest
from feeding import as_messages, produce_input, traffic
from instances import Fleet, Instance
from progress import Progress
from reconcile import reconcile
from reference import client_session, read_all
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT, REPO, service_env
from stack import Stack

from enricher.generate import device_id

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

EVENTS = 2_000
DEVICES = 100
TOKEN = "session-api-token-for-the-tests"


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


def call(
    instance: Instance, method: str, path: str, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{instance.metrics_port()}{path}", method=method
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENRICHER_")}
    return subprocess.run(
        [sys.executable, "-m", "enricher", "session", *args],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_getters_agree_with_the_last_entity_and_renew_starts_one_new_session(
    stack: Stack, fleet: Fleet
) -> None:
    items = traffic(EVENTS, DEVICES, seed=21)
    topics = stack.new_topics("session-api", partitions=3)
    env = service_env(
        stack, topics, ENRICHER_SESSION_API_RENEW="true", ENRICHER_SESSION_API_TOKEN=TOKEN
    )
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("session-api", env).start()
    instance.wait_logged("assigned partitions")
    produce_input(stack, topics.input, as_messages(items))
    progress.wait_done(120, fleet, expected=EVENTS)

    output, _ = read_all(stack, topics)
    last: dict[str, Any] = {}
    for record in sorted(output, key=lambda r: (r.partition, r.offset)):
        last[(record.key or b"").decode()] = client_session(json.loads(record.value or b"{}"))
    assert len(last) == DEVICES
    shared = [*("userId", "sessionId", "sessionIndex", "previousSessionId", "eventIndex")]
    shared += ("firstEventId", "firstEventTimestamp", "storageMechanism")
    for device, entity in last.items():
        status, view = call(instance, "GET", f"/v1/devices/{device}/session", TOKEN)
        assert status == 200, view
        assert {k: view[k] for k in shared} == entity, device
        assert view["renewPending"] is False
        timeout = BACKGROUND_TIMEOUT if view["isInBackground"] else FOREGROUND_TIMEOUT
        expires = parse_iso(view["lastEventTimestamp"]) + timedelta(seconds=timeout)
        assert parse_iso(view["expiresAt"]) == expires, view
    assert call(instance, "GET", "/v1/devices/nobody/session", TOKEN)[0] == 404
    device = device_id(0)
    assert call(instance, "GET", f"/v1/devices/{device}/session")[0] == 401
    assert call(instance, "GET", f"/v1/devices/{device}/session", "wrong")[0] == 401

    table = cli(env, "get", device)
    assert table.returncode == 0, table.stderr
    assert ["sessionId", last[device]["sessionId"]] in [
        r.split() for r in table.stdout.splitlines()
    ]
    as_json = cli(env, "get", device, "--json")
    by_http = call(instance, "GET", f"/v1/devices/{device}/session", TOKEN)[1]
    assert json.loads(as_json.stdout) == by_http
    assert cli(env, "get", "nobody").returncode == 1

    assert call(instance, "POST", f"/v1/devices/{device}/session/renew")[0] == 401
    assert call(instance, "POST", f"/v1/devices/{device}/session/renew", "wrong")[0] == 401
    assert call(instance, "POST", f"/v1/devices/{device}/session/renew", TOKEN)[0] == 202
    assert call(instance, "GET", f"/v1/devices/{device}/session", TOKEN)[1]["renewPending"] is True

    before = last[device]
    latest = max(int(event["dtm"]) for key, event in items if key == device)
    more = [
        (
            device,
            {"e": "pv", "eid": f"00000000-0000-4000-8000-00000000000{n}", "dtm": str(latest + n)},
        )
        for n in (1, 2)
    ]
    produce_input(stack, topics.input, as_messages(more))
    progress.wait_done(120, fleet, expected=EVENTS + 2)
    instance.wait_counted(EVENTS + 2)
    output, _ = read_all(stack, topics)
    tail = [
        client_session(json.loads(r.value or b"{}"))
        for r in sorted(output, key=lambda r: (r.partition, r.offset))
        if (r.key or b"").decode() == device
    ][-2:]
    assert tail[0]["sessionIndex"] == before["sessionIndex"] + 1
    assert tail[0]["previousSessionId"] == before["sessionId"]
    assert (tail[0]["eventIndex"], tail[0]["firstEventId"]) == (1, more[0][1]["eid"])
    assert (tail[1]["sessionIndex"], tail[1]["eventIndex"]) == (tail[0]["sessionIndex"], 2)
    status, view = call(instance, "GET", f"/v1/devices/{device}/session", TOKEN)
    assert (view["sessionIndex"], view["renewPending"]) == (tail[1]["sessionIndex"], False)
    assert instance.metric("enricher_sessions_started_total", 'cause="renew"') == 1
    reconcile(stack, topics, output)
    progress.close()


def test_the_api_is_off_without_a_token_and_renew_unless_enabled(
    stack: Stack, fleet: Fleet
) -> None:
    topics = stack.new_topics("session-api-off", partitions=1)
    instance = fleet.add("session-api-off", service_env(stack, topics)).start()
    instance.wait_logged("assigned partitions")
    status, body = call(instance, "GET", "/v1/devices/d/session", TOKEN)
    assert status == 403
    assert "ENRICHER_SESSION_API_TOKEN" in body["error"]
    assert call(instance, "POST", "/v1/devices/d/session/renew", TOKEN)[0] == 403
    assert instance.metric("enricher_build_info", 'version="0.1.0"') == 1  # /metrics stays open
