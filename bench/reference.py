"""``enricher batch``'s output as the reference that every comparable streaming mode's output
must equal, byte for byte.

``enricher batch`` and ``enricher run`` apply the same rules with the same settings (the
benchmark gives both :data:`bench.lab.SALT` and leaves the session timeouts at their
defaults), so for every device the records a streaming run publishes must be, in order,
exactly the events batch wrote for that device: each record's value the bytes of a line's
``event`` object as batch wrote them, its key the line's ``key``. A fast path that quietly
diverges from batch's results fails the benchmark.

Compared: the modes that read the same JSON events, keyed by device, as batch's file
(``enricher run``, with and without the session events topic, and a baseline revision's).
Not compared: the collector format and the enriched TSV write other formats (a Thrift
collector record per event, Snowplow Enrich's 131 TSV fields), and the re-keying hop's JSON
events carry ``duid`` (set for the hop to find the device) and reach the enrichment in the
order the hop delivers them, not the file's.

Each side is kept as one running hash per device (its records' lengths and bytes, in order),
so that memory grows with the devices, not the events; on a difference, both sides are read
again for the first device that differs, to show its records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.common import BenchError
from bench.results import OutputCheck
from bench.stack import Kafka

DIGEST_BYTES = 16
SHOWN_BYTES = 240
"""of each of two differing records, from a little before the first byte that differs"""
SHOWN_BEFORE = 40
EVENT_FIELD = b',"event":'

Values = Iterable[tuple[bytes, bytes]]
"""(device, record value) pairs, in the order one side wrote them"""


def batch_values(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """The device and the event's bytes of every line of an ``enricher batch`` JSON Lines
    output, the event cut out of the line as written (``{"key":...,"event":{...}}``: a JSON
    string cannot hold an unescaped quote, so the first ``,"event":`` follows the key)."""
    with path.open("rb") as lines:
        for line in lines:
            head, separator, rest = line.partition(EVENT_FIELD)
            event = rest.rstrip(b"\n")
            if not separator or not event.endswith(b"}}"):
                raise BenchError(f"{path}: not a batch output line: {line[:SHOWN_BYTES]!r}")
            yield orjson.loads(head + b"}")["key"].encode(), event[:-1]


def topic_values(kafka: Kafka, topic: str) -> Iterator[tuple[bytes, bytes]]:
    """The key (the device) and value of every committed record of ``topic``."""
    for _, key, value in kafka.read_all(topic):
        yield key, value


def digests(values: Values) -> tuple[dict[bytes, bytes], int]:
    """One hash per device of its values' lengths and bytes, in order; and how many values."""
    running: dict[bytes, hashlib.blake2b] = {}
    count = 0
    for device, value in values:
        digest = running.get(device)
        if digest is None:
            digest = running[device] = hashlib.blake2b(digest_size=DIGEST_BYTES)
        digest.update(len(value).to_bytes(8, "little"))
        digest.update(value)
        count += 1
    return {device: digest.digest() for device, digest in running.items()}, count


@dataclass(frozen=True)
class Reference:
    """``enricher batch``'s output file (kept, to show a difference) and its digests."""

    path: Path
    digests: dict[bytes, bytes]
    records: int

    @staticmethod
    def read(path: Path) -> Reference:
        """The reference of the ``enricher batch`` output at ``path``."""
        found, records = digests(batch_values(path))
        return Reference(path, found, records)

    def check(self, kafka: Kafka, topic: str, mode: str, run: int) -> OutputCheck:
        """``topic``, the output of ``mode``'s ``run``, against batch's output."""
        found, records = digests(topic_values(kafka, topic))
        device = self.first_difference(found)
        if device is None:
            return OutputCheck(mode, run, records, len(found), "")
        return OutputCheck(mode, run, records, len(found), self.describe(device, kafka, topic))

    def first_difference(self, found: dict[bytes, bytes]) -> bytes | None:
        """The first device, in batch's order, whose records differ (or are missing) in
        ``found``; else the first one ``found`` has and batch has not; else None."""
        for device, digest in self.digests.items():
            if found.get(device) != digest:
                return device
        return next((device for device in found if device not in self.digests), None)

    def describe(self, device: bytes, kafka: Kafka, topic: str) -> str:
        """Where ``device``'s records in ``topic`` first differ from batch's, both shown."""
        expected = [value for key, value in batch_values(self.path) if key == device]
        got = [value for key, value in topic_values(kafka, topic) if key == device]
        pairs = zip(expected, got, strict=False)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(expected), len(got)))
        start = _common_prefix(expected, got, at)
        return (
            f"device {device.decode(errors='replace')!r}, record {at + 1} (batch wrote"
            f" {len(expected)} for it, the topic holds {len(got)}): batch"
            f" {_excerpt(expected, at, start)}, the topic {_excerpt(got, at, start)}"
        )


def _common_prefix(expected: list[bytes], got: list[bytes], at: int) -> int:
    """How many leading bytes the ``at``-th records of both sides share (0 if one is missing)."""
    if at >= len(expected) or at >= len(got):
        return 0
    a, b = expected[at], got[at]
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _excerpt(values: list[bytes], at: int, differs_at: int) -> str:
    """The ``at``-th of ``values`` from a little before ``differs_at``, truncated."""
    if at >= len(values):
        return "(none)"
    value = values[at]
    start = max(0, differs_at - SHOWN_BEFORE)
    end = start + SHOWN_BYTES
    text = value[start:end].decode("utf-8", "backslashreplace")
    return "`" + ("..." if start else "") + text + ("..." if end < len(value) else "") + "`"
