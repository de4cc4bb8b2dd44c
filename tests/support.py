"""Shared test helpers: tracker-protocol event builders, random timelines, CLI runs.

Everything here is written from the tracker protocol and ``session-rules.md``, not from the
enricher's code, so tests built on it check the enricher instead of repeating it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from hypothesis import strategies as st

from enricher.batch import TimeBound
from enricher.codecs.enriched_tsv import FIELDS as ENRICHED_FIELDS  # pinned by test_enriched_tsv
from enricher.ids import IdDeriver
from enricher.session import EventFacts, Lifecycle, SessionEngine, SessionState, Step

REPO = Path(__file__).resolve().parent.parent
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00.000Z
SECOND = 1000
DAY_MS = 86_400_000
# File mode without a reference time: event times are not checked against one.
UNBOUNDED = TimeBound(reference_ms=0, max_ahead_ms=0)

Json = dict[str, Any]
Fields = dict[str, str]
Kind = Literal["screen_view", "struct", "page_view", "background", "foreground"]
KINDS: tuple[Kind, ...] = ("screen_view", "struct", "page_view", "background", "foreground")

CONTEXTS = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0"
UNSTRUCT = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
CLIENT_SESSION = "iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-2"
APPLICATION_LIFECYCLE = "iglu:com.snowplowanalytics.mobile/application_lifecycle/jsonschema/1-0-0"
BACKGROUND = "iglu:com.snowplowanalytics.snowplow/application_background/jsonschema/1-0-0"
FOREGROUND = "iglu:com.snowplowanalytics.snowplow/application_foreground/jsonschema/1-0-0"
SCREEN_VIEW = "iglu:com.snowplowanalytics.mobile/screen_view/jsonschema/1-0-0"
APPLICATION = "iglu:com.snowplowanalytics.mobile/application/jsonschema/1-0-0"
SCREEN = "iglu:com.snowplowanalytics.mobile/screen/jsonschema/1-0-0"

LIFECYCLE_OF: dict[Kind, Lifecycle | None] = {
    "screen_view": None,
    "struct": None,
    "page_view": None,
    "background": Lifecycle.BACKGROUND,
    "foreground": Lifecycle.FOREGROUND,
}

# Entities a tracker attaches besides the session; the enricher must pass them through.
APPLICATION_ENTITY: Json = {"schema": APPLICATION, "data": {"version": "2.4.1", "build": "241"}}
SCREEN_ENTITY: Json = {
    "schema": SCREEN,
    "data": {"name": "Warenkorb Übersicht ✓", "id": "5b6d2a9c-0a52-4a8e-9b0e-8f7c1d2e3f40"},
}

UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def event_id(number: int) -> str:
    """A deterministic, valid event UUID."""
    return str(uuid.UUID(int=number, version=4))


def iso(time_ms: int) -> str:
    """Epoch milliseconds as JavaScript's ``toISOString()`` writes them (exact, no floats)."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=time_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def is_uuid4(text: object) -> bool:
    """A canonical RFC 4122 UUID string with the version-4 and variant bits."""
    if not isinstance(text, str) or not UUID_TEXT.fullmatch(text):
        return False
    value = uuid.UUID(text)
    return str(value) == text and value.version == 4 and value.variant == uuid.RFC_4122


def b64url(text: str | bytes) -> str:
    """base64url without padding, as trackers write ``cx`` and ``ue_px``."""
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64url_decode(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def self_describing(schema: str, data: object) -> Json:
    return {"schema": schema, "data": data}


def unstruct(schema: str, data: object) -> str:
    """The ``ue_pr`` envelope of a self-describing event."""
    return compact(self_describing(UNSTRUCT, self_describing(schema, data)))


def contexts_envelope(entities: Sequence[Json]) -> str:
    return compact(self_describing(CONTEXTS, list(entities)))


def tracker_event(
    eid: str,
    time_ms: int,
    kind: Kind = "screen_view",
    *,
    aid: str | None = "app",
    entities: Sequence[Json] | None = None,
    contexts_field: Literal["co", "cx"] = "co",
    base64_ue: bool = False,
    extra: Mapping[str, str] | None = None,
) -> Fields:
    """A tracker-protocol event as a mobile tracker sends it (every value a string)."""
    fields: Fields = {"eid": eid, "dtm": str(time_ms), "stm": str(time_ms + 250), "p": "mob"}
    fields.update({"tv": "rn-4.0.0", "tna": "appTracker"})
    if aid is not None:
        fields["aid"] = aid
    ue: str | None = None
    if kind == "screen_view":
        fields["e"] = "ue"
        ue = unstruct(SCREEN_VIEW, {"name": "Home ✓", "id": event_id(time_ms % 997)})
    elif kind == "struct":
        fields.update({"e": "se", "se_ca": "cart", "se_ac": "add"})
    elif kind == "page_view":
        fields.update({"e": "pv", "url": "https://example.com/ä?x=1"})
    else:
        fields["e"] = "ue"
        ue = unstruct(BACKGROUND if kind == "background" else FOREGROUND, {})
    if ue is not None:
        if base64_ue:
            fields["ue_px"] = b64url(ue)
        else:
            fields["ue_pr"] = ue
    if entities is not None:
        envelope = contexts_envelope(entities)
        fields[contexts_field] = envelope if contexts_field == "co" else b64url(envelope)
    fields.update(extra or {})
    return fields


def contexts_of(fields: Mapping[str, str]) -> list[Json]:
    """The entities in an event's ``co`` or ``cx`` (empty when it has neither)."""
    if "co" in fields:
        text = fields["co"]
    elif "cx" in fields:
        text = b64url_decode(fields["cx"])
    else:
        return []
    envelope = json.loads(text)
    assert envelope["schema"] == CONTEXTS
    entities: list[Json] = envelope["data"]
    return entities


def entity_of(fields: Mapping[str, str], schema: str = CLIENT_SESSION) -> Json | None:
    """The data of the one entity of ``schema`` in an event, or None."""
    found = [entity["data"] for entity in contexts_of(fields) if entity.get("schema") == schema]
    assert len(found) <= 1, f"{len(found)} entities of {schema}"
    return found[0] if found else None


# What Snowplow Enrich writes in ``event`` for a tracker-protocol ``e``.
_ENRICHED_EVENT = {"pv": "page_view", "pp": "page_ping", "se": "struct", "ue": "unstruct"}


def enriched_tsv(fields: Mapping[str, str], **enriched: str) -> bytes:
    """The enriched TSV record Snowplow Enrich writes for a tracker-protocol event (the fields
    the session rules read, and a few more), with ``enriched`` setting further columns."""

    def tstamp(name: str) -> str:
        if name not in fields:
            return ""
        moment = datetime.fromtimestamp(int(fields[name]) / 1000, UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{int(fields[name]) % 1000:03d}"

    ue = fields.get("ue_pr") or (b64url_decode(fields["ue_px"]) if "ue_px" in fields else "")
    co = fields.get("co") or (b64url_decode(fields["cx"]) if "cx" in fields else "")
    columns = {
        "app_id": fields.get("aid", ""),
        "platform": fields.get("p", ""),
        "collector_tstamp": tstamp("stm"),
        "dvce_created_tstamp": tstamp("dtm"),
        "event": _ENRICHED_EVENT.get(fields.get("e", ""), fields.get("e", "")),
        "event_id": fields.get("eid", ""),
        "name_tracker": fields.get("tna", ""),
        "v_tracker": fields.get("tv", ""),
        "user_id": fields.get("uid", ""),
        "domain_userid": fields.get("duid", ""),
        "network_userid": fields.get("nuid", fields.get("tnuid", "")),
        "contexts": co,
        "se_category": fields.get("se_ca", ""),
        "se_action": fields.get("se_ac", ""),
        "unstruct_event": ue,
        "page_url": fields.get("url", ""),
        "dvce_sent_tstamp": tstamp("stm"),
        "true_tstamp": tstamp("ttm"),
    }
    if ue:
        vendor, name, _, version = json.loads(ue)["data"]["schema"][5:].split("/")
        columns.update(
            event_vendor=vendor, event_name=name, event_format="jsonschema", event_version=version
        )
    columns.update(enriched)
    return "\t".join(columns.get(name, "") for name in ENRICHED_FIELDS).encode()


def facts(
    number: int, time_ms: int, kind: Kind = "screen_view", app_id: str | None = None
) -> EventFacts:
    return EventFacts(event_id(number), time_ms, LIFECYCLE_OF[kind], app_id)


def run_engine(engine: SessionEngine, device: str, events: Iterable[EventFacts]) -> list[Step]:
    """One device's events through the engine, in the given order."""
    steps: list[Step] = []
    state: SessionState | None = None
    for event in events:
        step = engine.advance(device, state, event)
        steps.append(step)
        state = step.state
    return steps


# --- random timelines ------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """One device's events (in arrival order) and the timeouts, in milliseconds, they run with."""

    foreground_ms: int
    background_ms: int
    app_foreground_ms: int  # for events of the app "fast", which has its own timeouts
    app_background_ms: int
    events: tuple[EventFacts, ...]

    def timeouts_for(self, app_id: str | None) -> tuple[int, int]:
        if app_id == "fast":
            return self.app_foreground_ms, self.app_background_ms
        return self.foreground_ms, self.background_ms


# Whole seconds, since that is how timeouts are configured; 0 included.
timeouts_ms = st.one_of(
    st.sampled_from([0, 1, 2, 15, 360, 1800]), st.integers(min_value=0, max_value=7200)
).map(lambda seconds: seconds * SECOND)


@st.composite
def timelines(draw: st.DrawFn, max_events: int = 40) -> Timeline:
    """A device's events with gaps mostly at, or 1 ms around, one of the timeouts; some events
    arrive late (older than the latest one), some are lifecycle events, some have their own
    app's timeouts."""
    foreground, background = draw(timeouts_ms), draw(timeouts_ms)
    app_foreground, app_background = draw(timeouts_ms), draw(timeouts_ms)
    limits = (foreground, background, app_foreground, app_background)
    count = draw(st.integers(min_value=1, max_value=max_events))
    latest = START_MS + draw(st.integers(min_value=0, max_value=DAY_MS))
    events: list[EventFacts] = []
    for number in range(count):
        time_ms = latest
        if number:
            shape = draw(st.sampled_from(("timeout", "timeout", "small", "any", "late")))
            if shape == "timeout":
                gap = draw(st.sampled_from(limits)) + draw(st.sampled_from((-1, 0, 0, 1)))
            elif shape == "small":
                gap = draw(st.integers(min_value=0, max_value=3))
            elif shape == "any":
                gap = draw(st.integers(min_value=0, max_value=3 * max(limits) + 10))
            else:
                gap = -draw(st.integers(min_value=1, max_value=DAY_MS))
            time_ms = latest + max(gap, -(latest - START_MS))
        kind = draw(st.sampled_from(KINDS))
        app_id = draw(st.sampled_from(("app", "fast", None)))
        events.append(EventFacts(event_id(number + 1), time_ms, LIFECYCLE_OF[kind], app_id))
        latest = max(latest, time_ms)
    return Timeline(foreground, background, app_foreground, app_background, tuple(events))


# --- session states ------------------------------------------------------------------------------

STATE_IDS = IdDeriver("salt")
TIME_MS = st.integers(min_value=0, max_value=253402300799999)
COUNTER = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def states(draw: st.DrawFn, device: str = "device-1") -> SessionState:
    """Any state a device's record can hold, ids derived with :data:`STATE_IDS`."""
    index = draw(st.integers(min_value=1, max_value=2**31 - 1))
    canonical = draw(st.booleans())
    raw = uuid.UUID(int=draw(st.integers(min_value=0, max_value=2**128 - 1)))
    first_event_id = str(raw) if canonical else str(raw).upper()
    previous = draw(st.none() | st.uuids().map(str))
    return SessionState(
        user_id=STATE_IDS.user_id(device),
        session_id=STATE_IDS.session_id(device, index, first_event_id),
        session_index=index,
        previous_session_id=previous,
        event_index=draw(COUNTER),
        first_event_id=first_event_id,
        first_event_ms=draw(TIME_MS),
        last_event_ms=draw(TIME_MS),
        in_background=draw(st.booleans()),
        background_index=draw(COUNTER),
        foreground_index=draw(COUNTER),
        renews_applied=draw(COUNTER),
        expires_ms=draw(TIME_MS),
        ended=draw(st.booleans()),
        ends_declared=draw(COUNTER),
    )


# --- files and the CLI ---------------------------------------------------------------------------


def jsonl_line(key: str, event: object) -> str:
    return json.dumps({"key": key, "event": event}, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, records: Iterable[tuple[str, Fields]]) -> None:
    path.write_text("".join(jsonl_line(key, event) for key, event in records), encoding="utf-8")


def read_jsonl(path: Path) -> list[Json]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def cli_env() -> dict[str, str]:
    """The environment without any ``ENRICHER_*`` setting, so only the flags count."""
    return {name: value for name, value in os.environ.items() if not name.startswith("ENRICHER_")}


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m enricher ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "enricher", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def run_batch(
    source: Path, target: Path, *flags: str, salt: str = "test-salt"
) -> subprocess.CompletedProcess[str]:
    """``enricher batch``; fails the test with its stderr unless it exits 0."""
    result = run_cli("batch", "--input", source, "--output", target, "--salt", salt, *flags)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr}"
    return result
