"""The processes the benchmark starts: their logs, their CPU time, and stopping every one."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.common import REPO, BenchError, say

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE_SECONDS = 30.0
TAIL_LINES = 30


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, all its threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), utime and stime; fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Child:
    """One subprocess in its own session (a Ctrl-C reaches the benchmark only, which then
    stops it), with stdout and stderr in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def wait_with_usage(self) -> tuple[int, float]:
        """Wait for the exit: (exit code, CPU seconds of the whole process)."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode, usage.ru_utime + usage.ru_stime

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after the grace period."""
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            say(f"{self.name} ignored SIGTERM for {STOP_GRACE_SECONDS:.0f}s: killing it")
            self.proc.kill()
            self.proc.wait()

    def tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        return f"--- last lines of {self.log_path}\n" + "\n".join(lines)

    def failure(self, what: str) -> BenchError:
        state = "running" if self.running else f"exit code {self.proc.returncode}"
        return BenchError(f"{self.name} {what} ({state})\n{self.tail()}")


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
                say(f"stopping {child.name} (pid {child.proc.pid})")
                child.stop()
