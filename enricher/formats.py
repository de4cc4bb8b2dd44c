"""Wire formats by name: how input values are decoded and output values encoded."""

from __future__ import annotations

from collections.abc import Callable

from enricher.codecs import avro, tracker
from enricher.codecs.registry import RegistryClient, RegistryCodec
from enricher.enrich import Enriched
from enricher.errors import BadInput

Decoder = Callable[[bytes], tracker.TrackerEvent]
Encoder = Callable[[Enriched], bytes]


def _encode_json(enriched: Enriched) -> bytes:
    return tracker.encode(enriched.event, enriched.entities)


def codecs(
    input_format: str, output_format: str, registry_url: str, output_topic: str
) -> tuple[Decoder, Encoder]:
    """The decoder for ``input_format`` and the encoder for ``output_format``."""
    registry = None
    if "avro-registry" in (input_format, output_format):
        registry = RegistryCodec(RegistryClient(registry_url), f"{output_topic}-value")
    decoders: dict[str, Decoder] = {"json": tracker.decode, "avro": avro.decode}
    encoders: dict[str, Encoder] = {"json": _encode_json, "avro": avro.encode}
    if registry is not None:
        decoders["avro-registry"] = registry.decode
        encoders["avro-registry"] = registry.encode
    return decoders[input_format], _checked(encoders[output_format])


def _checked(encode: Encoder) -> Encoder:
    """An encoder whose failures on one event are that event's fault, not the service's."""

    def checked(enriched: Enriched) -> bytes:
        try:
            return encode(enriched)
        except (ValueError, TypeError, OverflowError) as error:
            raise BadInput("not_encodable", f"{type(error).__name__}: {error}") from None

    return checked
