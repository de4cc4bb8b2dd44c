"""Avro in the Confluent wire format (magic byte 0, 4-byte schema id, Avro body).

Talks to any Confluent-compatible Schema Registry over its REST API with the standard library:
``GET /schemas/ids/{id}`` to read a writer schema, ``POST /subjects/{subject}/versions`` to
register the schemas the enricher writes. Writer schemas are cached by id, and raw events are
read through schema resolution into ``raw_event.avsc``, so producers may evolve their schema
compatibly.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fastavro

from enricher.codecs import avro, tracker
from enricher.errors import BadInput, Unavailable

MAGIC = 0
_HEADER_SIZE = 5
_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryClient:
    """The few Schema Registry calls the enricher makes, with credentials from the URL."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self._headers = {"Accept": _CONTENT_TYPE, "Content-Type": _CONTENT_TYPE}
        if parts.username is not None:
            token = f"{parts.username}:{parts.password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc += f":{parts.port}"
        self._base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._timeout = timeout

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self._base + path, data=data, headers=self._headers)
        with urllib.request.urlopen(request, timeout=self._timeout) as response:
            return json.load(response)

    def schema(self, schema_id: int) -> str | None:
        """The schema text registered under ``schema_id``, or None if there is none."""
        try:
            return str(self._call(f"/schemas/ids/{schema_id}")["schema"])
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise Unavailable(
                f"schema registry: HTTP {error.code} for schema {schema_id}"
            ) from None
        except (OSError, ValueError, KeyError) as error:
            raise Unavailable(f"schema registry: {error}") from None

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Register ``schema`` under ``subject`` (idempotent) and return its id."""
        body = {"schemaType": "AVRO", "schema": json.dumps(schema)}
        try:
            return int(self._call(f"/subjects/{subject}/versions", body)["id"])
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:200]
            raise Unavailable(
                f"schema registry: HTTP {error.code} registering {subject}: {detail}"
            ) from None
        except (OSError, ValueError, KeyError) as error:
            raise Unavailable(f"schema registry: {error}") from None


class RegistryCodec:
    """Decodes raw events, and heads Avro bodies with the id of their registered schema."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self._writers: dict[int, Any] = {}

    def decode(self, data: bytes) -> tracker.TrackerEvent:
        if len(data) < _HEADER_SIZE or data[0] != MAGIC:
            raise BadInput("not_avro", "no Confluent wire-format header (magic byte 0)")
        schema_id = int.from_bytes(data[1:_HEADER_SIZE], "big")
        record = avro.read_record(data[_HEADER_SIZE:], self._writer(schema_id), avro.RAW_SCHEMA)
        return tracker.from_fields(record["payload"])

    def _writer(self, schema_id: int) -> Any:
        writer = self._writers.get(schema_id)
        if writer is None:
            text = self.client.schema(schema_id)
            if text is None:
                raise BadInput("unknown_schema_id", f"schema id {schema_id} is not registered")
            try:
                writer = fastavro.parse_schema(json.loads(text))
            except (ValueError, fastavro.schema.SchemaParseException) as error:
                raise BadInput("not_avro", f"schema id {schema_id} is not Avro: {error}") from None
            self._writers[schema_id] = writer
        return writer

    def writer(self, subject: str, schema: dict[str, Any]) -> Callable[[], bytes]:
        """The wire-format header (magic byte, schema id) for ``schema`` under ``subject``,
        registered on first use."""
        header: list[bytes] = []

        def get() -> bytes:
            if not header:
                schema_id = self.client.register(subject, schema)
                header.append(bytes([MAGIC]) + schema_id.to_bytes(4, "big"))
            return header[0]

        return get


def encode_raw(schema_id: int, fields: dict[str, str]) -> bytes:
    """A raw event in the wire format, for producers and tests."""
    return bytes([MAGIC]) + schema_id.to_bytes(4, "big") + avro.encode_raw(fields)
