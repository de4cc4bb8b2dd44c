"""The Confluent wire-format codec and its registry client, against an in-process stub of the
two REST calls it makes (no Schema Registry can be installed on the build machine; see
docs/devstack.md)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fastavro
import pytest
from support import START_MS, event_id, tracker_event

from enricher import session_events as events
from enricher.codecs import avro, factory, registry, session_events, tracker
from enricher.config import Settings
from enricher.enrich import Enricher
from enricher.errors import BadInput, Unavailable
from enricher.session import SessionConfig, SessionEngine

EID = event_id(1)


class Registry:
    """Schemas by id and subjects, as a Confluent-compatible registry keeps them."""

    def __init__(self) -> None:
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.down = False

    def register(self, subject: str, schema: str) -> int:
        for schema_id, text in self.schemas.items():
            if text == schema:
                self.subjects[subject] = schema_id
                return schema_id
        schema_id = len(self.schemas) + 1
        self.schemas[schema_id] = schema
        self.subjects[subject] = schema_id
        return schema_id


@pytest.fixture
def server() -> Iterator[tuple[Registry, str]]:
    state = Registry()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path, dict(self.headers.items())))
            if state.down:
                self._reply(500, {"error_code": 50001, "message": "storage down"})
                return
            schema_id = int(self.path.rsplit("/", 1)[1])
            if schema_id in state.schemas:
                self._reply(200, {"schema": state.schemas[schema_id]})
            else:
                self._reply(404, {"error_code": 40403, "message": "Schema not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append(("POST", self.path, dict(self.headers.items())))
            subject = self.path.split("/")[2]
            assert body["schemaType"] == "AVRO"
            self._reply(200, {"id": state.register(subject, body["schema"])})

        def log_message(self, *_: Any) -> None:
            return

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield state, f"http://user:secret@127.0.0.1:{http.server_address[1]}/"
    http.shutdown()
    http.server_close()


def test_raw_events_are_read_through_schema_resolution(server: tuple[Registry, str]) -> None:
    state, url = server
    evolved = dict(avro.RAW_SCHEMA_JSON)
    evolved["fields"] = [*avro.RAW_SCHEMA_JSON["fields"], {"name": "extra", "type": "long"}]
    schema_id = state.register("raw-value", json.dumps(evolved))
    body = avro.write_record(
        {"payload": tracker_event(EID, START_MS), "extra": 7}, fastavro.parse_schema(evolved)
    )
    codec = registry.RegistryCodec(registry.RegistryClient(url))
    event = codec.decode(b"\0" + schema_id.to_bytes(4, "big") + body)
    assert event.fields == tracker_event(EID, START_MS)
    codec.decode(b"\0" + schema_id.to_bytes(4, "big") + body)
    fetches = [r for r in state.requests if r[0] == "GET"]
    assert len(fetches) == 1, "writer schemas are cached by id"
    assert fetches[0][2]["Authorization"] == "Basic dXNlcjpzZWNyZXQ="


def test_enriched_and_session_events_carry_their_registered_ids(
    server: tuple[Registry, str],
) -> None:
    state, url = server
    settings = Settings(
        output_topic="out",
        session_events_topic="sessions",
        output_format="avro-registry",
        schema_registry_url=url,
    )
    codecs = factory.codecs(settings)
    enricher = Enricher(SessionEngine(SessionConfig(salt="s")))
    step, enriched = enricher.enrich("d", None, tracker.from_fields(tracker_event(EID, START_MS)))
    first, second = codecs.encode(enriched), codecs.encode(enriched)
    schema_id = state.subjects["out-value"]
    assert json.loads(state.schemas[schema_id]) == avro.ENRICHED_SCHEMA_JSON
    assert first == second
    assert first[:5] == b"\0" + schema_id.to_bytes(4, "big")
    record = avro.decode_enriched(first[5:])
    assert record["client_session"]["firstEventId"] == EID
    assert sum(r[0] == "POST" for r in state.requests) == 1

    session = codecs.encode_session(events.started("d", step))
    session_id = state.subjects["sessions-value"]
    assert json.loads(state.schemas[session_id]) == session_events.SCHEMA_JSON
    assert session[:5] == b"\0" + session_id.to_bytes(4, "big")
    assert session_events.decode_avro(session[5:])["first_event_id"] == EID
    assert sum(r[0] == "POST" for r in state.requests) == 2


def test_bad_wire_format_is_bad_input(server: tuple[Registry, str]) -> None:
    _, url = server
    codec = registry.RegistryCodec(registry.RegistryClient(url))
    with pytest.raises(BadInput) as unknown:
        codec.decode(registry.encode_raw(99, tracker_event(EID, START_MS)))
    assert unknown.value.reason == "unknown_schema_id"
    for data in (b"", b"\x01\0\0\0\x01abc", b"\0\0\0"):
        with pytest.raises(BadInput) as bad:
            codec.decode(data)
        assert bad.value.reason == "not_avro"


def test_an_unreachable_registry_is_not_bad_input(server: tuple[Registry, str]) -> None:
    state, url = server
    state.down = True
    codec = registry.RegistryCodec(registry.RegistryClient(url))
    with pytest.raises(Unavailable):
        codec.decode(registry.encode_raw(1, tracker_event(EID, START_MS)))
    closed = registry.RegistryCodec(registry.RegistryClient("http://127.0.0.1:9/"))
    with pytest.raises(Unavailable):
        closed.decode(registry.encode_raw(1, tracker_event(EID, START_MS)))
