"""First-time installs, each skipped when already done: apt packages, Kafka's jars, npm ci.

Stdlib only: `ops/devstack install` runs on a fresh machine."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from stacklib.common import CACHE, KAFKA_LIBS, ORACLE, POM, DevstackError, locked, log

# Debian packages the project needs: the command that must exist -> the package providing it.
DEBIAN_PACKAGES = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "promtool": "prometheus",
}


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    found = str(candidate) if candidate and candidate.is_file() else shutil.which("java")
    if found is None:
        raise DevstackError(
            "Java not found: Kafka 4 needs Java 17 or newer on PATH or in JAVA_HOME "
            "(Debian: apt-get install openjdk-17-jre-headless)"
        )
    return found


def check_java() -> None:
    binary = java()
    out = subprocess.run([binary, "-version"], capture_output=True, text=True, check=False).stderr
    version = out.split('"')[1] if out.count('"') >= 2 else ""
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < 17:
        raise DevstackError(
            f"{binary} is Java {version or '(unknown version)'}; Kafka 4 needs Java 17 or newer "
            "(set JAVA_HOME or put a newer java first on PATH)"
        )


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise DevstackError("redis-server not found; run `ops/devstack install`")
    return found


def redis_cli() -> str:
    return shutil.which("redis-cli") or "redis-cli"


def run_install_step(argv: Sequence[str], cwd: Path | None = None) -> bool:
    """Run a slow install command with its output on stderr (stdout carries only settings)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return (
        subprocess.run(
            argv,
            cwd=cwd,
            stdout=sys.stderr.fileno(),
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        ).returncode
        == 0
    )


def ensure_debian_packages() -> None:
    missing = sorted({pkg for cmd, pkg in DEBIAN_PACKAGES.items() if not shutil.which(cmd)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise DevstackError(
            f"missing {', '.join(missing)}; install with: sudo apt-get install {' '.join(missing)}"
        )
    log(f"installing {', '.join(missing)} with apt-get")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if not run_install_step(install):
        log("apt-get install failed; running apt-get update and trying again")
        if not (run_install_step(["apt-get", "update", "-q"]) and run_install_step(install)):
            raise DevstackError(f"apt-get install {' '.join(missing)} failed (see above)")
    if "prometheus" in missing:
        # The package starts a Prometheus server where an init system runs; the project only
        # wants its promtool.
        run_install_step(["invoke-rc.d", "prometheus", "stop"])


def pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def ensure_kafka_libs() -> None:
    marker = KAFKA_LIBS / ".pom.sha256"
    if marker.is_file() and marker.read_text().strip() == pom_digest():
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevstackError(
            "Maven (mvn) not found; it resolves Kafka's jars (apt-get install maven)"
        )
    log(f"resolving Kafka's jars from Maven Central into {KAFKA_LIBS}")
    staging = CACHE / f"kafka.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    argv = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
    ]
    if not run_install_step(argv):
        shutil.rmtree(staging, ignore_errors=True)
        raise DevstackError(
            f"Maven could not resolve the jars listed in {POM} (see the output above)"
        )
    (staging / ".pom.sha256").write_text(pom_digest() + "\n")
    shutil.rmtree(KAFKA_LIBS, ignore_errors=True)
    staging.rename(KAFKA_LIBS)


def ensure_oracle_deps() -> None:
    if not (ORACLE / "package.json").is_file() or (ORACLE / "node_modules").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise DevstackError(f"npm not found; it installs {ORACLE}'s packages")
    log(f"installing {ORACLE}'s npm packages (npm ci)")
    if not run_install_step([npm, "ci", "--no-audit", "--no-fund", "--legacy-peer-deps"], ORACLE):
        raise DevstackError(f"npm ci failed in {ORACLE} (see the output above)")


def install() -> None:
    with locked(CACHE / "install.lock"):
        check_java()
        ensure_debian_packages()
        ensure_kafka_libs()
        ensure_oracle_deps()
