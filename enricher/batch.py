"""File mode: the whole enrichment on JSON Lines or Avro container files, no servers needed.

Records are read and written one at a time, so memory grows with the number of devices, not
with the size of the file. State lives in memory, or in Redis (``--redis-url``) so that a run
can continue the sessions an earlier run or the streaming service left behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import fastavro
from fastavro.read import SchemaResolutionError

from enricher.codecs import avro, tracker
from enricher.enrich import Enriched, Enricher
from enricher.errors import BadInput
from enricher.session import SessionState

CHUNK_SIZE = 1000
RAW_FILE_SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "RawRecord",
        "namespace": "enricher.avro",
        "doc": "One line of a raw event file: the device id and its event.",
        "fields": [
            {"name": "key", "type": "string"},
            {"name": "event", "type": avro.RAW_SCHEMA_JSON},
        ],
    }
)
ENRICHED_FILE_SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "EnrichedRecord",
        "namespace": "enricher.avro",
        "doc": "One line of an enriched event file: the device id and its enriched event.",
        "fields": [
            {"name": "key", "type": "string"},
            {"name": "event", "type": avro.ENRICHED_SCHEMA_JSON},
        ],
    }
)


class UnusableFile(Exception):
    """The input file cannot be read at all (as opposed to one bad record in it)."""


class StateStore(Protocol):
    """Where file mode keeps device state between chunks."""

    def load(self, devices: set[str]) -> dict[str, SessionState]: ...

    def save(self, states: dict[str, SessionState]) -> None: ...


class MemoryStore:
    """Device state in a dict, for the length of one run."""

    def __init__(self) -> None:
        self.states: dict[str, SessionState] = {}

    def load(self, devices: set[str]) -> dict[str, SessionState]:
        return {d: self.states[d] for d in devices if d in self.states}

    def save(self, states: dict[str, SessionState]) -> None:
        self.states.update(states)


@dataclass(slots=True)
class Summary:
    """What a run did."""

    events: int = 0
    errors: int = 0
    sessions: int = 0
    devices: set[str] = field(default_factory=set)

    def line(self) -> str:
        return (
            f"events={self.events} devices={len(self.devices)} sessions={self.sessions}"
            f" errors={self.errors}"
        )


@dataclass(frozen=True, slots=True)
class _Item:
    """One input record: decoded, or the reason it could not be."""

    position: int
    original: Any
    key: str | None = None
    event: tracker.TrackerEvent | None = None
    error: BadInput | None = None


def run(enricher: Enricher, source: Path, target: Path, store: StateStore) -> Summary:
    """Enrich ``source`` into ``target``; bad records go to ``<target>.errors.jsonl``."""
    errors_path = target.with_name(target.name + ".errors.jsonl")
    with ExitStack() as files:
        reader = _reader(source, files)
        errors = files.enter_context(errors_path.open("w", encoding="utf-8"))
        chunks = _Chunks(enricher, store, _writer(target, files), errors)
        chunk: list[_Item] = []
        for item in reader:
            chunk.append(item)
            if len(chunk) == CHUNK_SIZE:
                chunks.process(chunk)
                chunk = []
        chunks.process(chunk)
    return chunks.summary


class _Chunks:
    """Enriches a run chunk by chunk, with one state load and one save per chunk."""

    def __init__(self, enricher: Enricher, store: StateStore, write: _Write, errors: IO[str]):
        self.enricher = enricher
        self.store = store
        self.write = write
        self.errors = errors
        self.summary = Summary()

    def process(self, chunk: list[_Item]) -> None:
        summary = self.summary
        states = self.store.load({item.key for item in chunk if item.key is not None})
        changed: dict[str, SessionState] = {}
        for item in chunk:
            if item.key is None or item.event is None:
                _write_error(self.errors, item)
                summary.errors += 1
                continue
            step, enriched = self.enricher.enrich(item.key, states.get(item.key), item.event)
            states[item.key] = changed[item.key] = step.state
            summary.events += 1
            summary.sessions += step.started is not None
            summary.devices.add(item.key)
            self.write(item.key, enriched)
        if changed:
            self.store.save(changed)


def _write_error(errors: IO[str], item: _Item) -> None:
    assert item.error is not None
    record = {
        "position": item.position,
        "reason": item.error.reason,
        "error": item.error.detail,
        "record": item.original,
    }
    errors.write(json.dumps(record, ensure_ascii=False) + "\n")


class _Write(Protocol):
    def __call__(self, key: str, enriched: Enriched) -> None: ...


def _is_avro(path: Path) -> bool:
    return path.suffix == ".avro"


def _reader(path: Path, files: ExitStack) -> Iterator[_Item]:
    if _is_avro(path):
        stream = files.enter_context(path.open("rb"))
        try:
            records = fastavro.reader(stream, RAW_FILE_SCHEMA)
        except (ValueError, EOFError, SchemaResolutionError) as error:
            raise UnusableFile(f"{path}: not an Avro file of raw events: {error}") from None
        return _avro_items(path, records)
    return _json_items(files.enter_context(path.open("rb")))


def _json_items(lines: IO[bytes]) -> Iterator[_Item]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        original = line.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise BadInput("not_an_object", 'a line must be {"key": ..., "event": {...}}')
            key = record.get("key")
            if not isinstance(key, str) or not key:
                raise BadInput("missing_key", "no device id in 'key'")
            yield _Item(number, original, key, tracker.from_fields(record.get("event")))
        except BadInput as error:
            yield _Item(number, original, error=error)
        except (ValueError, RecursionError) as error:  # not JSON, too deep, too many digits
            yield _Item(number, original, error=BadInput("not_json", str(error)))


def _avro_items(path: Path, records: Iterator[Any]) -> Iterator[_Item]:
    number = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except (ValueError, EOFError, SchemaResolutionError) as error:
            raise UnusableFile(f"{path}: unreadable after record {number}: {error}") from None
        number += 1
        try:
            if not record["key"]:
                raise BadInput("missing_key", "no device id in 'key'")
            yield _Item(
                number, record, record["key"], tracker.from_fields(record["event"]["payload"])
            )
        except BadInput as error:
            yield _Item(number, record, error=error)


def _writer(path: Path, files: ExitStack) -> _Write:
    if _is_avro(path):
        stream = files.enter_context(path.open("wb"))
        writer = files.enter_context(_AvroWriter(stream))
        return writer.write
    out = files.enter_context(path.open("wb"))

    def write_json(key: str, enriched: Enriched) -> None:
        fields = tracker.with_entities(enriched.event, enriched.entities)
        out.write(tracker.dump({"key": key, "event": fields}) + b"\n")

    return write_json


class _AvroWriter:
    """An Avro container file written record by record."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._writer = fastavro.write.Writer(stream, ENRICHED_FILE_SCHEMA, codec="deflate")

    def __enter__(self) -> _AvroWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self._writer.flush()

    def write(self, key: str, enriched: Enriched) -> None:
        self._writer.write({"key": key, "event": avro.enriched_record(enriched)})
