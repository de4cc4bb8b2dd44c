"""The `avro-registry` format end to end: Confluent wire-format Avro in and out.

The raw schema is registered under `<input>-value`, the input is produced in the wire format
(magic byte, 4-byte schema id, Avro body), the service runs with INPUT_FORMAT=OUTPUT_FORMAT=
avro-registry, and the typed `client_session` of every output record must equal the reference
(`enricher batch` on the same events); a record naming an unknown schema id is dead-lettered
with reason `unknown_schema_id`.

No Schema Registry can be installed on the build machine (see docs/devstack.md), so the
scenario runs, against real Kafka and Redis, with a minimal in-test registry that answers the
two REST calls the enricher makes. It is no substitute for a real registry's compatibility
rules.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from feeding import Input, produce_input, traffic
from instances import Fleet
from progress import Progress
from reference import BatchReference, client_session, read_all
from service_settings import service_env
from stack import Stack

from enricher.codecs import avro
from enricher.codecs.registry import MAGIC, RegistryClient, encode_raw
from enricher.service import DLQ_HEADER_PREFIX

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

EVENTS = 3_000
DEVICES = 300
UNKNOWN_SCHEMA_ID = 987_654
_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


def run_registry_scenario(stack: Stack, fleet: Fleet, registry_url: str, tmp_path: Path) -> None:
    items = traffic(EVENTS, DEVICES, seed=81)
    reference = BatchReference(items, tmp_path)
    topics = stack.new_topics("registry", partitions=4)
    registry = RegistryClient(registry_url)
    schema_id = registry.register(f"{topics.input}-value", avro.RAW_SCHEMA_JSON)
    # Registering is idempotent: the same schema gets the same id.
    assert registry.register(f"{topics.input}-value", avro.RAW_SCHEMA_JSON) == schema_id

    good = [Input(key.encode(), encode_raw(schema_id, event)) for key, event in items]
    unknown = Input(items[0][0].encode(), encode_raw(UNKNOWN_SCHEMA_ID, items[0][1]))
    half = len(good) // 2
    env = service_env(
        stack,
        topics,
        ENRICHER_INPUT_FORMAT="avro-registry",
        ENRICHER_OUTPUT_FORMAT="avro-registry",
        ENRICHER_SCHEMA_REGISTRY_URL=registry_url,
    )
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instance = fleet.add("registry-a", env).start()
    sent = produce_input(stack, topics.input, [*good[:half], unknown, *good[half:]])
    progress.wait_done(120, fleet, expected=len(sent))
    assert instance.stop() == 0, instance.tail()

    output, dead = read_all(stack, topics)
    expected = reference.result()
    problems = []
    seen: set[str] = set()
    output_ids = set()
    for record in output:
        value = record.value or b""
        assert value[:1] == bytes([MAGIC]), f"no wire-format header: {value[:16]!r}"
        output_ids.add(int.from_bytes(value[1:5], "big"))
        decoded = avro.decode_enriched(value[5:])
        eid = decoded["payload"]["eid"]
        if eid in seen:
            problems.append(f"{eid} published twice")
        seen.add(eid)
        want = expected.get(eid)
        if want is None:
            problems.append(f"unexpected event {eid}")
            continue
        if decoded["client_session"] != client_session(want.event):
            problems.append(
                f"{eid}: client_session {decoded['client_session']} != {client_session(want.event)}"
            )
        if decoded["payload"] != want.event:
            problems.append(f"{eid}: payload {decoded['payload']} != {want.event}")
        if record.key != want.key.encode():
            problems.append(f"{eid}: key {record.key!r} != {want.key!r}")
    missing = set(expected) - seen
    assert not missing, f"{len(missing)} events missing, e.g. {sorted(missing)[:3]}"
    assert not problems, "\n".join(problems[:10])

    # One output schema id: the enriched schema, registered under `<output>-value`.
    assert len(output_ids) == 1
    (output_id,) = output_ids
    assert output_id == registry.register(f"{topics.output}-value", avro.ENRICHED_SCHEMA_JSON)
    registered = registry.schema(output_id)
    assert registered is not None
    assert json.loads(registered) == avro.ENRICHED_SCHEMA_JSON

    # The unknown schema id: dead-lettered, intact, with its reason.
    assert len(dead) == 1, dead
    (letter,) = dead
    errors = {
        name[len(DLQ_HEADER_PREFIX) :]: (value or b"").decode()
        for name, value in letter.headers
        if name.startswith(DLQ_HEADER_PREFIX)
    }
    assert errors["reason"] == "unknown_schema_id", errors
    assert (letter.key, letter.value) == (unknown.key, unknown.value)
    origin = sent[half]
    assert (errors["partition"], errors["offset"]) == (str(origin.partition), str(origin.offset))


# --------------------------------------------------------------------------- minimal registry


class _Registry:
    """The two Confluent Schema Registry calls the enricher makes, in memory."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.schemas: list[str] = []  # id - 1 -> schema text
        self.subjects: dict[str, list[int]] = {}

    def register(self, subject: str, schema: str) -> int:
        with self.lock:
            canonical = json.dumps(json.loads(schema), sort_keys=True)
            known = [json.dumps(json.loads(s), sort_keys=True) for s in self.schemas]
            if canonical in known:
                schema_id = known.index(canonical) + 1
            else:
                self.schemas.append(schema)
                schema_id = len(self.schemas)
            versions = self.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def schema(self, schema_id: int) -> str | None:
        with self.lock:
            return self.schemas[schema_id - 1] if 0 < schema_id <= len(self.schemas) else None


def _handler(registry: _Registry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", _CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            match = re.fullmatch(r"/schemas/ids/(\d+)", self.path)
            schema = registry.schema(int(match.group(1))) if match else None
            if schema is None:
                self._reply(404, {"error_code": 40403, "message": "Schema not found"})
            else:
                self._reply(200, {"schema": schema})

        def do_POST(self) -> None:
            match = re.fullmatch(r"/subjects/([^/]+)/versions", self.path)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if match is None or body.get("schemaType", "AVRO") != "AVRO":
                self._reply(404, {"error_code": 404, "message": "not supported"})
                return
            self._reply(200, {"id": registry.register(match.group(1), body["schema"])})

        def log_message(self, *_: Any) -> None:
            return

    return Handler


@pytest.fixture
def minimal_registry() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(_Registry()))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="registry", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_avro_registry_end_to_end_against_a_minimal_registry(
    stack: Stack, fleet: Fleet, minimal_registry: str, tmp_path: Path
) -> None:
    run_registry_scenario(stack, fleet, minimal_registry, tmp_path)
