"""What every part of the benchmark shares: paths, progress lines, the one error type."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARTED = time.monotonic()


class BenchError(Exception):
    """The benchmark cannot go on; the message says why (and shows a log tail if any)."""


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"bench [{time.monotonic() - STARTED:6.1f}s]: {message}", file=sys.stderr, flush=True)


def clean_environment() -> dict[str, str]:
    """This process's environment without ``ENRICHER_*``: children get only what they are told."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ENRICHER_")}
