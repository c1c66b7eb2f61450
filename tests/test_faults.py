"""A SuperNode killed mid-round: the round completes with the others, the site rejoins.

Real processes on loopback (insecure: this is about faults, test_deploy.py covers TLS
and node authentication): one SuperLink, three SuperNodes reading their own site
directories, ``flwr run`` of the app with ``strategy.min_nodes=2``.  When partition 2
starts training in round 2 (it writes a ``fault-marker`` file, a test hook of
clients/fault_marker.py), every process of that SuperNode is killed with SIGKILL, as
a crashed machine would stop.  Round 2 must still complete with the two other sites'
updates.  The same site is then restarted with the same ``--node-config``; without a
registered key it comes back under a new Flower node id, and it must take part in a
later round and in the final evaluation.  Ports are chosen at run time and every
process is stopped afterwards, whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from clients.fault_marker import marker_path
from fed_iotlm.federation.sites import export_sites
from fed_iotlm.settings import compose
from tests.flower_procs import (
    BIN,
    FLWR,
    REAL_PROCESS_MARKS,
    REPO,
    ProcessTracker,
    flower_env,
    free_port,
    port_open,
    send_signal,
    wait_for_port,
)

pytestmark = REAL_PROCESS_MARKS

CONNECTION = "fed-iotlm-faults"
QUICK = ("experiment=quick",)  # 3 sites; the sites' data must match the run config
ROUNDS = 4
KILLED, KILL_ROUND = 2, 2  # partition id and round of the crash
ROUND_TIMEOUT_S = 90  # well above an honest round on a loaded 2-core machine
RUN_TIMEOUT_S = 900


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


def _wait_for(condition, timeout: float, what: str, context=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{context()}")
        time.sleep(0.5)


def test_killed_supernode_round_completes_and_site_rejoins(tmp_path):
    root = tmp_path
    export_sites(compose(list(QUICK)), root / "data")
    link_port = free_port()
    tracker = ProcessTracker([str(root), f"127.0.0.1:{link_port} "])
    link_home, cli_home = root / "home-superlink", root / "home-cli"
    link_home.mkdir()
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    cli_env = flower_env(cli_home)

    def flwr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(FLWR), *args], cwd=REPO, env=cli_env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    sites = Sites(root, link_port, tracker)
    server_log = root / "superlink.log"
    out_dir = root / "out"

    run_id = ""

    def context() -> str:
        link = server_log.read_text()[-3000:] if server_log.exists() else ""
        app = flwr("log", run_id, CONNECTION, "--show").stdout[-6000:] if run_id else ""
        return f"--- superlink ---\n{link}\n--- serverapp ---\n{app}\n{sites.tails()}"

    try:
        superlink = tracker.start(
            [
                str(BIN / "flower-superlink"), "--insecure",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(link_port),
            ],
            server_log, cwd=link_home, env=flower_env(link_home),
        )  # fmt: skip
        wait_for_port(link_port, timeout=60, proc=superlink)
        for pid in range(3):
            sites.start(pid)

        overrides = " ".join(
            [
                *QUICK,
                f"rounds={ROUNDS}",
                "train.epochs=1",
                "strategy.min_nodes=2",
                f"strategy.round_timeout_s={ROUND_TIMEOUT_S}",
                "mlflow.enabled=false",
                f"output_dir={out_dir}",
            ]
        )
        started = time.monotonic()
        run = flwr("run", ".", CONNECTION, "--run-config", f'overrides="{overrides}"',
                   "--format", "json")  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr + context()
        run_id = str(json.loads(run.stdout[run.stdout.index("{") :])["run-id"])

        # round KILL_ROUND is in flight on the site: crash it, then restart it
        marker = marker_path(sites.markers, KILLED, KILL_ROUND)
        _wait_for(marker.exists, RUN_TIMEOUT_S, f"{marker.name}", context)
        sites.kill(KILLED)
        sites.start(KILLED, attempt=1)

        results = out_dir / "results.json"

        def run_status() -> str:
            text = flwr("list", CONNECTION, "--run-id", run_id, "--format", "json").stdout
            return json.loads(text[text.index("{") :])["runs"][0]["status"] if "{" in text else ""

        last_listed = [time.monotonic()]

        def finished() -> bool:
            if results.exists():
                return True
            if time.monotonic() - last_listed[0] < 20:  # the CLI costs a core-second
                return False
            last_listed[0] = time.monotonic()
            status = run_status()
            if status.startswith("finished"):  # results.json is written before the app ends
                assert results.exists(), f"run ended as {status} without results\n{context()}"
                return True
            return False

        _wait_for(finished, RUN_TIMEOUT_S, "results.json", context)
        elapsed = time.monotonic() - started
        _wait_for(
            lambda: run_status() == "finished:completed",
            120, "the run to be listed as finished:completed", context,
        )  # fmt: skip

        res = json.loads(results.read_text())
        history = {h["round"]: h for h in res["history"]}
        assert sorted(history) == list(range(1, ROUNDS + 1)), res["history"]
        holders = res["holders_by_round"]

        def partitions(rnd: int) -> set[str]:
            return {p for nodes in holders.get(str(rnd), {}).values() for p in nodes}

        # before the crash every site answered
        assert history[1]["nodes_answered"] == 3, history[1]
        # the round in flight at the crash completed with the two other sites' updates
        crashed = history[KILL_ROUND]
        assert crashed["nodes_sent"] == 3, crashed
        assert crashed["nodes_answered"] == 2, crashed
        assert crashed["nodes_failed"] + crashed["nodes_missing"] == 1, crashed
        assert crashed["round_skipped"] == 0, crashed
        assert partitions(KILL_ROUND) == {"0", "1"}, holders
        fault = res["faults_by_round"][str(KILL_ROUND)]
        assert any(f"partition {KILLED}" in w for w in fault["failed"] + fault["missing"]), fault
        # the restarted site (a new Flower node id) took part again in a later round
        back = [r for r in range(KILL_ROUND + 1, ROUNDS + 1) if history[r]["nodes_answered"] == 3]
        assert back, res["history"]
        assert str(KILLED) in partitions(back[0]), holders
        rejoined = [j for j in res["rejoined"] if j["partition"] == KILLED]
        assert rejoined and rejoined[0]["node"] != rejoined[0]["was"], res["rejoined"]
        # and in the final evaluation, once per site
        assert sorted(res["test"]["accuracy_by_node"]) == ["0", "1", "2"], res["test"]
        print(
            f"faults: {ROUNDS} rounds in {elapsed:.1f} s; round {KILL_ROUND}: "
            f"{fault}; site {KILLED} back in round {back[0]}"
        )
    finally:
        left = tracker.stop()
        assert not left, f"processes still alive after teardown: {sorted(left)}"
        assert not port_open(link_port), "SuperLink port still open"
