"""Entity builders and the Iglu schema URIs they carry."""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

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
_EPOCH_ORDINAL = _EPOCH.toordinal()
_MAX_FAST_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_date_of_ordinal = date.fromordinal


@functools.lru_cache(maxsize=65536)
def iso_millis(time_ms: int) -> str:
    """Format epoch milliseconds as JavaScript's ``toISOString()`` does, for any time (cached:
    every event of a session carries its first event's time). Years outside 0000-9999 take
    JavaScript's expanded form, a sign and six digits (``+010000-01-01T00:00:00.000Z``)."""
    if 0 <= time_ms <= _MAX_FAST_MS:  # 1970 to 9999: the date by its ordinal, no strftime
        days, within = divmod(time_ms, 86_400_000)
        date = _date_of_ordinal(_EPOCH_ORDINAL + days)
        seconds, millis = divmod(within, 1000)
        minutes, seconds = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        return (
            f"{date.year:04d}-{date.month:02d}-{date.day:02d}"
            f"T{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}Z"
        )
    cycles, within = divmod(time_ms, _MS_PER_400_YEARS)
    moment = _EPOCH + timedelta(milliseconds=within)
    year = moment.year + 400 * cycles
    text = f"{year:04d}" if 0 <= year <= 9999 else f"{'+' if year > 0 else '-'}{abs(year):06d}"
    return f"{text}-{moment:%m-%dT%H:%M:%S}.{time_ms % 1000:03d}Z"


ANONYMOUS_USER_ID = "00000000-0000-0000-0000-000000000000"
"""The ``userId`` of an anonymous event's session, as the mobile trackers write it"""


def client_session_data(
    state: SessionState, storage_mechanism: str, *, anonymous: bool = False
) -> dict[str, Any]:
    """The ``client_session`` 1-0-2 data for the event that produced ``state``; for an
    anonymous event, as the trackers write it under anonymisation: the null user id and no
    previous session id (the session itself is the same)."""
    return {
        "userId": ANONYMOUS_USER_ID if anonymous else state.user_id,
        "sessionId": state.session_id,
        "sessionIndex": state.session_index,
        "previousSessionId": None if anonymous else state.previous_session_id,
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
    anonymous: bool = False,
) -> list[SelfDescribing]:
    """The entities the enricher attaches to an event, in attachment order."""
    entities: list[SelfDescribing] = []
    if session_context:
        data = client_session_data(state, storage_mechanism, anonymous=anonymous)
        entities.append({"schema": CLIENT_SESSION_SCHEMA, "data": data})
    if lifecycle_context:
        entities.append(
            {"schema": APPLICATION_LIFECYCLE_SCHEMA, "data": application_lifecycle_data(state)}
        )
    return entities


def client_session_contexts(state: SessionState, storage_mechanism: str) -> str:
    """The ``co`` JSON of an event with no contexts of its own and the ``client_session``
    entity alone: exactly ``orjson.dumps`` of the contexts envelope around
    ``session_entities(state, ...)``, built from the session's two fixed parts (ids, indexes,
    first event; formatted once per session) around the event's index."""
    formatted = state.formatted
    if formatted is None or formatted[0] != storage_mechanism:
        formatted = state.formatted = (
            storage_mechanism,
            *_client_session_parts(state, storage_mechanism),
        )
    return f"{formatted[1]}{state.event_index}{formatted[2]}"


def _client_session_parts(state: SessionState, storage_mechanism: str) -> tuple[str, str]:
    """The contexts JSON of :func:`client_session_contexts` before and after the event index
    (everything in it but the index is the same for every event of a session)."""
    data = {**client_session_data(state, storage_mechanism), "eventIndex": 0}
    envelope = {
        "schema": CONTEXTS_SCHEMA,
        "data": [{"schema": CLIENT_SESSION_SCHEMA, "data": data}],
    }
    # Keys are written in order and quotes inside strings are escaped: the first match is the
    # key itself.
    head, tail = orjson.dumps(envelope).decode().split('"eventIndex":0', 1)
    return head + '"eventIndex":', tail
