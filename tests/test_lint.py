"""The tree is lint-clean, formatted and type-checked, with the settings in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from support import REPO


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"`{' '.join(map(str, result.args[2:]))}` exited {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}"
    )


def mypy_paths() -> list[str]:
    """pyproject's ``files``, without those that do not exist (yet) or hold no Python."""
    document = tomllib.loads((REPO / "pyproject.toml").read_text())
    files: list[str] = document["tool"]["mypy"]["files"]
    present = [
        name for name in files if (REPO / name).is_file() or any((REPO / name).rglob("*.py"))
    ]
    assert "enricher" in present
    assert "tests" in present
    return present


def test_ruff_check() -> None:
    assert_clean(run("ruff", "check", "."))


def test_ruff_format() -> None:
    assert_clean(run("ruff", "format", "--check", "."))


def test_mypy() -> None:
    result = run("mypy", *mypy_paths())
    assert_clean(result)
    assert "Success" in result.stdout


def test_mypy_on_the_ops_scripts() -> None:
    scripts = [str(REPO / "ops" / name) for name in ("devstack", "demo")]
    result = run("mypy", "--strict", "--scripts-are-modules", *scripts)
    assert_clean(result)
    assert "Success" in result.stdout
