"""Avro bodies (schemaless binary, as Kafka values) for raw and enriched events.

``schemas/raw_event.avsc`` carries the tracker protocol losslessly as a map of strings, in
the order sent; ``schemas/enriched_event.avsc`` adds the entities as typed records, so Avro
consumers read the session without parsing contexts.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError

from enricher.codecs import tracker
from enricher.enrich import Enriched
from enricher.entities import APPLICATION_LIFECYCLE_SCHEMA, CLIENT_SESSION_SCHEMA
from enricher.errors import BadInput

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def load_schema(name: str) -> dict[str, Any]:
    """One of the product's Avro schemas, as JSON."""
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / name).read_text())
    return schema


RAW_SCHEMA_JSON = load_schema("raw_event.avsc")
ENRICHED_SCHEMA_JSON = load_schema("enriched_event.avsc")
RAW_SCHEMA = fastavro.parse_schema(RAW_SCHEMA_JSON)
ENRICHED_SCHEMA = fastavro.parse_schema(ENRICHED_SCHEMA_JSON)

# Reading corrupt bytes with fastavro fails in many ways; all of them mean "not our Avro".
_READ_ERRORS = (
    EOFError,
    ValueError,
    IndexError,
    TypeError,
    OverflowError,
    KeyError,
    MemoryError,
    SchemaResolutionError,
)


def read_record(
    data: bytes, writer_schema: Any, reader_schema: Any | None = None
) -> dict[str, Any]:
    """One schemaless Avro record; the bytes must hold exactly one."""
    stream = io.BytesIO(data)
    try:
        record = fastavro.schemaless_reader(stream, writer_schema, reader_schema)
    except _READ_ERRORS as error:
        raise BadInput("not_avro", f"{type(error).__name__}: {error}") from None
    if stream.tell() != len(data) or not isinstance(record, dict):
        raise BadInput("not_avro", f"{len(data) - stream.tell()} bytes left after the record")
    return record


def write_record(record: dict[str, Any], schema: Any) -> bytes:
    stream = io.BytesIO()
    fastavro.schemaless_writer(stream, schema, record)
    return stream.getvalue()


def decode(data: bytes) -> tracker.TrackerEvent:
    """A raw event from its Avro body."""
    return tracker.from_fields(read_record(data, RAW_SCHEMA)["payload"])


def encode_raw(fields: dict[str, str]) -> bytes:
    """A tracker-protocol event as a raw Avro body."""
    return write_record({"payload": fields}, RAW_SCHEMA)


def enriched_record(enriched: Enriched) -> dict[str, Any]:
    """The enriched event as a record of ``enriched_event.avsc``: the payload as the JSON
    codec writes it (an Avro string is Unicode text: a lone surrogate the contexts hold is
    written as its JSON escape)."""
    entities = {entity["schema"]: entity["data"] for entity in enriched.entities}
    return {
        "payload": enriched.fields(unicode=True),
        "client_session": entities.get(CLIENT_SESSION_SCHEMA),
        "application_lifecycle": entities.get(APPLICATION_LIFECYCLE_SCHEMA),
    }


def encode(enriched: Enriched) -> bytes:
    """An enriched event as an Avro body."""
    return write_record(enriched_record(enriched), ENRICHED_SCHEMA)


def decode_enriched(data: bytes) -> dict[str, Any]:
    """An enriched Avro body as a record (for consumers and tests)."""
    return read_record(data, ENRICHED_SCHEMA)
