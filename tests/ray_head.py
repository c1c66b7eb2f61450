"""A real Ray head (``ray start --head --block``) as a separate process, private to a test.

It must never meet the other Ray instances on the machine: the studies start their own
with ``ray.init()``, which joins whatever cluster the last ``ray start`` recorded in
``/tmp/ray/ray_current_cluster``. So the head gets its own ``--temp-dir`` (the address
file goes there), its own free ports, and is stopped by signalling its own processes,
never with ``ray stop``, which kills every Ray process on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.flower_procs import BIN, ProcessTracker, free_port, port_open

RAY = BIN / "ray"


@dataclass
class RayHead:
    address: str  # the head's GCS address, host:port
    temp_dir: Path  # everything the head writes: sessions, logs, shipped packages
    proc: subprocess.Popen
    tracker: ProcessTracker

    def alive(self) -> bool:
        return self.proc.poll() is None and port_open(int(self.address.rsplit(":", 1)[1]))


def start_head(cwd: Path, num_cpus: int = 2, num_gpus: int = 0, timeout: float = 120) -> RayHead:
    """Start a head from ``cwd`` with a bare environment (no ``PYTHONPATH``, no
    ``RAY_ADDRESS``), so its workers can import this project only from what a job ships.

    Returns once the head has written its address and its GCS port accepts connections.
    """
    # a short path: Ray's Unix sockets live under it (108-byte limit)
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
    ports = {
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    args = [
        sys.executable,
        str(RAY),
        "start",
        "--head",
        "--block",
        "--port=0",  # Ray picks a free GCS port and writes it to the address file
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    tracker = ProcessTracker([str(temp_dir)])
    proc = tracker.start(args, temp_dir / "head.log", cwd=cwd, env=env)
    address_file = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + timeout
    while True:
        address = address_file.read_text().strip() if address_file.is_file() else ""
        if address and port_open(int(address.rsplit(":", 1)[1])):
            return RayHead(address, temp_dir, proc, tracker)
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (temp_dir / "head.log").read_text()[-3000:]
            tracker.stop(graceful=("ray start",))
            raise RuntimeError(f"the Ray head did not come up (exit {proc.poll()}):\n{log}")
        time.sleep(0.3)


def stop_head(head: RayHead) -> set[int]:
    """SIGTERM ``ray start --block`` (it takes its daemons down), SIGKILL what stays,
    then remove its temp dir; returns the pids that survived (empty when all are gone)."""
    survivors = head.tracker.stop(graceful=("ray start",))
    if not survivors:
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    return survivors
