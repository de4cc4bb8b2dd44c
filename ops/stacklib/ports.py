"""Free ports, and the port bases that stacks claim machine-wide.

Every stack on the machine, from any checkout, claims its port base in a shared folder while it
is set up, so that `--port-base auto` never picks ports of a stack whose broker is only down
for a moment (kill-broker) and two checkouts can run their test suites side by side."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from stacklib.common import HOST, DevstackError, locked
from stacklib.layout import Service, Shape, Stack

DEFAULT_PORT_BASE = 31000
CLAIMS = Path("/tmp/enricher-devstack-ports")
AUTO_PORT_BASES = range(20000, DEFAULT_PORT_BASE, 1000)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def check_ports_free(services: Sequence[Service], state_dir: Path) -> None:
    for service in services:
        for port in service.ports:
            if port_in_use(port):
                raise DevstackError(
                    f"port {port} ({service.name}) on {HOST} is already in use by a process that "
                    f"this stack ({state_dir}) did not start; stop it, or move the stack with "
                    f"--port-base / ENRICHER_DEVSTACK_PORT_BASE"
                )


def claim_owner(base: int) -> Path | None:
    """The state folder of the live stack that holds `base`, if any."""
    try:
        owner = Path((CLAIMS / str(base)).read_text().strip())
        state = json.loads((owner / "stack.json").read_text())
    except (OSError, ValueError):
        return None
    return owner if state.get("shape", {}).get("port_base") == base else None


def claim_port_base(state_dir: Path, shape: Shape, requested: int | None) -> int:
    CLAIMS.mkdir(mode=0o777, exist_ok=True)
    with locked(CLAIMS / "claims.lock"):
        for base in [requested] if requested is not None else AUTO_PORT_BASES:
            owner = claim_owner(base)
            if owner not in (None, state_dir):
                if requested is not None:
                    raise DevstackError(
                        f"port base {base} belongs to the stack in {owner}; take that one down "
                        "or pick another --port-base"
                    )
                continue
            candidate = Stack(state_dir, replace(shape, port_base=base), "")
            if requested is not None:
                check_ports_free(candidate.services, state_dir)
            elif any(port_in_use(p) for s in candidate.services for p in s.ports):
                continue
            (CLAIMS / str(base)).write_text(f"{state_dir}\n")
            return base
    raise DevstackError(
        f"no free port base among {AUTO_PORT_BASES.start}..{AUTO_PORT_BASES.stop - 1000} "
        f"(claims in {CLAIMS}); take a stack down or pass --port-base"
    )


def release_port_base(stack: Stack) -> None:
    claim = CLAIMS / str(stack.shape.port_base)
    with contextlib.suppress(OSError):
        if Path(claim.read_text().strip()) == stack.dir:
            claim.unlink()
