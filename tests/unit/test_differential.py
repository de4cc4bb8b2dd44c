"""Differential test: the enricher against Snowplow's published React Native tracker.

`tests/oracle/driver.js` runs the session plugin of `@snowplow/react-native-tracker` under a
controlled clock over generated device timelines and reports, for every event, the tracker-protocol
payload and the `client_session` entity the tracker attached. The payloads (without the entity) go
through `python -m enricher batch`; every enriched event must carry the tracker's session, up to
the naming of the random identifiers, and keep everything else it arrived with.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.node  # runs Snowplow's tracker under Node.js
REPO = Path(__file__).resolve().parents[2]
ORACLE = REPO / "tests" / "oracle"
INSTALL_HINT = "run `ops/devstack install` (it runs `npm ci` in tests/oracle)"

CLIENT_SESSION = "iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-2"
CONTEXTS = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0"
REQUIRED_FIELDS = frozenset({"userId", "sessionId", "sessionIndex", "storageMechanism"})
ENTITY_FIELDS = REQUIRED_FIELDS | {
    "eventIndex",
    "previousSessionId",
    "firstEventId",
    "firstEventTimestamp",
}
COMPARED_FIELDS = ("sessionIndex", "eventIndex", "firstEventId", "firstEventTimestamp")
CONTEXT_ROWS = 5  # events shown after a device's first difference

DEVICES = 300
EVENTS_PER_DEVICE = (5, 60)
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS = 86_400_000

# Event kinds the driver understands, weighted by the device's lifecycle state: in the foreground
# a device mostly tracks screens and actions and sometimes goes to the background; in the
# background it mostly comes back, sometimes reports Background again or tracks something.
FOREGROUND_KINDS = {
    "screen_view": 35,
    "struct": 25,
    "page_view": 10,
    "background": 25,
    "foreground": 5,
}
BACKGROUND_KINDS = {
    "foreground": 45,
    "background": 20,
    "struct": 20,
    "screen_view": 10,
    "page_view": 5,
}

# Entities some events carry besides the session; the enricher must pass them through.
OTHER_ENTITIES: tuple[dict[str, Any], ...] = (
    {
        "schema": "iglu:com.snowplowanalytics.mobile/application/jsonschema/1-0-0",
        "data": {"version": "2.4.1", "build": "241"},
    },
    {
        "schema": "iglu:com.snowplowanalytics.mobile/screen/jsonschema/1-0-0",
        "data": {"name": "Warenkorb Übersicht ✓", "id": "5b6d2a9c-0a52-4a8e-9b0e-8f7c1d2e3f40"},
    },
    {
        "schema": "iglu:com.snowplowanalytics.snowplow/mobile_context/jsonschema/1-0-3",
        "data": {"osType": "android", "osVersion": "14", "deviceManufacturer": "Google"},
    },
)

Json = dict[str, Any]
Event = dict[str, str]


@dataclass(frozen=True)
class Config:
    """Session timeouts in seconds, as the tracker and the enricher CLI take them."""

    foreground: int
    background: int

    @property
    def name(self) -> str:
        return f"fg{self.foreground}-bg{self.background}"


CONFIGS = (
    Config(foreground=1800, background=1800),
    Config(foreground=360, background=15),
    Config(foreground=0, background=120),
    Config(foreground=45, background=0),
)


@dataclass(frozen=True)
class Step:
    """One event of a device's timeline, as the driver receives it."""

    t: int
    kind: str
    contexts: tuple[Json, ...]

    def to_json(self) -> Json:
        step: Json = {"t": self.t, "kind": self.kind}
        if self.contexts:
            step["contexts"] = list(self.contexts)
        return step


@dataclass(frozen=True)
class Device:
    device_id: str
    base64: bool
    steps: tuple[Step, ...]


@dataclass
class Row:
    """One event: what the tracker emitted, and what the enricher made of it."""

    device: Device
    position: int
    sent: Event
    oracle: Json
    enriched: Event = field(default_factory=dict)
    entity: Json = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Bijection:
    """Links identifiers the tracker drew to the ones the enricher drew, one to one."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.forward: dict[str, str] = {}
        self.backward: dict[str, str] = {}

    def link(self, oracle: str, enricher: str) -> str | None:
        known = self.forward.setdefault(oracle, enricher)
        if known != enricher:
            return f"tracker {self.what} {oracle} was enricher {known} before, now {enricher}"
        owner = self.backward.setdefault(enricher, oracle)
        if owner != oracle:
            return f"enricher {self.what} {enricher} stands for tracker {owner} and {oracle}"
        return None


def gap_ms(rng: random.Random, config: Config, in_background: bool) -> int:
    """A gap between two events, mostly at or right around one of the timeouts."""
    foreground, background = config.foreground * 1000, config.background * 1000
    applicable = background if in_background else foreground
    longest = max(foreground, background)
    choice = rng.choices(
        ("applicable", "foreground", "background", "tiny", "within", "beyond"),
        weights=(30, 10, 10, 20, 20, 10),
    )[0]
    if choice == "tiny":
        return rng.choice((0, 1, rng.randint(2, 1000)))
    if choice == "within":
        return rng.randint(0, applicable)
    if choice == "beyond":
        return rng.randint(longest + 1, longest + 3 * DAY_MS)
    timeout = {"applicable": applicable, "foreground": foreground, "background": background}[choice]
    return max(0, timeout + rng.choice((-1, 0, 0, 1)))


def generate_device(rng: random.Random, config: Config, index: int) -> Device:
    t = START_MS + rng.randint(0, 30 * DAY_MS)
    in_background = False
    steps: list[Step] = []
    for position in range(rng.randint(*EVENTS_PER_DEVICE)):
        if position:
            t += gap_ms(rng, config, in_background)
        kinds = BACKGROUND_KINDS if in_background else FOREGROUND_KINDS
        kind = rng.choices(tuple(kinds), weights=tuple(kinds.values()))[0]
        contexts = (
            tuple(rng.sample(OTHER_ENTITIES, rng.randint(1, 2))) if rng.random() < 0.3 else ()
        )
        steps.append(Step(t=t, kind=kind, contexts=contexts))
        if kind in ("background", "foreground"):
            in_background = kind == "background"
    return Device(device_id=f"device-{index:03d}", base64=rng.random() < 0.5, steps=tuple(steps))


def require_oracle() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            f"`node` (Node 20) is not on PATH: install it, then {INSTALL_HINT}", pytrace=False
        )
    if not (ORACLE / "node_modules").is_dir():
        pytest.fail(f"{ORACLE / 'node_modules'} is missing; {INSTALL_HINT}", pytrace=False)
    return node


def run_oracle(config: Config, devices: list[Device]) -> list[Row]:
    document = {
        "foregroundTimeout": config.foreground,
        "backgroundTimeout": config.background,
        "devices": [
            {
                "deviceId": device.device_id,
                "base64": device.base64,
                "events": [step.to_json() for step in device.steps],
            }
            for device in devices
        ],
    }
    result = subprocess.run(
        [require_oracle(), str(ORACLE / "driver.js")],
        input=json.dumps(document),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"oracle driver failed:\n{result.stderr}", pytrace=False)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    slots = [(device, position) for device in devices for position in range(len(device.steps))]
    assert len(lines) == len(slots), "the driver must write one line per event"
    rows = []
    for (device, position), line in zip(slots, lines, strict=True):
        sent = line["event"]
        assert line["key"] == device.device_id
        assert sent["dtm"] == str(device.steps[position].t), "the driver's clock is not in control"
        assert all(isinstance(value, str) for value in sent.values())
        rows.append(Row(device=device, position=position, sent=sent, oracle=line["oracle"]))
    return rows


def run_enricher(config: Config, rows: list[Row], workdir: Path) -> list[Json]:
    source, target = workdir / "in.jsonl", workdir / "out.jsonl"
    source.write_text(
        "".join(
            json.dumps({"key": row.device.device_id, "event": row.sent}) + "\n" for row in rows
        ),
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "enricher", "batch", "--input", str(source)]
    command += ["--output", str(target), "--salt", "test-salt"]
    command += ["--foreground-timeout", str(config.foreground)]
    command += ["--background-timeout", str(config.background)]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, check=False, timeout=600
    )
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` failed:\n{result.stderr}", pytrace=False)
    with target.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def decode_contexts(event: Event, key: str) -> list[Json]:
    raw = event[key]
    text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)) if key == "cx" else raw
    contexts: Json = json.loads(text)
    assert contexts["schema"] == CONTEXTS, f"{key} is not a contexts envelope"
    entities: list[Json] = contexts["data"]
    return entities


def check_event(row: Row) -> None:
    """The enriched event keeps every input field and entity, and adds one client_session."""
    sent, enriched = row.sent, row.enriched
    bare_sent = {k: v for k, v in sent.items() if k not in ("co", "cx")}
    bare_enriched = {k: v for k, v in enriched.items() if k not in ("co", "cx")}
    if bare_enriched != bare_sent:
        keys = bare_sent.keys() | bare_enriched.keys()
        changed = sorted(k for k in keys if bare_sent.get(k) != bare_enriched.get(k))
        row.problems.append(f"fields changed: {changed}")
    key = "cx" if "cx" in sent else "co"
    other = "co" if key == "cx" else "cx"
    if key not in enriched or other in enriched:
        found = sorted(enriched.keys() & {"co", "cx"})
        row.problems.append(f"contexts must stay in `{key}` only, got {found}")
        return
    entities = decode_contexts(enriched, key)
    sessions = [entity for entity in entities if entity.get("schema") == CLIENT_SESSION]
    rest = [entity for entity in entities if entity.get("schema") != CLIENT_SESSION]
    if rest != (decode_contexts(sent, key) if key in sent else []):
        row.problems.append("the other entities changed")
    if len(sessions) != 1:
        row.problems.append(f"{len(sessions)} client_session entities")
        return
    row.entity = sessions[0]["data"]
    fields = set(row.entity)
    if not REQUIRED_FIELDS <= fields <= ENTITY_FIELDS:
        row.problems.append(f"client_session fields {sorted(fields)}")


def check_sessions(rows: list[Row]) -> None:
    """Same indexes and first events; identifiers linked one to one, per run."""
    users, sessions = Bijection("userId"), Bijection("sessionId")
    for row in rows:
        if not row.entity:
            continue
        oracle, entity = row.oracle, row.entity
        for name in COMPARED_FIELDS:
            expected, got = oracle.get(name), entity.get(name)
            if got != expected:
                row.problems.append(f"{name}: tracker {expected!r}, enricher {got!r}")
        for bijection, name in ((users, "userId"), (sessions, "sessionId")):
            problem = bijection.link(oracle[name], entity[name])
            if problem:
                row.problems.append(problem)
        # The tracker leaves previousSessionId out on a user's first session; null is the same.
        previous, got = oracle.get("previousSessionId"), entity.get("previousSessionId")
        expected = None if previous is None else sessions.forward.get(previous, f"<{previous}>")
        if got != expected:
            row.problems.append(f"previousSessionId: expected {expected!r}, enricher {got!r}")


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def describe_device(config: Config, rows: list[Row]) -> str:
    """The device's timeline up to its first difference and a few events beyond, with both
    sides' sessions; identifiers as short aliases, `state` is the lifecycle state the event is
    checked in (which timeout applies)."""
    device = rows[0].device
    by_eid = {row.sent["eid"]: f"#{row.position}" for row in rows}
    aliases: dict[str, dict[str, str]] = {"o": {}, "e": {}}

    def alias(side: str, value: Any) -> str:
        if value is None:
            return "-"
        names = aliases[side]
        return names.setdefault(value, f"{side}{len(names) + 1}")

    def session(side: str, entity: Json) -> str:
        if not entity:
            return "(no entity)"
        first = str(entity.get("firstEventId"))
        return (
            f"idx={entity.get('sessionIndex')} ev={entity.get('eventIndex')} "
            f"sid={alias(side, entity.get('sessionId'))} "
            f"prev={alias(side, entity.get('previousSessionId'))} first={by_eid.get(first, first)}"
        )

    first_difference = next(index for index, row in enumerate(rows) if row.problems)
    shown = rows[: first_difference + 1 + CONTEXT_ROWS]
    lines = [
        f"device {device.device_id} ({'cx' if device.base64 else 'co'}), timeouts: "
        f"foreground {config.foreground * 1000} ms, background {config.background * 1000} ms",
        f"     {'#':>3} {'time':<24} {'gap ms':>11} state {'kind':<11} | tracker | enricher",
    ]
    previous_t: int | None = None
    in_background = False
    for row in shown:
        step = device.steps[row.position]
        gap = "" if previous_t is None else str(step.t - previous_t)
        state = "bg" if in_background else "fg"
        mark = "!!" if row.problems else "  "
        lines.append(
            f"  {mark} {row.position:>3} {iso(step.t):<24} {gap:>11} {state:<5} {step.kind:<11} "
            f"| {session('o', row.oracle)} | {session('e', row.entity)}"
        )
        if row is rows[first_difference]:
            lines.extend(f"           {problem}" for problem in row.problems)
        previous_t = step.t
        if step.kind in ("background", "foreground"):
            in_background = step.kind == "background"
    rest = rows[len(shown) :]
    if rest:
        differing = sum(bool(row.problems) for row in rest)
        lines.append(f"  ... {len(rest)} more events, {differing} of them differ")
    return "\n".join(lines)


def assert_enricher_agrees(config: Config, devices: list[Device], workdir: Path) -> list[Row]:
    """Runs both sides over the devices' timelines and fails with the first differing device."""
    rows = run_oracle(config, devices)
    # Kafka interleaves devices: hand the enricher all events in time order.
    arrival = sorted(
        rows, key=lambda row: (row.device.steps[row.position].t, row.device.device_id, row.position)
    )
    output = run_enricher(config, arrival, workdir)
    assert len(output) == len(arrival), f"{len(arrival)} events in, {len(output)} out"
    for row, line in zip(arrival, output, strict=True):
        row.enriched = line["event"]
        key, eid = line["key"], row.enriched.get("eid")
        if key != row.device.device_id or eid != row.sent["eid"]:
            row.problems.append(f"output line is {key}/{eid}, not this event")
        else:
            check_event(row)
    check_sessions(rows)
    failing = [row for row in rows if row.problems]
    if failing:
        first = failing[0].device
        devices_failing = len({row.device.device_id for row in failing})
        pytest.fail(
            f"{len(failing)} of {len(rows)} events on {devices_failing} of {len(devices)} devices "
            "differ from the React Native tracker; first device:\n"
            + describe_device(config, [row for row in rows if row.device is first]),
            pytrace=False,
        )
    return rows


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.name)
def test_enricher_matches_react_native_tracker(config: Config, tmp_path: Path) -> None:
    rng = random.Random(f"differential-{config.name}")
    devices = [generate_device(rng, config, index) for index in range(DEVICES)]
    assert_enricher_agrees(config, devices, tmp_path)


def test_seed_example(tmp_path: Path) -> None:
    """The seed's worked example, fg 360 s / bg 15 s: ScreenView 0 s, Background 3 s (session 1),
    Foreground 30 s (27 s in the background > 15 s: session 2)."""
    steps = tuple(
        Step(t=START_MS + seconds * 1000, kind=kind, contexts=())
        for seconds, kind in ((0, "screen_view"), (3, "background"), (30, "foreground"))
    )
    device = Device(device_id="seed-example", base64=False, steps=steps)
    rows = assert_enricher_agrees(Config(foreground=360, background=15), [device], tmp_path)
    assert [row.oracle["sessionIndex"] for row in rows] == [1, 1, 2]
    assert rows[2].oracle["previousSessionId"] == rows[0].oracle["sessionId"]
    assert rows[2].oracle["firstEventId"] == rows[2].sent["eid"]
