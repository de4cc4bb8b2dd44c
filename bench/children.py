"""The processes the benchmark starts: their logs, their CPU time, and stopping every one.

A :class:`Child` is the process manager that the integration tests use too
(ops/stacklib/children.py), with the benchmark's stop and failure reports."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.common import REPO, BenchError, say

if str(REPO / "ops") not in sys.path:
    sys.path.insert(0, str(REPO / "ops"))  # for ops/stacklib

from stacklib import children as shared

cpu_seconds = shared.cpu_seconds
STOP_GRACE_SECONDS = 30.0
TAIL_LINES = 30


class Child(shared.Child):
    """One subprocess in its own session (a Ctrl-C reaches the benchmark only, which then
    stops it), with stdout and stderr in a log file; started at once."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        super().__init__(name, argv, env, log_path, cwd=REPO)
        self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after the grace period."""
        if not self.running:
            return
        if self.terminate(STOP_GRACE_SECONDS) is None:
            say(f"{self.name} ignored SIGTERM for {STOP_GRACE_SECONDS:.0f}s: killing it")
            self.kill(timeout=None)

    def failure(self, what: str) -> BenchError:
        state = "running" if self.running else f"exit code {self.returncode}"
        return BenchError(f"{self.name} {what} ({state})\n{self.tail(TAIL_LINES)}")


class Children:
    """Every process the benchmark started, so that all of them are stopped at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        child = Child(name, argv, env, self.log_dir / f"{name}.log")
        self.started.append(child)
        return child

    def stop_all(self) -> None:
        for child in self.started:
            if child.running:
                say(f"stopping {child.name} (pid {child.pid})")
                child.stop()
