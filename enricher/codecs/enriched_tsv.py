"""Snowplow's enriched events, as Snowplow Enrich writes them to its enriched stream.

One event per record: UTF-8 text of :data:`FIELD_COUNT` tab-separated fields in the order of
:data:`FIELDS`, an empty field for a value the event does not have, no line break (a record
holds one event, with no newline after it). Timestamps are UTC, written
``YYYY-MM-DD HH:MM:SS.mmm``; ``unstruct_event`` holds the self-describing event in its
``unstruct_event`` envelope, and ``contexts`` (the tracker's entities) and ``derived_contexts``
(those enrichments added) each hold a ``contexts`` envelope of self-describing entities.

:func:`split` takes a record apart and refuses one that is not of that shape
(``invalid_field_count``: not UTF-8, a line break inside, or another number of fields); the
readers (:func:`event_id`, :func:`event_time_ms`, :func:`self_describing`, :func:`entities`)
validate only the fields they read, with the reasons the tracker-protocol codec uses for the
same things. :func:`with_entities` writes the record back with entities added to one of the
contexts columns, every other field exactly as it was.

JSON is read and written by orjson, with the standard library taking over where orjson would
change a value or cannot write one: JSON holding 19 digits in a row is read again by the
standard library (orjson reads integers beyond 64 bits as floats), and JSON orjson cannot
write (such integers, or nesting deeper than 254 levels) is written by it.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any, Literal

import orjson

from enricher.entities import SelfDescribing
from enricher.errors import BadInput, Reason

FIELDS: tuple[str, ...] = (
    # the application, the event and its versions
    "app_id", "platform", "etl_tstamp", "collector_tstamp", "dvce_created_tstamp", "event",
    "event_id", "txn_id", "name_tracker", "v_tracker", "v_collector", "v_etl",
    # the user
    "user_id", "user_ipaddress", "user_fingerprint", "domain_userid", "domain_sessionidx",
    "network_userid",
    # the IP address's location and owner
    "geo_country", "geo_region", "geo_city", "geo_zipcode", "geo_latitude", "geo_longitude",
    "geo_region_name", "ip_isp", "ip_organization", "ip_domain", "ip_netspeed",
    # the page and its referrer
    "page_url", "page_title", "page_referrer", "page_urlscheme", "page_urlhost",
    "page_urlport", "page_urlpath", "page_urlquery", "page_urlfragment", "refr_urlscheme",
    "refr_urlhost", "refr_urlport", "refr_urlpath", "refr_urlquery", "refr_urlfragment",
    "refr_medium", "refr_source", "refr_term",
    # marketing
    "mkt_medium", "mkt_source", "mkt_term", "mkt_content", "mkt_campaign",
    # the tracker's entities, a structured event, a self-describing event
    "contexts", "se_category", "se_action", "se_label", "se_property", "se_value",
    "unstruct_event",
    # ecommerce transactions and their items
    "tr_orderid", "tr_affiliation", "tr_total", "tr_tax", "tr_shipping", "tr_city",
    "tr_state", "tr_country", "ti_orderid", "ti_sku", "ti_name", "ti_category", "ti_price",
    "ti_quantity",
    # page pings
    "pp_xoffset_min", "pp_xoffset_max", "pp_yoffset_min", "pp_yoffset_max",
    # the browser, the operating system, the device, the document
    "useragent", "br_name", "br_family", "br_version", "br_type", "br_renderengine",
    "br_lang", "br_features_pdf", "br_features_flash", "br_features_java",
    "br_features_director", "br_features_quicktime", "br_features_realplayer",
    "br_features_windowsmedia", "br_features_gears", "br_features_silverlight", "br_cookies",
    "br_colordepth", "br_viewwidth", "br_viewheight", "os_name", "os_family",
    "os_manufacturer", "os_timezone", "dvce_type", "dvce_ismobile", "dvce_screenwidth",
    "dvce_screenheight", "doc_charset", "doc_width", "doc_height",
    # currency conversion
    "tr_currency", "tr_total_base", "tr_tax_base", "tr_shipping_base", "ti_currency",
    "ti_price_base", "base_currency",
    # added in later versions of Enrich, in the order they were added
    "geo_timezone", "mkt_clickid", "mkt_network", "etl_tags", "dvce_sent_tstamp",
    "refr_domain_userid", "refr_device_tstamp", "derived_contexts", "domain_sessionid",
    "derived_tstamp", "event_vendor", "event_name", "event_format", "event_version",
    "event_fingerprint", "true_tstamp",
)  # fmt: skip
"""The fields of an enriched event, in the order of the record."""

FIELD_COUNT = len(FIELDS)
INDEX: dict[str, int] = {name: index for index, name in enumerate(FIELDS)}
"""The position of each field in the record."""

ContextsColumn = Literal["contexts", "derived_contexts"]

CONTEXTS_ENVELOPE_SCHEMA = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1"
"""The envelope written into a contexts column that was empty (the one Enrich writes)."""

_EVENT_ID = INDEX["event_id"]
_UNSTRUCT_EVENT = INDEX["unstruct_event"]
# The event's time: the device's creation time, else the true time, else the device's send time.
_EVENT_TIME_FIELDS = tuple(
    (name, INDEX[name]) for name in ("dvce_created_tstamp", "true_tstamp", "dvce_sent_tstamp")
)
# The event-id rule of the tracker-protocol codec: 8-4-4-4-12 hex digits, either case.
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# The shape of a timestamp; whether the day exists is left to datetime.
_TSTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2} (?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
)
_EPOCH = datetime.datetime(1970, 1, 1)
_MILLISECOND = datetime.timedelta(milliseconds=1)
_MIN_MS = (datetime.datetime.min - _EPOCH) // _MILLISECOND  # 0001-01-01 00:00:00.000
_MAX_MS = (datetime.datetime.max - _EPOCH) // _MILLISECOND  # 9999-12-31 23:59:59.999
_LONG_NUMBER = re.compile(r"[0-9]{19}")


def split(data: bytes) -> list[str]:
    """The fields of one enriched-event record (:data:`FIELD_COUNT` of them, in the order of
    :data:`FIELDS`)."""
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        raise BadInput("invalid_field_count", f"not UTF-8 text: {error}") from None
    if "\n" in text or "\r" in text:
        raise BadInput("invalid_field_count", "a line break inside the record")
    fields = text.split("\t")
    if len(fields) != FIELD_COUNT:
        detail = f"expected {FIELD_COUNT} tab-separated fields, found {len(fields) if text else 0}"
        raise BadInput("invalid_field_count", detail)
    return fields


def parse_tstamp(text: str) -> int:
    """Epoch milliseconds of a timestamp ``YYYY-MM-DD HH:MM:SS`` (UTC) with no fraction of a
    second or one of 1 to 9 digits, of which milliseconds are kept (the rest is cut off)."""
    time_ms = _epoch_ms(text)
    if time_ms is None:
        raise BadInput("invalid_timestamp", f"not 'YYYY-MM-DD HH:MM:SS.mmm': {text[:40]!r}")
    return time_ms


def format_tstamp(time_ms: int) -> str:
    """Epoch milliseconds as ``YYYY-MM-DD HH:MM:SS.mmm`` (UTC), from year 1 to year 9999."""
    if not _MIN_MS <= time_ms <= _MAX_MS:
        raise ValueError(f"{time_ms} ms is outside the years 1 to 9999")
    return (_EPOCH + datetime.timedelta(milliseconds=time_ms)).isoformat(" ", "milliseconds")


def event_time_ms(fields: list[str]) -> int:
    """The event's time in epoch milliseconds: its ``dvce_created_tstamp``, else its
    ``true_tstamp``, else its ``dvce_sent_tstamp``, whichever is the first not empty (and must
    then be a valid timestamp)."""
    for name, index in _EVENT_TIME_FIELDS:
        text = fields[index]
        if text:
            time_ms = _epoch_ms(text)
            if time_ms is None:
                raise BadInput("invalid_timestamp", f"{name!r} is not a timestamp: {text[:40]!r}")
            return time_ms
    raise BadInput("missing_timestamp", "dvce_created_tstamp, true_tstamp, dvce_sent_tstamp empty")


def event_id(fields: list[str]) -> str:
    """The event's id, a UUID."""
    value = fields[_EVENT_ID]
    if not value:
        raise BadInput("missing_event_id", "the event_id field is empty")
    if _UUID.fullmatch(value) is None:
        raise BadInput("invalid_event_id", f"event_id is not a UUID: {value[:64]!r}")
    return value


def self_describing(fields: list[str]) -> SelfDescribing | None:
    """The self-describing event (its ``schema`` and ``data``), or None for an event of
    another kind."""
    raw = fields[_UNSTRUCT_EVENT]
    if not raw:
        return None
    value = _load(raw, "unstruct_event", "invalid_ue")
    inner = value.get("data") if isinstance(value, dict) else None
    if not _is_self_describing(inner):
        raise BadInput(
            "invalid_ue", "unstruct_event is not {'schema': ..., 'data': {'schema', 'data'}}"
        )
    return inner


def entities(fields: list[str], column: ContextsColumn) -> list[SelfDescribing]:
    """The self-describing entities in a contexts column (``[]`` for an empty one)."""
    envelope = _envelope(fields, column)
    return [] if envelope is None else envelope["data"]


def with_entities(fields: list[str], column: ContextsColumn, added: list[SelfDescribing]) -> bytes:
    """The record of ``fields`` with ``added`` after the entities of the contexts ``column``
    (in a new envelope if it had none); every other field is written as it was. Without
    entities to add, the record is the one ``fields`` came from."""
    if not added:
        return "\t".join(fields).encode()
    envelope = _envelope(fields, column)
    if envelope is None:
        envelope = {"schema": CONTEXTS_ENVELOPE_SCHEMA, "data": added}
    else:
        envelope = {**envelope, "data": envelope["data"] + added}
    out = fields.copy()
    out[INDEX[column]] = _dump(envelope, column)
    return "\t".join(out).encode()


def _epoch_ms(text: str) -> int | None:
    if _TSTAMP.fullmatch(text) is None:
        return None
    try:
        # Microseconds at most: the digits below them cannot change the millisecond.
        moment = datetime.datetime.fromisoformat(text[:26])
    except ValueError:  # no such day (February 30th), or the year 0
        return None
    return (moment - _EPOCH) // _MILLISECOND


def _envelope(fields: list[str], column: ContextsColumn) -> dict[str, Any] | None:
    raw = fields[INDEX[column]]
    if not raw:
        return None
    value = _load(raw, column, "invalid_contexts")
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("schema"), str)
        or not isinstance(value.get("data"), list)
        or not all(_is_self_describing(entity) for entity in value["data"])
    ):
        raise BadInput(
            "invalid_contexts", f"{column} is not {{'schema': ..., 'data': [{{'schema', 'data'}}]}}"
        )
    return value


def _is_self_describing(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("schema"), str) and "data" in value


def _load(raw: str, column: str, reason: Reason) -> Any:
    """The JSON value in a field. orjson decides what is valid JSON (no ``NaN``, no number
    beyond a double, no lone surrogate, at most 1024 levels); the standard library reads what
    may hold an integer orjson would read as a float."""
    try:
        value = orjson.loads(raw)
        if _LONG_NUMBER.search(raw) is not None:
            value = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise BadInput(reason, f"{column} is not valid JSON: {error}") from None
    return value


def _dump(value: Any, column: str) -> str:
    """Compact JSON text of ``value``: orjson's, else (an integer beyond 64 bits, nesting
    deeper than orjson writes) the standard library's."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        raise BadInput("too_deep", f"{column} nests too deep to be written again") from None
