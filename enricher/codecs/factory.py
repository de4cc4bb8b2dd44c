"""Wire formats by name: the decoder for the input format and the encoders for the output format."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from enricher.codecs import (
    avro,
    session_events,
    snowplow_collector,
    snowplow_enriched,
    tracker,
)
from enricher.codecs.enriched_tsv import ContextsColumn
from enricher.codecs.registry import RegistryClient, RegistryCodec
from enricher.config import Settings
from enricher.enrich import Enriched
from enricher.errors import BadInput
from enricher.session_events import SessionEvent

Decoder = Callable[[bytes], tracker.TrackerEvent]
Encoder = Callable[[Enriched], bytes]
SessionEncoder = Callable[[SessionEvent], bytes]


class Codecs(NamedTuple):
    decode: Decoder
    encode: Encoder
    encode_session: SessionEncoder
    """for the session events topic, in the output's format family"""


def _encode_json(enriched: Enriched) -> bytes:
    return tracker.dump(enriched.fields())


def codecs(settings: Settings) -> Codecs:
    """The decoder for the input format and the encoders for the output format."""
    decoders: dict[str, Decoder] = {
        "json": tracker.decode,
        "avro": avro.decode,
        "snowplow-collector": snowplow_collector.decode,
        "snowplow-enriched": snowplow_enriched.decode,
    }
    column: ContextsColumn = (
        "contexts" if settings.entity_field == "contexts" else "derived_contexts"
    )
    encoders: dict[str, Encoder] = {
        "json": _encode_json,
        "avro": avro.encode,
        "snowplow-collector": snowplow_collector.encode,
        "snowplow-enriched": snowplow_enriched.encoder(column),
    }
    session_encoders: dict[str, SessionEncoder] = {
        "json": session_events.encode_json,
        "avro": session_events.encode_avro,
        "snowplow-collector": session_events.encode_json,
        "snowplow-enriched": session_events.encode_json,
    }
    if "avro-registry" in (settings.input_format, settings.output_format):
        registry = RegistryCodec(RegistryClient(settings.schema_registry_url))
        output = registry.writer(f"{settings.output_topic}-value", avro.ENRICHED_SCHEMA_JSON)
        sessions = registry.writer(
            f"{settings.session_events_topic}-value", session_events.SCHEMA_JSON
        )
        decoders["avro-registry"] = registry.decode
        encoders["avro-registry"] = lambda enriched: output() + avro.encode(enriched)
        session_encoders["avro-registry"] = lambda event: (
            sessions() + session_events.encode_avro(event)
        )
    return Codecs(
        decoders[settings.input_format],
        _checked(encoders[settings.output_format]),
        session_encoders[settings.output_format],
    )


def _checked(encode: Encoder) -> Encoder:
    """An encoder whose failures on one event are that event's fault, not the service's."""

    def checked(enriched: Enriched) -> bytes:
        try:
            return encode(enriched)
        except (ValueError, TypeError, OverflowError) as error:
            raise BadInput("not_encodable", f"{type(error).__name__}: {error}") from None

    return checked
