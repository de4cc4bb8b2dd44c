"""The output oracle: the fault-free reference output, and the exactly-once check against it.

- :class:`BatchReference`: the fault-free reference, ``python -m enricher batch`` on the same
  input (started in the background), as :class:`Expected` records by event id;
- :func:`check_output`: exactly once and equal to the reference (bytes, client_session
  entities, keys, headers, partitions);
- :func:`read_all`: everything committed to the output and dead-letter topics;
- :func:`client_session`: the client_session entity in an event.

(PYTEST_DONT_REWRITE: like ``instances``, test modules import this module; its asserts are
plain asserts.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feeding import Item, Sent
from service_settings import BACKGROUND_TIMEOUT, FOREGROUND_TIMEOUT, REPO, SALT
from stack import Record, Stack, TopicSet

from enricher.codecs import tracker
from enricher.entities import CLIENT_SESSION_SCHEMA


@dataclass(frozen=True)
class Expected:
    """What ``enricher batch`` wrote for one event."""

    key: str
    event: dict[str, str]

    @property
    def value(self) -> bytes:
        data: bytes = tracker.dump(self.event)
        return data


class BatchReference:
    """``python -m enricher batch`` on the good input, started in the background."""

    def __init__(self, items: Sequence[Item], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.source = workdir / f"reference-{uuid.uuid4().hex[:8]}.jsonl"
        self.target = self.source.with_suffix(".out.jsonl")
        with self.source.open("wb") as out:
            for key, event in items:
                out.write(tracker.dump({"key": key, "event": event}) + b"\n")
        self.count = len(items)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICHER_")}
        argv = [
            sys.executable, "-m", "enricher", "batch",
            "--input", str(self.source), "--output", str(self.target),
            "--foreground-timeout", str(FOREGROUND_TIMEOUT),
            "--background-timeout", str(BACKGROUND_TIMEOUT),
            "--salt", SALT,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._result: dict[str, Expected] | None = None

    def result(self, timeout: float = 120.0) -> dict[str, Expected]:
        """The reference output by event id."""
        if self._result is None:
            output, _ = self.proc.communicate(timeout=timeout)
            assert self.proc.returncode == 0, f"enricher batch failed: {output.decode()}"
            expected: dict[str, Expected] = {}
            with self.target.open("rb") as lines:
                for line in lines:
                    record = json.loads(line)
                    event = record["event"]
                    expected[event["eid"]] = Expected(record["key"], event)
            errors = self.target.with_name(self.target.name + ".errors.jsonl").read_text()
            assert not errors, f"enricher batch rejected reference input:\n{errors[:2000]}"
            assert len(expected) == self.count, f"batch wrote {len(expected)} of {self.count}"
            self._result = expected
        return self._result


def client_session(event: Mapping[str, str]) -> Any:
    """The client_session entity's data in an event's ``co`` contexts (None if absent)."""
    contexts = json.loads(event.get("co", "null") or "null")
    for entity in (contexts or {}).get("data", []):
        if entity.get("schema") == CLIENT_SESSION_SCHEMA:
            return entity.get("data")
    return None


def check_output(
    output: Sequence[Record],
    expected: Mapping[str, Expected],
    sent: Sequence[Sent],
) -> None:
    """Exactly once, and equal to the reference: every expected event appears once in
    ``output`` with the reference's bytes, the input's key, headers, partition and
    timestamp."""
    by_eid: dict[str, Sent] = {}
    for source in sent:
        try:
            by_eid[json.loads(source.value or b"")["eid"]] = source
        except (ValueError, KeyError, TypeError):
            continue
    events: dict[str, tuple[Record, dict[str, str]]] = {}
    counts: Counter[str] = Counter()
    places: dict[str, list[tuple[int, int]]] = {}
    """eid -> (partition, offset) of each copy in the output"""
    unreadable = []
    for record in output:
        try:
            event = json.loads(record.value or b"")
            eid = event["eid"]
        except (ValueError, KeyError, TypeError):
            unreadable.append(record)
            continue
        counts[eid] += 1
        places.setdefault(eid, []).append((record.partition, record.offset))
        events[eid] = (record, event)
    duplicates = {eid: n for eid, n in counts.items() if n > 1}
    missing = sorted(set(expected) - set(events))
    unexpected = sorted(set(events) - set(expected))
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable output records, e.g. {unreadable[:2]}")
    if duplicates:
        problems.append(
            f"{len(duplicates)} events published more than once "
            f"({sum(duplicates.values()) - len(duplicates)} extra copies), "
            f"e.g. {[(eid, places[eid]) for eid in list(duplicates)[:3]]} ((partition, offset)"
            f" of each copy); extra copies per output partition: "
            f"{sorted(Counter(p for eid in duplicates for p, _ in places[eid][1:]).items())}"
        )
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} events missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected events, e.g. {unexpected[:3]}")

    lists: list[list[str]] = [[] for _ in range(7)]
    sessions, events_differ, bytes_differ, keys, headers, partitions, timestamps = lists
    for eid, (record, event) in events.items():
        want = expected.get(eid)
        if want is None:
            continue
        got_session, want_session = client_session(event), client_session(want.event)
        if got_session != want_session:
            sessions.append(
                f"  {want.key} {eid}:\n    got      {got_session}\n    expected {want_session}"
            )
        elif event != want.event:
            events_differ.append(f"  {eid}:\n    got      {event}\n    expected {want.event}")
        elif record.value != want.value:
            bytes_differ.append(
                f"  {eid}:\n    got      {record.value!r}\n    expected {want.value!r}"
            )
        if record.key != want.key.encode():
            keys.append(f"  {eid}: got {record.key!r}, expected {want.key!r}")
        origin = by_eid.get(eid)
        if origin is not None and record.headers != origin.headers:
            headers.append(f"  {eid}: got {record.headers}, expected {origin.headers}")
        if origin is not None and record.partition != origin.partition:
            partitions.append(f"  {eid}: got {record.partition}, input {origin.partition}")
        if origin is not None and record.timestamp_ms != origin.timestamp_ms:
            timestamps.append(f"  {eid}: got {record.timestamp_ms}, input {origin.timestamp_ms}")
    for label, found in (
        ("client_session entities differ from the reference", sessions),
        ("output events differ from the reference", events_differ),
        ("output bytes differ from the reference", bytes_differ),
        ("keys differ from the input", keys),
        ("headers differ from the input", headers),
        ("output partitions differ from the input partitions", partitions),
        ("output timestamps differ from the input timestamps", timestamps),
    ):
        if found:
            problems.append(f"{len(found)} {label}, e.g.\n" + "\n".join(found[:3]))
    if problems:
        raise AssertionError(
            "output is not the reference exactly once:\n- " + "\n- ".join(problems)
        )


def read_all(stack: Stack, topics: TopicSet) -> tuple[list[Record], list[Record]]:
    """Everything committed to the output and dead-letter topics: (output, dead letters)."""
    records = stack.read_committed([topics.output, topics.dlq], timeout=120)
    return (
        [r for r in records if r.topic == topics.output],
        [r for r in records if r.topic == topics.dlq],
    )
