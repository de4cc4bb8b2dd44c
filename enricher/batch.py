"""File mode: the whole enrichment on JSON Lines or Avro container files, no servers needed.

Records are read and written one at a time, so memory grows with the number of devices, not
with the size of the file. State lives in memory, or in Redis (``--redis-url``) so that a run
can continue the sessions an earlier run or the streaming service left behind.

A line's key and event are decoded as the streaming service decodes a record's key and value
(the same codec, the same rules), so a bad line gets the reason its record would get in the
dead-letter topic; it goes to ``OUTPUT.errors.jsonl`` and the run goes on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import fastavro
import msgspec
import orjson
from fastavro.read import SchemaResolutionError

from enricher.codecs import avro, tracker
from enricher.devices import DeviceId
from enricher.enrich import Enriched, Enricher, check_not_ahead
from enricher.errors import BadInput
from enricher.session import SessionState

CHUNK_SIZE = 1000
WRITE_BUFFER_BYTES = 1 << 20
"""The output file's buffer: a system call per megabyte, not per 8 KiB (about 20 lines)"""
ERROR_RECORD_BYTES = 64 * 1024
"""At most this much of a bad record's original is copied into its error record; ``size`` and
``sha256`` still describe the whole (a 50 MB line must not become a 150 MB error record)."""
ERROR_DETAIL_CHARS = 1000  # as in the dead-letter topic's message header
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

    def load(self, devices: set[str]) -> dict[str, SessionState]:
        """The stored states of ``devices`` (the dict may hold others too); the chunk writes
        its new states into it, then hands them to :meth:`save`."""
        ...

    def save(self, states: dict[str, SessionState]) -> None: ...


class MemoryStore:
    """Device state in a dict, for the length of one run."""

    def __init__(self) -> None:
        self.states: dict[str, SessionState] = {}

    def load(self, devices: set[str]) -> dict[str, SessionState]:
        return self.states

    def save(self, states: dict[str, SessionState]) -> None:
        """Nothing to do: the chunk wrote its states into the dict :meth:`load` gave it."""


@dataclass(slots=True)
class Summary:
    """What a run did."""

    events: int = 0
    errors: int = 0
    sessions: int = 0
    devices: set[str] = field(default_factory=set)
    blank: int = 0
    """blank lines of a JSON Lines input, skipped"""

    def line(self) -> str:
        return (
            f"events={self.events} devices={len(self.devices)} sessions={self.sessions}"
            f" errors={self.errors} blank={self.blank}"
        )


class _Item(NamedTuple):
    """A bad record: where it was, the record itself, and why it is bad."""

    position: int
    original: bytes | dict[str, Any]
    """the line's bytes (its end included), or the Avro record"""
    error: BadInput


Decoded = tuple[str, tracker.TrackerEvent] | BadInput | None
"""A record decoded: its device and event, the reason it is bad, or None for a blank line"""
Read = tuple[int, bytes | dict[str, Any], Decoded]
"""One input record: its position, the record itself, and what it decoded to. (A plain
tuple: one is built per record.)"""


@dataclass(frozen=True, slots=True)
class TimeBound:
    """How far ahead of ``reference_ms`` (the run's reference time, standing in for the Kafka
    timestamp the service checks against) an event time may lie."""

    reference_ms: int
    max_ahead_ms: int


def run(
    enricher: Enricher,
    source: Path,
    target: Path,
    store: StateStore,
    bound: TimeBound,
    *,
    device_id: DeviceId | None = None,
) -> Summary:
    """Enrich ``source`` into ``target``; bad records go to ``<target>.errors.jsonl``. The
    device is a line's ``key``, or what ``device_id`` finds (as the streaming service's
    re-keying hop does, with no topic needed: a line's ``key`` may then be missing)."""
    errors_path = target.with_name(target.name + ".errors.jsonl")
    keyed = device_id is None or device_id.only_key
    with ExitStack() as files:
        chunks = _reader(source, files, keyed)
        if device_id is not None and not keyed:
            chunks = (_by_device(chunk, device_id) for chunk in chunks)
        errors = files.enter_context(errors_path.open("wb"))
        enrichment = _Chunks(enricher, store, _writer(target, files), errors, bound)
        for chunk in chunks:
            enrichment.process(chunk)
    return enrichment.summary


class _Chunks:
    """Enriches a run chunk by chunk, with one state load and one save per chunk."""

    def __init__(
        self,
        enricher: Enricher,
        store: StateStore,
        output: _Output,
        errors: IO[bytes],
        bound: TimeBound,
    ) -> None:
        self.enricher = enricher
        self.store = store
        self.output = output
        self.errors = errors
        self.bound = bound
        self.summary = Summary()

    def process(self, chunk: list[Read]) -> None:
        summary = self.summary
        states = self.store.load({d[0] for _, _, d in chunk if d.__class__ is tuple})
        changed: dict[str, SessionState] = {}
        enrich, encode, write = self.enricher.enrich, self.output.encode, self.output.write
        reference_ms, max_ahead_ms = self.bound.reference_ms, self.bound.max_ahead_ms
        devices = summary.devices
        events = sessions = 0
        for position, original, decoded in chunk:
            if decoded.__class__ is not tuple:
                if decoded is None:
                    summary.blank += 1
                else:
                    self.error(_Item(position, original, decoded))  # type: ignore[arg-type]
                continue
            key, event = decoded
            if reference_ms > 0 and event.time_ms - reference_ms > max_ahead_ms:
                try:
                    check_not_ahead(event.time_ms, reference_ms, max_ahead_ms)
                except BadInput as error:
                    self.error(_Item(position, original, error))
                    continue
            step, enriched = enrich(key, states.get(key), event)
            try:
                encoded = encode(key, enriched)
            except (ValueError, TypeError, OverflowError) as error:
                # As the service does: the event is dead-lettered and leaves no state behind.
                detail = f"{type(error).__name__}: {error}"
                self.error(_Item(position, original, BadInput("not_encodable", detail)))
                continue
            states[key] = changed[key] = step.state
            events += 1
            if step.started is not None:
                sessions += 1
            devices.add(key)
            write(encoded)
        summary.events += events
        summary.sessions += sessions
        if changed:
            self.store.save(changed)

    def error(self, item: _Item) -> None:
        self.errors.write(_error_record(item) + b"\n")
        self.summary.errors += 1


def _error_record(item: _Item) -> bytes:
    """The line of ``OUTPUT.errors.jsonl`` for a bad record: where it was, why it is bad, the
    record (a JSON Lines line as text, invalid UTF-8 replaced; an Avro record as an object),
    cut to :data:`ERROR_RECORD_BYTES` of the original (``truncated``), and the ``size`` and
    ``sha256`` of the whole original (of an Avro record: of its JSON)."""
    assert item.error is not None
    record: Any
    if isinstance(item.original, bytes):
        original = item.original.rstrip(b"\r\n")
        record = _head(original).decode("utf-8", "replace")
    else:
        original = _utf8(json.dumps(item.original, ensure_ascii=False))
        record = item.original
        if len(original) > ERROR_RECORD_BYTES:
            record = _head(original).decode("utf-8", "replace")
    entry = {
        "position": item.position,
        "reason": item.error.reason,
        "error": item.error.detail[:ERROR_DETAIL_CHARS],
        "record": record,
        "size": len(original),
        "sha256": hashlib.sha256(original).hexdigest(),
        "truncated": len(original) > ERROR_RECORD_BYTES,
    }
    return _utf8(json.dumps(entry, ensure_ascii=False))


def _head(data: bytes) -> bytes:
    """The first :data:`ERROR_RECORD_BYTES` of ``data``, not cutting a UTF-8 character."""
    if len(data) <= ERROR_RECORD_BYTES:
        return data
    end = ERROR_RECORD_BYTES
    # Back to a character's first byte: continuation bytes are 0b10xxxxxx, 3 at most.
    while end > ERROR_RECORD_BYTES - 3 and data[end] & 0xC0 == 0x80:
        end -= 1
    return data[:end]


def _utf8(text: str) -> bytes:
    """UTF-8 of JSON text; a lone surrogate (from a detail, say) goes out as its escape."""
    return text.encode("utf-8", "backslashreplace")


class _Output(Protocol):
    """Where enriched events go: :meth:`encode` may refuse an event, :meth:`write` may not."""

    def encode(self, key: str, enriched: Enriched) -> Any: ...

    def write(self, encoded: Any) -> None: ...


def _is_avro(path: Path) -> bool:
    return path.suffix == ".avro"


def _by_device(chunk: list[Read], device_id: DeviceId) -> list[Read]:
    """The records with each event's device as its key (or the reason it has none)."""
    found: list[Read] = []
    for position, original, decoded in chunk:
        keyed: Decoded = decoded
        if decoded.__class__ is tuple:
            key, event = decoded
            try:
                keyed = device_id(None if key is None else key.encode(), event), event
            except BadInput as error:
                keyed = error
        found.append((position, original, keyed))
    return found


def _reader(path: Path, files: ExitStack, keyed: bool) -> Iterator[list[Read]]:
    """The input's records, decoded, in chunks of :data:`CHUNK_SIZE`."""
    if _is_avro(path):
        stream = files.enter_context(path.open("rb"))
        try:
            records = fastavro.reader(stream, RAW_FILE_SCHEMA)
        except (ValueError, EOFError, SchemaResolutionError) as error:
            raise UnusableFile(f"{path}: not an Avro file of raw events: {error}") from None
        return _avro_reads(path, records, keyed)
    return _json_reads(files.enter_context(path.open("rb")), keyed)


def _json_reads(stream: IO[bytes], keyed: bool) -> Iterator[list[Read]]:
    """Each line decoded, kept as it was read (end of line included); a blank one decodes to
    None."""
    position = 0
    while lines := list(itertools.islice(stream, CHUNK_SIZE)):
        chunk: list[Read] = []
        for line in lines:
            position += 1
            if line.isspace():
                chunk.append((position, line, None))
                continue
            try:
                chunk.append((position, line, decode_line(line, keyed=keyed)))  # type: ignore[arg-type]
            except BadInput as error:
                chunk.append((position, line, error))
        yield chunk


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    """The usual line, as msgspec reads it: a key and an event of strings, nothing else (a
    member msgspec skipped would go unchecked, where the general reader refuses bad bytes or
    numbers anywhere in the line)."""

    event: dict[str, str]
    key: str | None = None


_read_line = msgspec.json.Decoder(_Line).decode


def decode_line(line: bytes, *, keyed: bool = True) -> tuple[str | None, tracker.TrackerEvent]:
    """The device id and the event of one ``{"key": ..., "event": {...}}`` line, decoded as the
    service decodes a record's key (UTF-8 text) and value (read as :func:`tracker.load` reads
    it, validated by :func:`tracker.from_fields`): the same input gets the same answer, the
    same reason, in both modes. Unless ``keyed``, the key may be missing (None).

    The usual line (a key, and an event of strings, nothing else) is read by msgspec in one
    pass, which checks every member's type as it parses; every other line the general way,
    which reads what msgspec refuses and says why a line is bad."""
    try:
        usual = _read_line(line)
    except (msgspec.DecodeError, RecursionError):  # msgspec nests less deep than orjson
        return _decode_line(line, keyed=keyed)
    key = usual.key
    if key or (key is None and not keyed):
        return key, tracker.from_strings(usual.event)
    return _decode_line(line, keyed=keyed)


def _decode_line(line: bytes, *, keyed: bool) -> tuple[str | None, tracker.TrackerEvent]:
    """:func:`decode_line` for any line: orjson, else the standard library's reading."""
    undecodable: UnicodeDecodeError | None = None
    try:
        record, unicode = orjson.loads(line), True
    except orjson.JSONDecodeError:
        unicode = False
        try:
            record = json.loads(line)  # as tracker.load reads a value the standard library's way
        except UnicodeDecodeError as error:
            # Bytes that are not UTF-8: the service refuses them in a key as invalid_key, in
            # a value as not_json. Which it is, the key read past them tells.
            undecodable = error
            try:
                record = json.loads(line.decode("utf-8", "surrogateescape"))
            except (ValueError, RecursionError):
                raise BadInput("not_json", str(error)) from None
        except (ValueError, RecursionError) as error:  # not JSON, too deep, too many digits
            raise BadInput("not_json", str(error)) from None
    if not isinstance(record, dict):
        raise BadInput("not_an_object", 'a line must be {"key": ..., "event": {...}}')
    key = record.get("key")
    if (keyed or key is not None) and (not isinstance(key, str) or not key):
        raise BadInput("missing_key", "no device id in 'key'")
    if key is not None and not unicode and not tracker.is_unicode(key):
        raise BadInput("invalid_key", f"the key is not UTF-8 text: {key[:64]!r}")
    if undecodable is not None:
        raise BadInput("not_json", str(undecodable))
    return key, tracker.from_fields(record.get("event"), unicode=unicode)


def _avro_reads(path: Path, records: Iterator[Any], keyed: bool) -> Iterator[list[Read]]:
    position = 0
    chunk: list[Read] = []
    while True:
        try:
            record = next(records)
        except StopIteration:
            break
        except (ValueError, EOFError, SchemaResolutionError) as error:
            raise UnusableFile(f"{path}: unreadable after record {position}: {error}") from None
        position += 1
        decoded: Decoded
        try:
            if keyed and not record["key"]:
                raise BadInput("missing_key", "no device id in 'key'")
            decoded = record["key"], tracker.from_fields(record["event"]["payload"])
        except BadInput as error:
            decoded = error
        chunk.append((position, record, decoded))
        if len(chunk) == CHUNK_SIZE:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _writer(path: Path, files: ExitStack) -> _Output:
    if _is_avro(path):
        stream = files.enter_context(path.open("wb"))
        return files.enter_context(_AvroWriter(stream))
    return _JsonLinesWriter(files.enter_context(path.open("wb", buffering=WRITE_BUFFER_BYTES)))


class _JsonLinesWriter:
    """A JSON Lines file: one ``{"key": ..., "event": {...}}`` per line."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def encode(self, key: str, enriched: Enriched) -> bytes:
        return tracker.dump({"key": key, "event": enriched.fields()}, line=True)

    def write(self, encoded: bytes) -> None:
        self._stream.write(encoded)


class _AvroWriter:
    """An Avro container file written record by record."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._writer = fastavro.write.Writer(stream, ENRICHED_FILE_SCHEMA, codec="deflate")

    def __enter__(self) -> _AvroWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self._writer.flush()

    def encode(self, key: str, enriched: Enriched) -> dict[str, Any]:
        return {"key": key, "event": avro.enriched_record(enriched)}

    def write(self, encoded: dict[str, Any]) -> None:
        self._writer.write(encoded)
