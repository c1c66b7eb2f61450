"""Real Flower processes in tests: free ports, a private environment, complete teardown.

Flower's SuperLink and SuperNode each start a SuperExec in a new session, which starts
ServerApp / ClientApp processes (and, in simulation, Ray daemons that can outlive their
parents).  :class:`ProcessTracker` finds all of them again by the markers in their
command lines (a private directory, a port), by descent from the processes the test
started, and by session, so a test can stop every process it caused, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.ports import lease_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLWR = BIN / "flwr"

# the marks of every test that starts real SuperLink/SuperNode processes
REAL_PROCESS_MARKS = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="finds the processes it started in /proc"
    ),
    pytest.mark.skipif(not FLWR.exists(), reason="the flwr CLI is not installed next to Python"),
]


def free_port() -> int:
    """A free port no other pytest process (xdist worker) is handed meanwhile."""
    return lease_port()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until something listens on ``port``; fails early if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")
        time.sleep(0.3)


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for Flower processes: a private FLWR_HOME, offline, this venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(
        FLWR_HOME=str(flwr_home),
        # offline: no `uv sync` of the app's dependencies, no update check, no telemetry
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        # the Flower CLIs start other Flower executables from PATH
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    )
    return env


def processes() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, session id, state, command line) of every process."""
    out: dict[int, tuple[int, int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0], cmdline)
    return out


def send_signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class ProcessTracker:
    """The processes a test caused, found again however far they have wandered.

    Ours: ``roots`` (what the test started), anything whose command line contains one
    of ``markers`` (a private directory, a port), their descendants, and every process
    in their sessions: SuperLink, SuperNode and SuperExec each start a new session, and
    Ray's daemons live in SuperExec's and can outlive (be orphaned by) their parents,
    so sessions seen once are remembered.
    """

    def __init__(self, markers: list[str]) -> None:
        self.markers = list(markers)
        self.roots: set[int] = set()
        self.sessions: set[int] = set()

    def start(self, args: list[str], log: Path, **kwargs) -> subprocess.Popen:
        """Popen ``args`` in a new session, output to ``log``, and track it."""
        with open(log, "w") as sink:
            proc = subprocess.Popen(
                args, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
            )
        self.roots.add(proc.pid)
        self.scan()
        return proc

    def scan(self, named: str = "") -> tuple[set[int], set[int]]:
        """Live (non-zombie) processes of ours, and those whose command line has ``named``."""
        procs = processes()
        ours = {p for p, (_, _, _, cmd) in procs.items() if any(m in cmd for m in self.markers)}
        ours |= self.roots & procs.keys()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        stack = list(ours)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in ours:
                    ours.add(child)
                    stack.append(child)
        self.sessions |= {procs[p][1] for p in ours} - {0, 1, os.getsid(0)}
        ours |= {p for p, (_, sid, _, _) in procs.items() if sid in self.sessions}
        ours.discard(os.getpid())
        live = {p for p in ours if procs[p][2] != "Z"}
        return live, {p for p in live if named and named in procs[p][3]}

    def wait_gone(self, timeout: float) -> set[int]:
        deadline = time.monotonic() + timeout
        live, _ = self.scan()
        while live and time.monotonic() < deadline:
            time.sleep(0.5)
            live, _ = self.scan()
        return live

    def stop(
        self, graceful: Iterable[str] = ("flower-superlink", "flower-supernode", "flower-superexec")
    ) -> set[int]:
        """SIGTERM the processes named in ``graceful`` (they shut down cleanly; a SuperExec
        would follow its parent only after its own reconnection attempts, so it is told
        too), then SIGKILL whatever is left; returns what survived."""
        for name in graceful:
            send_signal(self.scan(name)[1], signal.SIGTERM)
        # Ray's dashboard/runtime-env agents ignore SIGTERM once orphaned
        send_signal(self.wait_gone(timeout=15), signal.SIGKILL)
        return self.wait_gone(timeout=10)
