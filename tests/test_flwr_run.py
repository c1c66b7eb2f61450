"""`flwr run .` end to end: Flower 1.41's managed local SuperLink runs the app's FAB.

The test gives the Flower CLI a private FLWR_HOME (its own ``config.toml``, state
database, installed FABs and logs) and private ports, so it never talks to a
SuperLink the user already runs on the default 39091, and it stops every process
the run started: ``flwr run`` leaves the managed SuperLink running on purpose and
Flower has no command to stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "fed-iotlm-test"
NUM_NODES = 3  # experiment=quick has partition.num_nodes=3
RUN_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the processes it started in /proc"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes() -> dict[int, tuple[int, int, str, str]]:
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


class _RunProcesses:
    """The processes `flwr run` started, found again however far they have wandered.

    Ours: ``roots`` (the CLI), anything whose command line names our private FLWR_HOME
    or port (SuperLink, SuperExec, flwr-simulation), their descendants, and every
    process in their sessions: SuperLink and SuperExec each start a new session, and
    Ray's daemons live in SuperExec's and can outlive (be orphaned by) their parents,
    so sessions seen once are remembered.
    """

    def __init__(self, markers: list[str]) -> None:
        self.markers = markers
        self.roots: set[int] = set()
        self.sessions: set[int] = set()

    def scan(self) -> tuple[set[int], set[int]]:
        """Live (non-zombie) processes of the run, and the pids of its flower-superlink."""
        procs = _processes()
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
        return live, {p for p in live if "flower-superlink" in procs[p][3]}

    def wait_gone(self, timeout: float) -> set[int]:
        deadline = time.monotonic() + timeout
        live, _ = self.scan()
        while live and time.monotonic() < deadline:
            time.sleep(0.5)
            live, _ = self.scan()
        return live

    def stop(self) -> None:
        """SIGTERM the managed SuperLink (a clean shutdown), then SIGKILL what is left."""
        _, superlinks = self.scan()
        _signal(superlinks, signal.SIGTERM)
        # Ray's dashboard/runtime-env agents ignore SIGTERM once orphaned
        _signal(self.wait_gone(timeout=15), signal.SIGKILL)
        self.wait_gone(timeout=10)


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@pytest.mark.integration
def test_flwr_run_managed_superlink(tmp_path):
    flwr_bin = Path(sys.executable).parent / "flwr"
    if not flwr_bin.exists():
        pytest.skip("the flwr CLI is not installed next to this Python")

    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local:"\n'
    )
    out_dir = tmp_path / "out"
    http_port, control_port = _free_port(), _free_port()

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(
        FLWR_HOME=str(flwr_home),
        # the managed SuperLink listens on 127.0.0.1:39091 (+ 39093) unless told otherwise
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        # offline: no `uv sync` of the app's dependencies, no update check, no telemetry
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        # `flwr` launches `flower-superlink` from PATH
        PATH=f"{flwr_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    overrides = f"experiment=quick mlflow.enabled=false output_dir={out_dir}"

    def flwr(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(flwr_bin), *args], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    run_procs = _RunProcesses([str(flwr_home), f"127.0.0.1:{http_port}"])
    start = time.monotonic()
    try:
        cli_log = tmp_path / "flwr-run.log"
        with cli_log.open("w") as sink:
            proc = subprocess.Popen(
                [
                    str(flwr_bin), "run", ".", CONNECTION,
                    "--federation-config", f"num-supernodes={NUM_NODES} client-resources-num-cpus=1",
                    "--run-config", f'overrides="{overrides}"',
                    "--stream",
                ],
                cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )  # fmt: skip
        run_procs.roots.add(proc.pid)
        while proc.poll() is None and time.monotonic() - start < RUN_TIMEOUT_S:
            run_procs.scan()  # learn the sessions while their leaders are alive
            time.sleep(1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log = cli_log.read_text()
            pytest.fail(f"`flwr run` did not finish in {RUN_TIMEOUT_S} s:\n{log[-4000:]}")
        log = cli_log.read_text()
        elapsed = time.monotonic() - start

        superlink_log = flwr_home / "local-superlink" / "superlink.log"
        context = f"{log[-4000:]}\n--- superlink.log ---\n" + (
            superlink_log.read_text()[-2000:] if superlink_log.exists() else "(none)"
        )
        assert proc.returncode == 0, context
        started = re.search(r"Successfully started run (\d+)", log)
        assert started, context
        assert f"({NUM_NODES} simulated SuperNodes)" in log, context

        # `--stream` exits 0 even when the run fails: ask the SuperLink for the run's status
        listed = flwr(
            "list", CONNECTION, "--run-id", started.group(1), "--format", "json", timeout=60
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        runs = json.loads(listed.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], listed.stdout

        results = out_dir / "results.json"
        assert results.exists(), context
        res = json.loads(results.read_text())
        assert res["method"] == "federated"
        assert res["num_nodes"] == NUM_NODES
        assert res["rounds"] == 2
        assert res["config"]["mlflow"]["enabled"] is False
        assert res["test"]["accuracy"] > 0.25, res["test"]
        assert sorted(res["test"]["accuracy_by_node"]) == [str(i) for i in range(NUM_NODES)]
        print(f"flwr run finished in {elapsed:.1f} s")
    finally:
        run_procs.stop()

    left, superlinks = run_procs.scan()
    assert not superlinks, f"flower-superlink still running: {sorted(superlinks)}"
    assert not left, f"processes of the run still alive: {sorted(left)}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        assert s.connect_ex(("127.0.0.1", http_port)) != 0, "SuperLink port still open"
