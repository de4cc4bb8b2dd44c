"""The ``snowplow-enriched`` format: Snowplow Enrich's enriched events in, the same events
out with the session entity added.

An enriched event (:mod:`enricher.codecs.enriched_tsv`) becomes the event the rules read: its
id is ``event_id``, its time ``dvce_created_tstamp``, else ``true_tstamp``, else
``dvce_sent_tstamp`` (the tracker protocol's dtm, ttm, stm), its app ``app_id``, its
lifecycle move a self-describing ``application_foreground`` / ``application_background``
event, and the tracker's entities those of ``contexts``. The fields are kept, by name and in
order, so that the output is the input record with the entities the enricher attaches added to
one contexts column (``derived_contexts``, where Enrich puts every entity the pipeline derives,
or ``contexts``), every other field byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable

from enricher.codecs import enriched_tsv
from enricher.codecs.enriched_tsv import FIELDS, INDEX, ContextsColumn
from enricher.codecs.tracker import LIFECYCLE_SCHEMAS, TrackerEvent
from enricher.enrich import Enriched

_APP_ID = INDEX["app_id"]
_EVENT = INDEX["event"]


def decode(data: bytes) -> TrackerEvent:
    """One enriched event, as the rules read it."""
    fields = enriched_tsv.split(data)
    event_id = enriched_tsv.event_id(fields)
    time_ms = enriched_tsv.event_time_ms(fields)
    unstruct = enriched_tsv.self_describing(fields)
    lifecycle = None
    if unstruct is not None and fields[_EVENT] == "unstruct":
        lifecycle = LIFECYCLE_SCHEMAS.get(unstruct["schema"])
    return TrackerEvent(
        dict(zip(FIELDS, fields, strict=True)),
        event_id,
        time_ms,
        lifecycle,
        fields[_APP_ID] or None,
        enriched_tsv.entities(fields, "contexts"),
        None,
    )


def encoder(column: ContextsColumn) -> Callable[[Enriched], bytes]:
    """Writes an enriched event back with the entities the enricher attaches in ``column``."""

    def encode(enriched: Enriched) -> bytes:
        fields = list(enriched.event.fields.values())
        return enriched_tsv.with_entities(fields, column, enriched.entities)

    return encode
