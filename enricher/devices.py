"""Which device an event belongs to: an ordered list of sources, the first non-empty one wins
(``ENRICHER_DEVICE_ID``, e.g. ``client_session,duid,nuid``).

Sources: ``key`` (the Kafka record's key; a file line's ``key``); the tracker-protocol fields
``duid`` (domain user id), ``uid`` (user id), ``nuid`` and ``tnuid`` (network user id);
``client_session``, the ``userId`` of a ``client_session`` entity the tracker itself sent (the
mobile trackers' device-scoped id); and for Snowplow Enrich's TSV the fields
``domain_userid``, ``network_userid`` and ``user_id``. An event none of them names is bad
input (``missing_device_id``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from enricher.codecs.tracker import TrackerEvent, schema_family
from enricher.entities import CLIENT_SESSION_SCHEMA
from enricher.errors import BadInput

TRACKER_SOURCES = ("key", "duid", "uid", "nuid", "tnuid", "client_session")
ENRICHED_SOURCES = ("key", "domain_userid", "network_userid", "user_id", "client_session")
DEFAULTS = {
    "json": ("key",),
    "avro": ("key",),
    "avro-registry": ("key",),
    "snowplow-collector": ("client_session", "duid", "nuid", "tnuid"),
    "snowplow-enriched": ("client_session", "domain_userid", "network_userid"),
}
"""The chain of each input format when ``ENRICHER_DEVICE_ID`` is empty"""

_CLIENT_SESSION = schema_family(CLIENT_SESSION_SCHEMA)


def sources_for(setting: str, input_format: str) -> tuple[str, ...]:
    """The sources ``ENRICHER_DEVICE_ID`` names, or the input format's default."""
    named = tuple(s.strip() for s in setting.split(",") if s.strip())
    return named or DEFAULTS[input_format]


def allowed_sources(input_format: str) -> tuple[str, ...]:
    return ENRICHED_SOURCES if input_format == "snowplow-enriched" else TRACKER_SOURCES


class DeviceId:
    """Finds an event's device by the chain of sources."""

    __slots__ = ("only_key", "sources")

    def __init__(self, sources: Sequence[str]) -> None:
        self.sources = tuple(sources)
        self.only_key = self.sources == ("key",)
        """the device is the key: events can be enriched where they are, with no re-keying"""

    def __call__(
        self, key: bytes | None, event: TrackerEvent, known: Mapping[str, str] | None = None
    ) -> str:
        """The event's device; ``known`` holds what its record tells besides its fields (a
        collector record's ``nuid``, the network user id of its cookie)."""
        for source in self.sources:
            if source == "key":
                value = _text(key)
            elif source == "client_session":
                value = _client_session_user(event)
            else:
                value = event.fields.get(source) or (known or {}).get(source)
            if value:
                return value
        raise BadInput("missing_device_id", f"none of {', '.join(self.sources)} is set")


def _text(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("invalid_key", "the key is not UTF-8 text") from None


def _client_session_user(event: TrackerEvent) -> str | None:
    for entity in event.contexts:
        if schema_family(entity.get("schema")) == _CLIENT_SESSION:
            data = entity.get("data")
            user = data.get("userId") if isinstance(data, dict) else None
            return user if isinstance(user, str) else None
    return None
