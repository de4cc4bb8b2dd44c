"""The baseline: ``enricher run`` from another git revision, measured in the same interleaved
runs as the working tree's (``python -m bench --baseline REV``).

The revision is checked out with ``git worktree add --detach`` into a temporary folder that
is removed at the end, whatever happens. Its service runs on the same interpreter and
virtualenv as ``python -P -m enricher run`` with ``PYTHONPATH`` set to that folder: ``-P``
keeps the working directory (this checkout) off ``sys.path``, so ``enricher`` is imported
from the revision. It gets the settings every ``enricher run`` of the benchmark gets; a
revision that does not know one of them refuses to start, and the benchmark stops with its
log.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, BenchError, clean_environment, say

COMMAND_TIMEOUT_SECONDS = 120.0
INTERPRETER = [sys.executable, "-P"]
"""the interpreter as the baseline's service runs on it (``-P``: not this checkout first)"""


@dataclass(frozen=True)
class Checkout:
    """The baseline revision, checked out."""

    revision: str  # as given
    commit: str
    path: Path

    def environment(self) -> dict[str, str]:
        """What a process needs in its environment to import ``enricher`` from here."""
        return {"PYTHONPATH": str(self.path)}


def git(*args: str) -> str:
    """``git`` in this checkout; its standard output, stripped."""
    done = subprocess.run(
        ["git", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def checkout(revision: str) -> Iterator[Checkout]:
    """``revision`` in a worktree of its own for as long as the context lasts."""
    commit = git("rev-parse", "--verify", "--end-of-options", f"{revision}^{{commit}}")
    folder = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    path = folder / "worktree"
    try:
        say(f"baseline: checking out {revision} ({commit[:12]}) in {path}")
        git("worktree", "add", "--detach", str(path), commit)
        checked_out = Checkout(revision, commit, path)
        check_imports(checked_out)
        yield checked_out
    finally:
        remove(path, folder)


def check_imports(checked_out: Checkout) -> None:
    """Make sure the baseline's service imports ``enricher`` from its worktree, not from here
    (the virtualenv's editable install of this checkout must come after it)."""
    probe = [*INTERPRETER, "-c", "import enricher; print(enricher.__file__)"]
    path = checked_out.path
    done = subprocess.run(
        probe,
        env={**clean_environment(), **checked_out.environment()},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    found = Path(done.stdout.strip())
    if done.returncode != 0 or not found.is_relative_to(path):
        raise BenchError(
            f"baseline: enricher is imported from {found} instead of {path}: {done.stderr}"
        )


def remove(path: Path, folder: Path) -> None:
    """Remove the worktree and its folder; a failure is reported, not raised."""
    if path.exists():
        try:
            git("worktree", "remove", "--force", str(path))
        except BenchError as error:
            say(str(error))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        git("worktree", "prune")
    except BenchError as error:
        say(str(error))
