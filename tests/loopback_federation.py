"""A real federation on loopback for fault tests: one SuperLink, N SuperNodes, ``flwr run``.

The set-up of the tests that kill or hang parts of a real deployment
(tests/test_faults.py, tests/test_server_restart.py), as one object: insecure (faults,
not TLS, are under test; test_deploy.py covers TLS), free ports, a private FLWR_HOME per
process, every process stopped afterwards, whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from fed_iotlm.federation.sites import export_sites
from fed_iotlm.settings import compose
from tests.flower_procs import (
    BIN,
    FLWR,
    REPO,
    ProcessTracker,
    flower_env,
    free_port,
    port_open,
    send_signal,
    wait_for_port,
)

QUICK = ("experiment=quick",)  # 3 sites; the sites' data must match the run config


class Sites:
    """The SuperNodes of the test: start one, kill every process of one."""

    def __init__(self, root: Path, link_port: int, tracker: ProcessTracker) -> None:
        self.root, self.link_port, self.tracker = root, link_port, tracker
        self.markers = root / "markers"
        self.procs: dict[int, tuple[subprocess.Popen, int]] = {}  # partition -> (proc, port)
        self.logs: list[Path] = []

    def start(self, pid: int, attempt: int = 0, extra: str = "") -> None:
        """Start site ``pid``; ``extra`` adds node-config entries (e.g. ``fault-hang=1``)."""
        home = self.root / f"home-site-{pid}-{attempt}"
        home.mkdir()
        port = free_port()
        self.tracker.markers.append(f"127.0.0.1:{port} ")
        data = self.root / "data" / f"site-{pid}"
        node_config = f'partition-id={pid} data-dir="{data}" fault-marker="{self.markers}"'
        node_config = f"{node_config} {extra}".strip()
        args = [
            str(BIN / "flower-supernode"), "--insecure",
            "--superlink", f"127.0.0.1:{self.link_port}",
            "--port", str(port), "--max-retries", "3", "--node-config", node_config,
        ]  # fmt: skip
        log = self.root / f"site-{pid}-{attempt}.log"
        self.logs.append(log)
        proc = self.tracker.start(args, log, cwd=home, env=flower_env(home))
        self.procs[pid] = (proc, port)

    def kill(self, pid: int) -> None:
        """SIGKILL the SuperNode, its SuperExec and its ClientApp: nothing says goodbye."""
        proc, port = self.procs.pop(pid)
        node = ProcessTracker([f"127.0.0.1:{port} "])
        node.roots.add(proc.pid)
        live, _ = node.scan()
        assert proc.pid in live
        send_signal(live, signal.SIGKILL)
        left = node.wait_gone(timeout=30)
        assert not left, f"processes of site {pid} survived SIGKILL: {sorted(left)}"

    def tails(self) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text()[-1500:]}" for log in self.logs)


def wait_for(condition, timeout: float, what: str, context=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{context()}")
        time.sleep(0.5)


class LoopbackFederation:
    """Start with :meth:`start`, run apps with :meth:`run`, always :meth:`stop`."""

    def __init__(self, root: Path, connection: str) -> None:
        self.root, self.connection = root, connection
        export_sites(compose(list(QUICK)), root / "data")
        self.link_port = free_port()
        self.tracker = ProcessTracker([str(root), f"127.0.0.1:{self.link_port} "])
        self.sites = Sites(root, self.link_port, self.tracker)
        self.server_log = root / "superlink.log"
        cli_home = root / "home-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )
        self.cli_env = flower_env(cli_home)
        self.run_ids: list[str] = []

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(FLWR), *args], cwd=REPO, env=self.cli_env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def start(self, num_sites: int = 3, extra: dict[int, str] | None = None) -> None:
        """The SuperLink, then ``num_sites`` SuperNodes (``extra``: more node config)."""
        link_home = self.root / "home-superlink"
        link_home.mkdir()
        superlink = self.tracker.start(
            [
                str(BIN / "flower-superlink"), "--insecure",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.link_port),
            ],
            self.server_log, cwd=link_home, env=flower_env(link_home),
        )  # fmt: skip
        wait_for_port(self.link_port, timeout=60, proc=superlink)
        for pid in range(num_sites):
            self.sites.start(pid, extra=(extra or {}).get(pid, ""))

    def run(self, *overrides: str) -> str:
        """``flwr run .`` with the quick experiment and ``overrides``; the run id."""
        joined = " ".join([*QUICK, *overrides])
        run = self.flwr("run", ".", self.connection, "--run-config", f'overrides="{joined}"',
                        "--format", "json")  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr + self.context()
        run_id = str(json.loads(run.stdout[run.stdout.index("{") :])["run-id"])
        self.run_ids.append(run_id)
        return run_id

    def status(self, run_id: str) -> str:
        text = self.flwr("list", self.connection, "--run-id", run_id, "--format", "json").stdout
        return json.loads(text[text.index("{") :])["runs"][0]["status"] if "{" in text else ""

    def wait_for_results(self, results: Path, run_id: str, timeout: float) -> dict:
        """results.json of ``run_id``; fails early if the run ends without it."""
        last_listed = [time.monotonic()]

        def finished() -> bool:
            if results.exists():
                return True
            if time.monotonic() - last_listed[0] < 20:  # the CLI costs a core-second
                return False
            last_listed[0] = time.monotonic()
            status = self.status(run_id)
            assert not status.startswith("finished") or results.exists(), (
                f"run {run_id} ended as {status} without results\n{self.context()}"
            )
            return False

        wait_for(finished, timeout, results.name, self.context)
        return json.loads(results.read_text())

    def context(self) -> str:
        """The logs a failure message needs: SuperLink, each ServerApp run, each site."""
        link = self.server_log.read_text()[-3000:] if self.server_log.exists() else ""
        apps = "".join(
            f"--- serverapp {r} ---\n"
            + self.flwr("log", r, self.connection, "--show").stdout[-5000:]
            + "\n"
            for r in self.run_ids
        )
        return f"--- superlink ---\n{link}\n{apps}{self.sites.tails()}"

    def stop(self) -> None:
        left = self.tracker.stop()
        assert not left, f"processes still alive after teardown: {sorted(left)}"
        assert not port_open(self.link_port), "SuperLink port still open"
