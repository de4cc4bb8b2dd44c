"""Hostile tracker input for the fuzz tests, and the answers it must get.

Hypothesis strategies for JSON Lines records whose keys are empty, missing, of the wrong type,
huge, with lone surrogates (escaped or as CESU-8 bytes) or bytes that are not UTF-8, and whose
events hold every kind of bad field, nesting around the depth limit and non-finite numbers;
with what file mode and the service must answer each (enriched, or which dead-letter reason),
and the checks of strict JSON output. Used by ``tests/unit/test_fuzz.py`` (file mode) and
``tests/integration/test_fuzz_service.py`` (a live service).
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from support import (
    APPLICATION_LIFECYCLE,
    BACKGROUND,
    CLIENT_SESSION,
    CONTEXTS,
    FOREGROUND,
    SCREEN,
    SCREEN_VIEW,
    START_MS,
    UNBOUNDED,
    UNSTRUCT,
    event_id,
)

from enricher import batch
from enricher.codecs import tracker
from enricher.enrich import Enricher, EntityOptions
from enricher.errors import REASONS, BadInput
from enricher.session import SessionConfig, SessionEngine

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MARKER = "fz"  # every generated event object carries its line number here
KeyClass = Literal["ok", "missing", "invalid"]
T = TypeVar("T")

# --- JSON text, built by hand: the standard library cannot write the deepest -------------------

SURROGATES = "\ud800\udbff\udc00\udfff\ud83d"
NUMBERS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1" + "0" * 400 + ".5",
    "1.7976931348623157e308",
    "5e-324",
    "-0.0",
    "-0",
    "1E2",
    "9" * 400,
    "1" * 5000,
    str(2**64),
    str(-(2**70)),
]
DEPTHS = [1, 4, 100, tracker.MAX_DEPTH - 1, tracker.MAX_DEPTH, tracker.MAX_DEPTH + 1, 600, 1030]
HUGE_TEXT = "ä" * 20_000  # 40 kB: records stay under 100 kB for the live test


def mostly(
    good: st.SearchStrategy[T], bad: st.SearchStrategy[T], times: int = 5
) -> st.SearchStrategy[T]:
    """``good``, about ``times`` times as often as ``bad`` (in the middle of the choices:
    Hypothesis favours the first and the last)."""
    choices = [True] * (times // 2) + [False] + [True] * (times - times // 2)
    return st.sampled_from(choices).flatmap(lambda ok: good if ok else bad)


def deep(levels: int, leaf: str) -> str:
    """``levels`` arrays and objects, alternating, around ``leaf``."""
    opening = "".join("[" if level % 2 else '{"k":' for level in range(levels))
    closing = "".join("]" if level % 2 else "}" for level in reversed(range(levels)))
    return opening + leaf + closing


def string_text(text: str, ascii_only: bool) -> str:
    """A JSON string; a lone surrogate as an escape, or (not ASCII) as the character."""
    return json.dumps(text, ensure_ascii=ascii_only)


texts = mostly(
    st.text(max_size=6),
    st.text(st.sampled_from('aé✓😀\\"\n\x00' + SURROGATES), max_size=5) | st.just(HUGE_TEXT),
    times=2,
)
json_strings = st.builds(string_text, texts, st.booleans())
leaves = st.one_of(
    json_strings,
    json_strings,
    st.sampled_from(NUMBERS),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "false", "null"]),
)
json_texts = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(st.tuples(json_strings, inner), max_size=3).map(
            lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
        )
    ),
    max_leaves=6,
)


def deep_data(envelope: int) -> st.SearchStrategy[str]:
    """Data that makes a field's JSON, with its ``envelope`` levels, as deep as one of DEPTHS."""
    return st.builds(
        lambda d, leaf: deep(max(d - envelope, 0), leaf), st.sampled_from(DEPTHS), leaves
    )


schemas = st.sampled_from(
    [json.dumps(SCREEN), json.dumps(CLIENT_SESSION), '"iglu:com.acme/x/jsonschema/1-0-0"', "1"]
)
entities = st.builds(
    lambda schema, data: f'{{"schema":{schema},"data":{data}}}',
    schemas,
    mostly(json_texts, deep_data(3), times=2),
)
contexts_texts = mostly(
    st.lists(entities, max_size=3).map(
        lambda es: f'{{"schema":"{CONTEXTS}","data":[{",".join(es)}]}}'
    ),
    json_texts | st.sampled_from(["", "{", "[]", "null", '{"schema":"x","data":{}}']),
)
ue_schemas = st.sampled_from(
    [json.dumps(BACKGROUND), json.dumps(FOREGROUND), json.dumps(SCREEN_VIEW), "1"]
)
ue_texts = mostly(
    st.builds(
        lambda schema, data: (
            f'{{"schema":"{UNSTRUCT}","data":{{"schema":{schema},"data":{data}}}}}'
        ),
        ue_schemas,
        mostly(json_texts, deep_data(2), times=2),
    ),
    json_texts,
)


def b64url(text: str) -> str:
    # surrogatepass: a lone surrogate becomes CESU-8 bytes inside the base64.
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


BAD_BASE64 = st.sampled_from(["!!!", "a", "ab cd", "====", "%%%", "\u00e9"])


# --- events and lines as bytes ---------------------------------------------------------------


def token(text: str, ascii_only: bool) -> bytes:
    """A JSON string token as bytes; a lone surrogate as an escape or as CESU-8 bytes."""
    return json.dumps(text, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def string_tokens(values: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return st.builds(token, values, st.booleans())


RAW_STRINGS = [b'"a\xff"', b'"\xc3"', b'"\xed\xa0\x80"', b'"x\xed\xb0\x80y"', b'"\xf4\x90\x80\x80"']
WRONG_TYPES = [b"null", b"1", b"1.5", b"true", b"[]", b"{}", b'["x"]', b"NaN", b"-1e400"]
times = st.integers(min_value=START_MS, max_value=START_MS + 86_400_000).map(str)
bad_times = st.sampled_from(["", "-1", "abc", "1.5", "9" * 16, "253402300800000", "\uff11", " 1"])
eids = st.integers(min_value=1, max_value=2**32).map(event_id)
bad_eids = st.sampled_from(["", "not-a-uuid", event_id(5).upper(), event_id(5) + "0", "\ud800"])


def field_values(good: st.SearchStrategy[str]) -> st.SearchStrategy[bytes | None]:
    """A field's value token: mostly ``good``, else hostile; None leaves the field out."""
    return mostly(
        string_tokens(good), st.none() | st.sampled_from(RAW_STRINGS + WRONG_TYPES), times=12
    )


@st.composite
def event_fields(draw: st.DrawFn) -> dict[str, bytes]:
    fields: dict[str, bytes | None] = {
        "e": draw(field_values(st.sampled_from(["ue", "se", "pv", "ue"]))),
        "eid": draw(field_values(mostly(eids, bad_eids, times=12))),
        "dtm": draw(field_values(mostly(times, bad_times, times=12))),
        "stm": draw(st.none() | string_tokens(mostly(times, bad_times))),
    }
    if draw(st.booleans()):
        fields["co"] = draw(field_values(contexts_texts))
    if draw(st.booleans()):
        fields["cx"] = draw(field_values(mostly(contexts_texts.map(b64url), BAD_BASE64)))
    if draw(st.booleans()):
        fields["ue_pr"] = draw(field_values(ue_texts))
    elif draw(st.booleans()):
        fields["ue_px"] = draw(field_values(mostly(ue_texts.map(b64url), BAD_BASE64)))
    names = mostly(
        st.sampled_from(["aid", "p", "ti", "url", "x"]), texts.filter(lambda t: t != MARKER)
    )
    for name in draw(st.lists(names, max_size=2)):
        fields.setdefault(name, draw(field_values(texts)))
    return {name: value for name, value in fields.items() if value is not None}


OTHER_VALUES = [
    b"[]",
    b'"text"',
    b"null",
    b"5",
    b"NaN",
    b"",
    b"{",
    b'{"eid":',
    b"[" * 50_000,
    b"[" * 500 + b"]" * 500,
    b'"\xff"',
    b'["\xed\xa0\x80"]',
]


def event_value(number: int) -> st.SearchStrategy[bytes]:
    """A record's value: mostly an object of fields (the first, MARKER, holds ``number``)."""
    marker = token(MARKER, True) + b":" + token(str(number), True)
    objects = event_fields().map(
        lambda fields: (
            b"{"
            + b",".join([marker, *(token(n, True) + b":" + v for n, v in fields.items())])
            + b"}"
        )
    )
    return mostly(objects, st.sampled_from(OTHER_VALUES), times=9)


@dataclass(frozen=True)
class Line:
    """One generated line; for records, the key's class and the value as a Kafka record's."""

    data: bytes
    key_class: KeyClass | None = None
    value: bytes | None = None

    @property
    def blank(self) -> bool:
        return not self.data.strip()


KEYS: list[tuple[KeyClass, bytes | None]] = [
    ("missing", None),
    ("missing", b'""'),
    ("missing", b"5"),
    ("missing", b"null"),
    ("missing", b'["k"]'),
    ("invalid", b'"k\\udc00"'),
    ("invalid", b'"\\ud83d"'),
    ("invalid", b'"k\xed\xa0\x80"'),
    ("invalid", b'"k\xff"'),
    ("invalid", b'"k\xc3"'),
    ("ok", b'"' + b"k" * 30_000 + b'"'),
    ("ok", b'"device \\u00e9 \xe2\x9c\x93"'),
]


def key_of(text: str, ascii_only: bool) -> tuple[KeyClass, bytes]:
    klass: KeyClass = "ok" if text and tracker.is_unicode(text) else "invalid"
    return ("missing" if not text else klass), token(text, ascii_only)


keys = mostly(
    st.builds(key_of, st.sampled_from(["d1", "d2", "d3"]), st.just(True)),
    st.sampled_from(KEYS) | st.builds(key_of, texts, st.booleans()),
    times=6,
)


@st.composite
def lines(draw: st.DrawFn, number: int) -> Line:
    shape = draw(st.sampled_from(["record"] * 10 + ["blank", "garbage"]))
    if shape == "blank":
        return Line(draw(st.sampled_from([b"", b"  ", b"\t", b"\r", b" \r"])))
    if shape == "garbage":
        return Line(draw(st.binary(max_size=40)).replace(b"\n", b""))
    key_class, key = draw(keys)
    value = draw(event_value(number))
    data = (
        b'{"event":' + value + b"}"
        if key is None
        else b'{"key":' + key + b',"event":' + value + b"}"
    )
    return Line(data, key_class, value)


files = st.integers(min_value=1, max_value=12).flatmap(
    lambda count: st.tuples(*(lines(number) for number in range(1, count + 1)))
)


# --- what the service answers ----------------------------------------------------------------


def stream_answer(value: bytes) -> str | None:
    """The service's codec on a record's value: the dead-letter reason, None if enriched."""
    try:
        tracker.decode(value)
    except BadInput as error:
        return error.reason
    return None


def readable(value: bytes) -> bool:
    """Whether a line around ``value`` can be read far enough to find its key."""
    try:
        json.loads(value.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return False
    return True


def expected_answer(line: Line) -> str | None:
    """The service's answer for the line's key and value (a key that is not UTF-8 is
    ``invalid_key``), except that a line whose event is no JSON at all has no key to read."""
    assert line.value is not None
    if line.key_class == "missing":
        return "missing_key" if readable(line.value) else "not_json"
    if line.key_class == "invalid":
        return "invalid_key" if readable(line.value) else "not_json"
    return stream_answer(line.value)


# --- running and checking --------------------------------------------------------------------


def refuse(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def finite(text: str) -> float:
    value = float(text)
    assert math.isfinite(value), f"{text} is beyond a double"
    return value


def strict_json(text: str | bytes) -> Any:
    """JSON as RFC 8259 has it: UTF-8, no NaN or Infinity, numbers a double can hold."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text, parse_constant=refuse, parse_float=finite)


def depth_of(value: object) -> int:
    stack = [(value, 0)]
    deepest = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth + 1)
            stack.extend(
                (c, depth + 1) for c in (node.values() if isinstance(node, dict) else node)
            )
    return deepest


OURS = [CLIENT_SESSION, APPLICATION_LIFECYCLE]  # the entities the runs here attach


def check_contexts(event: dict[str, Any]) -> None:
    """An enriched event: fields of text, contexts and self-describing event strict JSON no
    deeper than the limit, our entities last in the contexts, no cx beside co."""
    assert all(isinstance(v, str) for v in event.values())
    if "co" in event:
        assert "cx" not in event  # both present: merged into co
        text = event["co"]
    else:
        padded = event["cx"] + "=" * (-len(event["cx"]) % 4)
        text = base64.urlsafe_b64decode(padded).decode("utf-8")
    contexts = strict_json(text)
    assert contexts["schema"] == CONTEXTS
    assert [e.get("schema") for e in contexts["data"][-len(OURS) :]] == OURS
    assert depth_of(contexts) <= tracker.MAX_DEPTH
    for name in ("ue_pr", "ue_px"):
        if name in event:
            raw = event[name]
            if name == "ue_px":
                raw = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8")
            assert depth_of(strict_json(raw)) <= tracker.MAX_DEPTH


@contextmanager
def enriched(lines_: tuple[Line, ...], target_name: str) -> Iterator[tuple[Path, batch.Summary]]:
    """``enricher batch`` in-process on the lines: the output file and the summary."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.jsonl", Path(folder) / target_name
        source.write_bytes(b"".join(line.data + b"\n" for line in lines_))
        enricher = Enricher(
            SessionEngine(SessionConfig(salt="s")), EntityOptions(lifecycle_context=True)
        )
        yield target, batch.run(enricher, source, target, batch.MemoryStore(), UNBOUNDED)


def read_errors(target: Path) -> dict[int, dict[str, Any]]:
    errors: dict[int, dict[str, Any]] = {}
    with target.with_name(target.name + ".errors.jsonl").open("rb") as stream:
        for text in stream:
            error = strict_json(text)
            assert error["reason"] in REASONS
            assert error["position"] not in errors
            errors[error["position"]] = error
    return errors
