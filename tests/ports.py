"""Free TCP ports for the processes a test starts, never handed out twice at once.

A port found by binding to port 0 is free only until the socket closes; the process
that will listen on it (a SuperLink, a Ray head) binds it seconds later.  In one pytest
process the kernel rarely offers the same port twice in that window, but with several
pytest workers (``make test`` runs two, pytest-xdist) each asks the kernel on its own,
and two workers handed the same port would start two servers on it: one fails to start,
or worse, a client reaches the other test's server.  So every port handed out is leased
in a registry shared by all pytest processes of this user (a JSON file under a lock) and
not handed out again until its lease ends; a lease outlasts the longest test.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# longer than any test holds a port (the slowest real-process runs wait up to ~15 min)
LEASE_S = 3600.0
REGISTRY = Path(tempfile.gettempdir()) / f"fed-iotlm-test-ports-{os.getuid()}.json"
ATTEMPTS = 200


def kernel_port() -> int:
    """A port nothing listens on now: the kernel's pick for a bind to port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(registry: Path) -> dict[int, float]:
    if not registry.exists():
        return {}
    try:
        return {int(port): float(until) for port, until in json.loads(registry.read_text()).items()}
    except (ValueError, AttributeError) as err:
        raise ValueError(
            f"{registry}: not a port registry ({err}); remove it, it is rebuilt on the next lease"
        ) from err


def _write(registry: Path, leases: dict[int, float]) -> None:
    """Whole or not at all: another worker may read it at any moment."""
    tmp = registry.with_name(f"{registry.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({str(port): until for port, until in sorted(leases.items())}))
    os.replace(tmp, registry)


def lease_port(
    registry: Path = REGISTRY,
    pick: Callable[[], int] = kernel_port,
    now: Callable[[], float] = time.time,
) -> int:
    """A free port no other lease in ``registry`` holds; leased for :data:`LEASE_S`."""
    with _locked(registry.with_name(registry.name + ".lock")):
        at = now()
        leases = {port: until for port, until in _read(registry).items() if until > at}
        for _ in range(ATTEMPTS):
            port = pick()
            if port not in leases:
                leases[port] = at + LEASE_S
                _write(registry, leases)
                return port
    raise RuntimeError(f"no unleased free port after {ATTEMPTS} tries ({registry})")
