"""Entity builders and the Iglu schema URIs they carry."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

from enricher.session import SessionState

CLIENT_SESSION_SCHEMA = "iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-2"
APPLICATION_LIFECYCLE_SCHEMA = (
    "iglu:com.snowplowanalytics.mobile/application_lifecycle/jsonschema/1-0-0"
)
BACKGROUND_EVENT_SCHEMA = (
    "iglu:com.snowplowanalytics.snowplow/application_background/jsonschema/1-0-0"
)
FOREGROUND_EVENT_SCHEMA = (
    "iglu:com.snowplowanalytics.snowplow/application_foreground/jsonschema/1-0-0"
)
CONTEXTS_SCHEMA = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0"
UNSTRUCT_EVENT_SCHEMA = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"

SelfDescribing = dict[str, Any]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS_PER_400_YEARS = 146_097 * 86_400_000  # the Gregorian calendar repeats every 400 years


@functools.lru_cache(maxsize=65536)
def iso_millis(time_ms: int) -> str:
    """Format epoch milliseconds as JavaScript's ``toISOString()`` does, for any time (cached:
    every event of a session carries its first event's time). Years outside 0000-9999 take
    JavaScript's expanded form, a sign and six digits (``+010000-01-01T00:00:00.000Z``)."""
    cycles, within = divmod(time_ms, _MS_PER_400_YEARS)
    moment = _EPOCH + timedelta(milliseconds=within)
    year = moment.year + 400 * cycles
    text = f"{year:04d}" if 0 <= year <= 9999 else f"{'+' if year > 0 else '-'}{abs(year):06d}"
    return f"{text}-{moment:%m-%dT%H:%M:%S}.{time_ms % 1000:03d}Z"


def client_session_data(state: SessionState, storage_mechanism: str) -> dict[str, Any]:
    """The ``client_session`` 1-0-2 data for the event that produced ``state``."""
    return {
        "userId": state.user_id,
        "sessionId": state.session_id,
        "sessionIndex": state.session_index,
        "previousSessionId": state.previous_session_id,
        "storageMechanism": storage_mechanism,
        "eventIndex": state.event_index,
        "firstEventId": state.first_event_id,
        "firstEventTimestamp": iso_millis(state.first_event_ms),
    }


def application_lifecycle_data(state: SessionState) -> dict[str, Any]:
    """The ``application_lifecycle`` 1-0-0 data: visibility and the current state's counter."""
    visible = not state.in_background
    return {
        "isVisible": visible,
        "index": state.foreground_index if visible else state.background_index,
    }


def session_entities(
    state: SessionState,
    *,
    storage_mechanism: str,
    session_context: bool,
    lifecycle_context: bool,
) -> list[SelfDescribing]:
    """The entities the enricher attaches to an event, in attachment order."""
    entities: list[SelfDescribing] = []
    if session_context:
        entities.append(
            {"schema": CLIENT_SESSION_SCHEMA, "data": client_session_data(state, storage_mechanism)}
        )
    if lifecycle_context:
        entities.append(
            {"schema": APPLICATION_LIFECYCLE_SCHEMA, "data": application_lifecycle_data(state)}
        )
    return entities
