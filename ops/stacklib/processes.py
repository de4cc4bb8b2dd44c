"""The services' processes: started detached with a pid file, stopped by signal, found again by
later runs of ops/devstack; and the formatting of Kafka's storage before the first start.

A process counts as the stack's own only if its pid file says so and its working folder is
inside the service's folder, so nothing else is ever signalled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from stacklib.common import HOST, KAFKA_LIBS, DevstackError, log
from stacklib.install import java, redis_server
from stacklib.layout import Service, Stack

# Small and quick to start on a 2-core box; benchmarks may want e.g. "-Xmx2g -XX:+UseG1GC".
KAFKA_JVM_OPTS = os.environ.get(
    "ENRICHER_DEVSTACK_KAFKA_JVM_OPTS", "-Xms256m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
).split()
STOP_GRACE_SECONDS = 3.0


def running_pid(service: Service) -> int | None:
    """The pid of the service's process if it runs; a pid is ours only if its cwd is our home."""
    try:
        pid = int(service.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if is_running(pid, service.home) else None


def is_running(pid: int, home: Path) -> bool:
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cwd = (proc / "cwd").readlink()
    except (OSError, IndexError):
        return False
    return state not in {"Z", "X"} and (cwd == home or home in cwd.parents)


def launch(service: Service, argv: Sequence[str], workdir: Path) -> None:
    with (service.home / "stdout.log").open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service.pid_file.write_text(f"{proc.pid}\n")


def start_service(service: Service) -> None:
    log(f"starting {service.name} on {HOST}:{service.port}")
    if service.kind == "kafka":
        argv = [
            java(),
            *KAFKA_JVM_OPTS,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={service.home / 'log4j2.properties'}",
            "-cp",
            f"{KAFKA_LIBS}/*",
            "kafka.Kafka",
            str(service.config),
        ]
        launch(service, argv, service.home)
    else:
        (service.home / "data").mkdir(exist_ok=True)
        launch(service, [redis_server(), str(service.config)], service.home / "data")


def stop_services(services: Sequence[Service], sig: signal.Signals, grace: float) -> None:
    """Signal the services' processes, then SIGKILL whatever is still there after `grace`."""
    pids = {s.name: (pid, s) for s in services if (pid := running_pid(s)) is not None}
    for name, (pid, _) in pids.items():
        log(f"stopping {name} (pid {pid}, {sig.name})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    alive = wait_exited(pids, grace)
    if alive:
        for name, (pid, _) in alive.items():
            log(f"{name} (pid {pid}) did not stop within {grace:.0f}s; sending SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if wait_exited(alive, 10.0):
            raise DevstackError(f"could not stop {', '.join(alive)}")
    for _, service in pids.values():
        service.pid_file.unlink(missing_ok=True)


def wait_exited(
    pids: dict[str, tuple[int, Service]], seconds: float
) -> dict[str, tuple[int, Service]]:
    """Poll until the processes are gone or `seconds` pass; return those still running."""
    deadline = time.monotonic() + seconds
    while True:
        alive = {n: (p, s) for n, (p, s) in pids.items() if is_running(p, s.home)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


Formatting = list[tuple[Service, "subprocess.Popen[str]"]]


def start_formatting(stack: Stack) -> Formatting:
    """Format every node's Kafka storage, in parallel and in the background."""
    log(f"formatting Kafka storage (cluster id {stack.cluster_id})")
    formats: Formatting = []
    for service in stack.kafka:
        argv = [
            java(),
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={service.home / 'log4j2.properties'}",
            "-cp",
            f"{KAFKA_LIBS}/*",
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            stack.cluster_id,
            "--config",
            str(service.config),
        ]
        if len(stack.kafka) == 1:
            argv.append("--standalone")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        formats.append((service, proc))
    return formats


def finish_formatting(formats: Formatting) -> None:
    failures = []
    for service, proc in formats:
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"formatting {service.name}'s storage failed:\n{output}")
    if failures:
        raise DevstackError("\n".join(failures))
