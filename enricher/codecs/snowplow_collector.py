"""The ``snowplow-collector`` format: the Snowplow collector's records in, the same records out
with the session entity in each event's contexts.

A collector record (:mod:`enricher.codecs.collector`) carries the events of one HTTP request.
The re-keying hop (:mod:`enricher.rekey`) splits it into one record per event, keyed by the
event's device; this codec reads and writes those: the event, read as the ``json`` format
reads a tracker-protocol event, and written back into its record (the querystring of a GET,
the ``payload_data`` body of a POST) with the entity added as the ``json`` format adds it.
Every other field of the record is written as it came. A request with the ``SP-Anonymous``
header (sent by the trackers in anonymous mode) gets the session entity as the trackers write
it then (:func:`enricher.entities.client_session_data`).
"""

from __future__ import annotations

from enricher.codecs import collector, tracker
from enricher.codecs.tracker import TrackerEvent
from enricher.enrich import Enriched
from enricher.errors import BadInput


def decode(data: bytes) -> TrackerEvent:
    """The one event of a collector record the re-keying hop wrote."""
    payload = collector.decode(data)
    events = collector.events(payload)
    if events is None or len(events) != 1:
        count = "no events" if events is None else f"{len(events)} events"
        raise BadInput("not_payload_data", f"a record of one event expected, not {count}")
    anonymous = any(h.lower().startswith("sp-anonymous:") for h in payload.headers or ())
    return tracker.from_fields(events[0])._replace(envelope=payload, anonymous=anonymous)


def encode(enriched: Enriched) -> bytes:
    payload = enriched.event.envelope
    return collector.encode(collector.with_events(payload, [enriched.fields()]))
