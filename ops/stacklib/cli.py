"""Local stack for the session enricher: Apache Kafka (KRaft) and Redis on loopback, no containers.

    eval "$(ops/devstack up)"        # start (or re-print the settings of) the stack in .devstack/
    ops/devstack status              # which services run and answer
    ops/devstack down                # stop what `up` started, remove its data
    ops/devstack install             # first-time installs only (CI runs this first)
    ops/devstack kill-broker 2       # chaos helpers for `up --brokers 3`
    ops/devstack start-broker 2
    ops/devstack redis-snapshot F    # Redis chaos helpers (one Redis, not a cluster)
    ops/devstack kill-redis
    ops/devstack start-redis [--from-snapshot F | --truncate-aof BYTES]

`up` prints the connection settings as KEY=value lines on stdout and nothing else; progress and
errors go to stderr. See docs/devstack.md for ports, layout and troubleshooting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from stacklib.common import DEFAULT_DIR, HOST, DevstackError, locked, log
from stacklib.configs import prepare_fresh
from stacklib.install import install
from stacklib.layout import (
    MAX_BROKERS,
    REDIS_CLUSTER_NODES,
    Service,
    Shape,
    Stack,
    load_stack,
    new_cluster_id,
)
from stacklib.ports import (
    AUTO_PORT_BASES,
    DEFAULT_PORT_BASE,
    check_ports_free,
    claim_port_base,
    release_port_base,
)
from stacklib.processes import (
    STOP_GRACE_SECONDS,
    Formatting,
    finish_formatting,
    running_pid,
    start_formatting,
    start_service,
    stop_services,
)


@contextlib.contextmanager
def needs_clients() -> Iterator[None]:
    """Around the import of stacklib.probes, which only the commands that talk to a running
    stack import: it needs confluent-kafka and redis-py, and `install` works with the standard
    library only."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise DevstackError(
            f"{exc.name} is missing: ops/devstack talks to the stack with the project's Python "
            f"packages; install them first (`{sys.executable} -m pip install -e '.[test]'`, "
            "or `make install`)"
        ) from exc


def print_settings(stack: Stack) -> None:
    for key, value in stack.settings():
        print(f"{key}={value}")
    sys.stdout.flush()


def cmd_install(_: argparse.Namespace) -> int:
    started = time.monotonic()
    install()
    log(f"installs done in {time.monotonic() - started:.1f}s")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    with needs_clients():
        from stacklib.probes import kafka_ready, redis_ready

    started = time.monotonic()
    requested: int | None = None if args.port_base == "auto" else int(args.port_base)
    install()
    state_dir: Path = args.dir
    with locked(state_dir / "stack.lock"):
        stack = load_stack(state_dir)
        wanted = Shape(
            args.brokers, args.redis_cluster, requested or 0, args.partitions, args.fsync
        )
        if stack is not None and stack.shape != replace(
            wanted, port_base=requested or stack.shape.port_base
        ):
            if any(running_pid(s) is not None for s in stack.services):
                raise DevstackError(
                    f"{state_dir} runs a stack with other options ({asdict(stack.shape)}); "
                    f"run `ops/devstack down --dir {state_dir}` first"
                )
            release_port_base(stack)
            stack = None
        if stack is not None and not stack.formatted:
            log("its Kafka storage was never formatted (a start that failed): laying it out anew")
            stop_services(stack.services, signal.SIGKILL, STOP_GRACE_SECONDS)
            release_port_base(stack)
            stack = None
        formatting: Formatting = []
        if stack is None:
            base = claim_port_base(state_dir, wanted, requested)
            stack = Stack(state_dir, replace(wanted, port_base=base), new_cluster_id())
            missing = stack.services
            prepare_fresh(stack)
            formatting = start_formatting(stack)
        else:
            missing = [s for s in stack.services if running_pid(s) is None]
            check_ports_free(missing, state_dir)
        deadline = time.monotonic() + args.timeout
        try:
            for service in missing:
                if service.kind == "redis":
                    start_service(service)
            redis_ready(stack, deadline)
            finish_formatting(formatting)
            for service in missing:
                if service.kind == "kafka":
                    start_service(service)
            kafka_ready(stack, deadline)
        except DevstackError:
            if missing:
                log("stopping the services this run started")
                stop_services(missing, signal.SIGKILL, STOP_GRACE_SECONDS)
            raise
    log(f"{'up' if missing else 'already up'} ({state_dir}) in {time.monotonic() - started:.1f}s")
    print_settings(stack)
    return 0


def existing_stack(state_dir: Path) -> Stack:
    stack = load_stack(state_dir)
    if stack is None:
        raise DevstackError(f"no stack in {state_dir}; run `ops/devstack up --dir {state_dir}`")
    return stack


def cmd_down(args: argparse.Namespace) -> int:
    started = time.monotonic()
    state_dir: Path = args.dir
    with locked(state_dir / "stack.lock"):
        stack = load_stack(state_dir)
        homes = sorted({*state_dir.glob("kafka-*"), *state_dir.glob("redis-*")})
        services = stack.services if stack else []
        known = {s.home for s in services}
        services += [Service(h.name, "", 0, 0, 0, h) for h in homes if h not in known]
        if not services:
            log(f"nothing to stop in {state_dir}")
            return 0
        stop_services(services, signal.SIGTERM, args.grace)
        for service in services:
            for path in service.home.glob("*") if service.home.is_dir() else []:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.suffix != ".log":
                    path.unlink()
        if stack is not None:
            release_port_base(stack)
        (state_dir / "stack.json").unlink(missing_ok=True)
    log(f"down ({state_dir}) in {time.monotonic() - started:.1f}s; logs kept in its */*.log")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stack = load_stack(args.dir)
    if stack is None:
        print(f"no stack in {args.dir}")
        return 3
    with needs_clients():
        from stacklib.probes import answers

    healthy = True
    for service in stack.services:
        pid = running_pid(service)
        answering = pid is not None and answers(service)
        state = (
            "not running"
            if pid is None
            else f"pid {pid}, " + ("answers" if answering else "NOT ANSWERING")
        )
        print(f"{service.name:8} {HOST}:{service.port:<6} {state}")
        healthy = healthy and answering
    return 0 if healthy else 1


def broker(stack: Stack, number: int) -> Service:
    if not 1 <= number <= len(stack.kafka):
        raise DevstackError(f"broker {number} does not exist; the stack has {len(stack.kafka)}")
    return stack.kafka[number - 1]


def cmd_kill_broker(args: argparse.Namespace) -> int:
    with locked(args.dir / "stack.lock"):
        target = broker(existing_stack(args.dir), args.broker)
        if running_pid(target) is None:
            log(f"{target.name} is not running")
            return 0
        stop_services([target], signal.Signals[f"SIG{args.signal}"], STOP_GRACE_SECONDS)
    return 0


def cmd_start_broker(args: argparse.Namespace) -> int:
    with needs_clients():
        from stacklib.probes import brokers_in_sync

    with locked(args.dir / "stack.lock"):
        stack = existing_stack(args.dir)
        target = broker(stack, args.broker)
        if running_pid(target) is None:
            check_ports_free([target], args.dir)
            start_service(target)
        brokers_in_sync(stack, target, time.monotonic() + args.timeout)
    return 0


def single_redis(stack: Stack) -> Service:
    if stack.shape.redis_cluster:
        raise DevstackError("the Redis chaos helpers work on a single Redis, not a cluster")
    return stack.redis[0]


def cmd_redis_snapshot(args: argparse.Namespace) -> int:
    """BGSAVE, wait for it, and copy the RDB file to the path given."""
    with needs_clients():
        from stacklib.client import redis_node

    target = single_redis(existing_stack(args.dir))
    node = redis_node(target.port, timeout=30.0)
    before = node.lastsave()
    node.bgsave()
    deadline = time.monotonic() + args.timeout
    while node.lastsave() == before or node.info("persistence")["rdb_bgsave_in_progress"]:
        if time.monotonic() > deadline:
            raise DevstackError(f"BGSAVE on {target.name} did not finish in {args.timeout:.0f}s")
        time.sleep(0.05)
    shutil.copyfile(target.home / "data" / "dump.rdb", args.file)
    log(f"{target.name} snapshot in {args.file}")
    return 0


def aof_tail(target: Service) -> Path:
    """The newest part of the Redis append-only file (the one writes go to)."""
    folder = target.home / "data" / "appendonlydir"
    manifest = (folder / "appendonly.aof.manifest").read_text().split("\n")
    parts = [line.split()[1] for line in manifest if line.endswith("type i")]
    if not parts:
        raise DevstackError(f"no incremental append-only file in {folder}")
    return folder / parts[-1]


def cmd_redis_aof_size(args: argparse.Namespace) -> int:
    print(aof_tail(single_redis(existing_stack(args.dir))).stat().st_size)
    return 0


def cmd_kill_redis(args: argparse.Namespace) -> int:
    with locked(args.dir / "stack.lock"):
        target = single_redis(existing_stack(args.dir))
        stop_services([target], signal.Signals[f"SIG{args.signal}"], STOP_GRACE_SECONDS)
    return 0


def cmd_start_redis(args: argparse.Namespace) -> int:
    """Start the stopped Redis, from its own data or, with --from-snapshot, from an RDB file
    alone (as the base of a new append-only file: Redis with AOF on ignores a lone RDB)."""
    with needs_clients():
        from stacklib.probes import redis_ready

    with locked(args.dir / "stack.lock"):
        stack = existing_stack(args.dir)
        target = single_redis(stack)
        if running_pid(target) is not None:
            raise DevstackError(f"{target.name} is running; kill-redis first")
        if args.from_snapshot is not None:
            data = target.home / "data"
            shutil.rmtree(data)
            aof = data / "appendonlydir"
            aof.mkdir(parents=True)
            shutil.copyfile(args.from_snapshot, aof / "appendonly.aof.1.base.rdb")
            (aof / "appendonly.aof.manifest").write_text(
                "file appendonly.aof.1.base.rdb seq 1 type b\n"
            )
        elif args.truncate_aof is not None:
            with aof_tail(target).open("r+b") as tail:
                tail.truncate(args.truncate_aof)
        check_ports_free([target], args.dir)
        start_service(target)
        redis_ready(stack, time.monotonic() + args.timeout)
    return 0


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="ops/devstack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", required=True)

    def with_dir(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--dir",
            type=lambda p: Path(p).resolve(),
            default=DEFAULT_DIR,
            help=f"state folder: config, data, logs, pid files (default {DEFAULT_DIR})",
        )
        return sub

    commands.add_parser(
        "install", help="first-time installs only: redis-server, Kafka jars, npm ci"
    )
    up = with_dir("up", "start the stack (or re-print the settings of a running one)")
    up.add_argument(
        "--brokers",
        type=int,
        default=1,
        choices=range(1, MAX_BROKERS + 1),
        metavar="N",
        help="Kafka nodes, each broker and controller (default 1)",
    )
    up.add_argument(
        "--redis-cluster",
        action="store_true",
        help=f"a {REDIS_CLUSTER_NODES}-master Redis Cluster instead of one Redis",
    )
    up.add_argument(
        "--partitions",
        type=positive_int,
        default=12,
        help="partitions of the enricher's topics (default 12)",
    )
    up.add_argument(
        "--fsync",
        choices=["always", "everysec", "no"],
        default="everysec",
        help="Redis appendfsync (default everysec)",
    )
    up.add_argument(
        "--port-base",
        type=port_base,
        default=os.environ.get("ENRICHER_DEVSTACK_PORT_BASE", str(DEFAULT_PORT_BASE)),
        help="Kafka on BASE+92.., controllers BASE+93.., Redis BASE+379..; `auto` takes the "
        f"first free one of {AUTO_PORT_BASES.start}, {AUTO_PORT_BASES.start + 1000}, ... "
        f"(default $ENRICHER_DEVSTACK_PORT_BASE or {DEFAULT_PORT_BASE})",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the services to answer (default 120)",
    )
    down = with_dir("down", "stop the stack's processes and remove their data")
    down.add_argument(
        "--grace",
        type=float,
        default=STOP_GRACE_SECONDS,
        help="seconds between SIGTERM and SIGKILL",
    )
    with_dir("status", "show which services run and answer (exit 0 only if all do)")
    kill = with_dir("kill-broker", "stop one Kafka node of a running stack")
    kill.add_argument("broker", type=int, help="node number, 1-based")
    kill.add_argument(
        "--signal",
        choices=["KILL", "TERM"],
        default="KILL",
        help="KILL (crash, default) or TERM (controlled shutdown)",
    )
    start = with_dir("start-broker", "restart one stopped Kafka node and wait until it is in sync")
    start.add_argument("broker", type=int, help="node number, 1-based")
    start.add_argument("--timeout", type=float, default=120.0)
    snapshot = with_dir("redis-snapshot", "save the Redis data set to an RDB file (BGSAVE)")
    snapshot.add_argument("file", type=Path, help="where to copy the RDB file")
    snapshot.add_argument("--timeout", type=float, default=60.0)
    kill_redis = with_dir("kill-redis", "stop the stack's Redis")
    kill_redis.add_argument("--signal", choices=["KILL", "TERM"], default="KILL")
    start_redis = with_dir("start-redis", "restart the stopped Redis")
    start_redis.add_argument(
        "--from-snapshot",
        type=Path,
        help="start from this RDB file (from redis-snapshot) instead of the data Redis kept",
    )
    start_redis.add_argument(
        "--truncate-aof",
        type=int,
        metavar="BYTES",
        help="cut the newest append-only file to BYTES first: a crash that lost the writes"
        " after it (see redis-aof-size)",
    )
    start_redis.add_argument("--timeout", type=float, default=60.0)
    with_dir("redis-aof-size", "print the size of the newest append-only file of Redis")
    return root


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "install": cmd_install,
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "kill-broker": cmd_kill_broker,
    "start-broker": cmd_start_broker,
    "redis-snapshot": cmd_redis_snapshot,
    "kill-redis": cmd_kill_redis,
    "redis-aof-size": cmd_redis_aof_size,
    "start-redis": cmd_start_redis,
}


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1")
    return int(text)


def port_base(text: str) -> str:
    if text != "auto" and not (text.isdigit() and 1024 <= int(text) <= 65535 - 500):
        raise argparse.ArgumentTypeError(f"expected `auto` or a number in 1024..{65535 - 500}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DevstackError as exc:
        log(f"error: {exc}")
        return 1
