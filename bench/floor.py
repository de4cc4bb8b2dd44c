"""The codec floor of batch mode: what reading and writing the same file costs with no rules.

``python -m bench.floor --input IN --output OUT`` reads the JSON Lines file ``enricher batch``
reads (``{"key": ..., "event": {...}}`` per line), and for each line decodes it with orjson,
appends one ``client_session``-shaped entity to the event's ``co`` (parsing the contexts
already there, if any), and writes the line again with orjson: the same library, the same
input and output shapes and the same output buffer as ``enricher batch``, no validation, no
session state, no Kafka. It prints ``events=N`` like ``enricher batch``. Batch mode is
reported against it: whatever ``enricher batch`` spends beyond this is its own cost.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from enricher.batch import WRITE_BUFFER_BYTES

CONTEXTS_SCHEMA = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0"
CLIENT_SESSION_SCHEMA = "iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-2"
USER_ID = "0b2f2d4c-6f7e-4a51-9a55-2f1c8f0d6a11"
SESSION_ID = "5a7d0f3e-1c2b-4e8f-8d6a-3b9c0e1f2a44"


def relay(source: Path, target: Path) -> int:
    """Every line of ``source`` with one entity added to its contexts; returns the events."""
    events = 0
    loads, dumps = orjson.loads, orjson.dumps
    with source.open("rb") as lines, target.open("wb", buffering=WRITE_BUFFER_BYTES) as out:
        for line in lines:
            if not line.strip():
                continue
            record = loads(line)
            event = record["event"]
            events += 1
            entity = {
                "schema": CLIENT_SESSION_SCHEMA,
                "data": {
                    "userId": USER_ID,
                    "sessionId": SESSION_ID,
                    "sessionIndex": 1,
                    "previousSessionId": None,
                    "storageMechanism": "LOCAL_STORAGE",
                    "eventIndex": events,
                    "firstEventId": event.get("eid"),
                    "firstEventTimestamp": "2026-01-01T00:00:00.000Z",
                },
            }
            contexts = loads(event["co"])["data"] if "co" in event else []
            contexts.append(entity)
            event["co"] = dumps({"schema": CONTEXTS_SCHEMA, "data": contexts}).decode()
            out.write(dumps({"key": record["key"], "event": event}) + b"\n")
    return events


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"events={relay(args.input, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
