"""Dead letters: labelled, never larger than the limit, and never spoofed by the input."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enricher.deadletter import HEADER_PREFIX, ProducerRecord, dead_letter, record_size
from enricher.enrich import check_not_ahead
from enricher.entities import iso_millis
from enricher.errors import BadInput

SOURCE = ("events.raw", 3, 1234)
ERROR = BadInput("not_json", "expected a JSON object")


def labels(record: ProducerRecord) -> dict[str, bytes | str | None]:
    return {
        name[len(HEADER_PREFIX) :]: value
        for name, value in record.headers
        if name.startswith(HEADER_PREFIX)
    }


def test_a_dead_letter_keeps_the_record_and_adds_the_labels_after_its_headers() -> None:
    original = ProducerRecord(b"device", b"{bad", [("origin", b"collector-7"), ("empty", None)])
    letter = dead_letter(original, ERROR, SOURCE, 900_000)
    assert (letter.key, letter.value) == (b"device", b"{bad")
    assert letter.headers[:2] == original.headers
    assert labels(letter) == {
        "reason": b"not_json",
        "message": b"expected a JSON object",
        "topic": b"events.raw",
        "partition": b"3",
        "offset": b"1234",
    }


def test_error_headers_the_input_carries_are_dropped() -> None:
    spoofed = [
        (HEADER_PREFIX + "reason", b"spoofed"),
        ("origin", b"collector-7"),
        (HEADER_PREFIX + "offset", b"0"),
    ]
    letter = dead_letter(ProducerRecord(b"k", b"v", spoofed), ERROR, SOURCE, 900_000)
    names = [name for name, _ in letter.headers]
    assert names.count(HEADER_PREFIX + "reason") == 1
    assert names.count(HEADER_PREFIX + "offset") == 1
    assert labels(letter)["reason"] == b"not_json"
    assert labels(letter)["offset"] == b"1234"
    assert letter.headers[0] == ("origin", b"collector-7")


def test_a_record_too_large_for_its_dead_letter_is_truncated_and_identified() -> None:
    value = b"x" * 999_950
    original = ProducerRecord(b"p", value, [("origin", b"collector-1")])
    letter = dead_letter(original, BadInput("oversize", "too big"), SOURCE, 900_000)
    assert record_size(*letter) <= 900_000
    assert value.startswith(letter.value or b"")
    found = labels(letter)
    assert found["truncated"] == b"true"
    assert found["original_size"] == str(record_size(*original)).encode()
    assert found["original_value_sha256"] == hashlib.sha256(value).hexdigest()
    assert found["reason"] == b"oversize"


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    key=st.one_of(st.none(), st.binary(max_size=3000)),
    value=st.one_of(st.none(), st.binary(max_size=6000)),
    headers=st.lists(
        st.tuples(st.text(max_size=40), st.one_of(st.none(), st.binary(max_size=2000))),
        max_size=8,
    ),
    detail=st.text(max_size=3000),
    limit=st.integers(min_value=2048, max_value=12_000),
)
def test_every_dead_letter_fits_its_limit(
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]],
    detail: str,
    limit: int,
) -> None:
    letter = dead_letter(
        ProducerRecord(key, value, list(headers)), BadInput("not_json", detail), SOURCE, limit
    )
    assert record_size(*letter) <= limit
    assert labels(letter)["reason"] == b"not_json"
    if labels(letter).get("truncated") is None:
        assert (letter.key, letter.value) == (key, value)


def test_an_event_far_ahead_of_its_kafka_timestamp_is_refused() -> None:
    kafka_ms = 1_767_225_600_000
    check_not_ahead(kafka_ms + 86_400_000, kafka_ms, 86_400_000)
    check_not_ahead(253_402_300_799_999, 0, 86_400_000)  # no timestamp: not checked
    with pytest.raises(BadInput) as refused:
        check_not_ahead(kafka_ms + 86_400_001, kafka_ms, 86_400_000)
    assert refused.value.reason == "future_timestamp"
    with pytest.raises(BadInput):
        check_not_ahead(253_402_300_799_999, kafka_ms, 86_400_000)


@pytest.mark.parametrize(
    ("time_ms", "expected"),
    [
        # What JavaScript's Date.prototype.toISOString() prints for each.
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        (253_402_300_800_000, "+010000-01-01T00:00:00.000Z"),
        (253_404_892_800_000, "+010000-01-31T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (-62_167_219_200_001, "-000001-12-31T23:59:59.999Z"),
    ],
)
def test_every_time_is_formattable_as_javascript_does(time_ms: int, expected: str) -> None:
    assert iso_millis(time_ms) == expected
