"""What every part of ops/devstack shares: paths, the error type, progress lines, file locks."""

from __future__ import annotations

import contextlib
import fcntl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
POM = REPO / "ops" / "pom.xml"
CACHE = REPO / "ops" / ".cache"
KAFKA_LIBS = CACHE / "kafka"
ORACLE = REPO / "tests" / "oracle"
DEFAULT_DIR = REPO / ".devstack"
HOST = "127.0.0.1"

STARTED = time.monotonic()


class DevstackError(Exception):
    """A failure reported to the user as one clear message (exit status 1)."""


def log(message: str) -> None:
    """One progress line on stderr (stdout carries only the settings)."""
    print(f"devstack [{time.monotonic() - STARTED:5.1f}s]: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
