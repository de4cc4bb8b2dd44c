"""Hostile input through file mode (``enricher batch``, in-process): whatever a line holds,
the run never raises, every line ends up in exactly one of the output and the errors file
(or is counted blank), every output line is strict JSON whose contexts are strict JSON too,
and each line gets the answer the streaming service gives the same key and value.

The lines are generated (derandomized, a fixed number of examples): keys empty, missing, of
the wrong type, huge, with lone surrogates (escaped or as CESU-8 bytes) or bytes that are not
UTF-8; events not objects, fields missing or of the wrong type, bad timestamps and ids, and
contexts and self-describing events nested around the depth limit, with ``NaN``,
``Infinity``, ``1e400``, big integers, floats, surrogate escapes, CESU-8, huge strings and
bad base64 (``tests/hostile.py``). ``tests/integration/test_fuzz_service.py`` sends the same
kind of records through a live ``enricher run``.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Any

import fastavro
import pytest
from hostile import (
    FUZZ,
    MARKER,
    Line,
    check_contexts,
    enriched,
    expected_answer,
    files,
    read_errors,
    strict_json,
)
from hypothesis import given, settings
from support import event_id

from enricher.codecs import tracker
from enricher.ids import IdDeriver


@FUZZ
@given(files)
def test_hostile_lines_through_enricher_batch(lines_: tuple[Line, ...]) -> None:
    with enriched(lines_, "out.jsonl") as (target, summary):
        errors = read_errors(target)
        published: dict[int, dict[str, Any]] = {}
        with target.open("rb") as stream:
            for text in stream:
                record = strict_json(text)
                event = record["event"]
                position = int(event[MARKER])
                assert position not in published
                published[position] = event
                check_contexts(event)
        blank = {n for n, line in enumerate(lines_, 1) if line.blank}
        # Every line in exactly one place.
        assert not set(published) & set(errors)
        assert set(published) | set(errors) | blank == set(range(1, len(lines_) + 1))
        assert not (set(published) | set(errors)) & blank
        assert (summary.events, summary.errors, summary.blank) == (
            len(published),
            len(errors),
            len(blank),
        )
        # The answer the service gives the same key and value.
        for n, line in enumerate(lines_, 1):
            if line.value is None:
                continue
            got = errors[n]["reason"] if n in errors else None
            assert got == expected_answer(line), (n, line.data[:300], errors.get(n))


@settings(FUZZ, max_examples=25)
@given(files)
def test_hostile_lines_to_avro(lines_: tuple[Line, ...]) -> None:
    """The same to an Avro file: every string Unicode, the file readable to its end."""
    with enriched(lines_, "out.avro") as (target, summary):
        errors = read_errors(target)
        with target.open("rb") as stream:
            records = list(fastavro.reader(stream))
        assert len(records) == summary.events
        for record in records:
            assert isinstance(record, dict)
            check_contexts(record["event"]["payload"])
            assert record["event"]["client_session"] is not None
        non_blank = sum(not line.blank for line in lines_)
        assert summary.events + len(errors) == non_blank


@pytest.mark.parametrize("device", ["k\udc00", "\ud83d", "k\ud800\udc00", "plain ✓"])
def test_ids_are_derived_for_any_text(device: str) -> None:
    """Decoding refuses such keys; the ids would not fail on one anyway, and text that is
    Unicode keeps the ids it always had."""
    ids = IdDeriver("salt")
    assert ids.user_id(device) != ids.user_id(device + "x")
    assert ids.session_id(device, 1, event_id(1)) != ids.session_id(device, 2, event_id(1))
    if tracker.is_unicode(device):
        digest = bytearray(hmac.new(b"salt", f"user\x1f{device}".encode(), "sha256").digest())
        digest[6] = (digest[6] & 0x0F) | 0x40
        digest[8] = (digest[8] & 0x3F) | 0x80
        assert ids.user_id(device) == str(uuid.UUID(bytes=bytes(digest[:16])))
