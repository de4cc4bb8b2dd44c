"""Dead letters: the input record that could not be enriched, labelled with why.

A dead letter carries the original key, value and headers, then the error headers
(``enricher.error.reason``, ``.message``, ``.topic``, ``.partition``, ``.offset``). Incoming
headers whose names start with ``enricher.error.`` are dropped, so a producer cannot pose as
the enricher. A dead letter must always be producible, or its partition would stall: when the
original does not fit in ``max_bytes`` (key, value and headers together), the dead letter
carries a truncated copy instead, with ``enricher.error.truncated``, the original's size and
the SHA-256 of its value in headers, so the original can still be found and identified
upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

from enricher.errors import BadInput

Header = tuple[str, str | bytes | None]
Headers = Sequence[Header]
HEADER_PREFIX = "enricher.error."
_MESSAGE_BYTES = 1000
# Room kept for the record's framing in a produce request and the truncation headers.
_RESERVE = 1024


class ProducerRecord(NamedTuple):
    """A record as the producer takes it (Kafka's own name for it)."""

    key: bytes | None
    value: bytes | None
    headers: Headers


def record_size(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
    """The bytes a record occupies for the producer's size limit: key, value and headers."""
    size = len(key or b"") + len(value or b"")
    for name, header in headers or ():
        size += len(_utf8(name)) + len(_utf8(header) if isinstance(header, str) else header or b"")
    return size


def dead_letter(
    original: ProducerRecord, error: BadInput, source: tuple[str, int, int], max_bytes: int
) -> ProducerRecord:
    """The dead letter for the input record ``original`` (``source``: its topic, partition
    and offset), no larger than ``max_bytes``."""
    key, value, headers = original
    topic, partition, offset = source
    kept = [(name, h) for name, h in headers or () if not name.startswith(HEADER_PREFIX)]
    labels: list[Header] = [
        (HEADER_PREFIX + "reason", error.reason.encode()),
        (HEADER_PREFIX + "message", _utf8(error.detail)[:_MESSAGE_BYTES]),
        (HEADER_PREFIX + "topic", _utf8(topic)),
        (HEADER_PREFIX + "partition", str(partition).encode()),
        (HEADER_PREFIX + "offset", str(offset).encode()),
    ]
    whole = ProducerRecord(key, value, kept + labels)
    if record_size(*whole) + _RESERVE <= max_bytes:
        return whole
    labels += [
        (HEADER_PREFIX + "truncated", b"true"),
        (HEADER_PREFIX + "original_size", str(record_size(*original)).encode()),
        (HEADER_PREFIX + "original_value_sha256", hashlib.sha256(value or b"").hexdigest()),
    ]
    room = max(0, max_bytes - _RESERVE - record_size(None, None, labels))
    short_key = None if key is None else key[: room // 4]
    room -= len(short_key or b"")
    short_headers: list[Header] = []
    for name, header in kept:
        cost = record_size(None, None, [(name, header)])
        if cost <= room // 2:
            short_headers.append((name, header))
            room -= cost
    short_value = None if value is None else value[:room]
    return ProducerRecord(short_key, short_value, short_headers + labels)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "backslashreplace")
