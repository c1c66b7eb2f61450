"""A hung (not dead) ClientApp is cut off at the round deadline; its site answers again.

Unit tests of :func:`clients.deadline.call_with_deadline` first (a handler that never
returns, one that raises, one that answers).  Then real processes on loopback, as in
tests/test_faults.py: one SuperLink, three SuperNodes reading their own site
directories, ``flwr run`` with ``strategy.min_nodes=2``.  Partition 2 is started with
``fault-hang=1`` (a test hook, clients/fault_marker.py): its ``train`` handler blocks
forever in round 1, alive and heartbeating.  Round 1 must complete with the two other
sites; the hung handler is cut off at the deadline, so the same SuperNode (the same
Flower node id, no restart) answers round 2 and the final evaluation.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from clients.deadline import HandlerDeadlineExceeded, call_with_deadline, handler_deadline_s
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
    wait_for_port,
)
from tests.test_faults import Sites, _wait_for

CONNECTION = "fed-iotlm-hung"
QUICK = ("experiment=quick",)
HUNG = 2  # partition id whose train handler hangs in round 1
ROUNDS = 2
# above an honest round, a cold ClientApp start included, on 2 cores shared with other work
# (30 s was too short for the first statistics round there); the hung round lasts this long
ROUND_TIMEOUT_S = 60
RUN_TIMEOUT_S = 600


def _message():
    """All :func:`call_with_deadline` reads of a message (a real Message needs a run)."""
    return SimpleNamespace(metadata=SimpleNamespace(message_type="train"))


def test_a_handler_past_the_deadline_is_cut_off_with_an_error():
    release = threading.Event()

    def hangs(msg, context):
        release.wait()  # ends when the test is over (the daemon thread would too)

    try:
        with pytest.raises(HandlerDeadlineExceeded, match="train handler still running after"):
            call_with_deadline(hangs, _message(), _context(), deadline_s=0.2)
    finally:
        release.set()


def test_a_handler_within_the_deadline_answers_or_raises_as_it_would():
    reply = object()  # whatever the handler returns is the reply
    assert call_with_deadline(lambda m, c: reply, _message(), _context(), 30.0) is reply

    def fails(msg, context):
        raise ValueError("node 3: bad data")

    with pytest.raises(ValueError, match="node 3: bad data"):
        call_with_deadline(fails, _message(), _context(), 30.0)


def test_the_deadline_is_the_round_deadline_or_a_longer_secagg_stage():
    assert handler_deadline_s({"strategy": {"round_timeout_s": 45}}) == 45
    secure = {"strategy": {"round_timeout_s": 45}, "secagg": {"enabled": True, "timeout_s": 90}}
    assert handler_deadline_s(secure) == 90
    with pytest.raises(ValueError, match="round_timeout_s"):
        handler_deadline_s({"strategy": {"round_timeout_s": -1}})


def _context():
    return SimpleNamespace(node_config={})


def _real_processes(test):
    for mark in REAL_PROCESS_MARKS:  # integration, Linux, the flwr CLI
        test = mark(test)
    return test


@_real_processes
def test_hung_clientapp_is_cut_off_and_its_site_answers_the_next_round(tmp_path):
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
            sites.start(pid, extra=f"fault-hang={ROUNDS - 1}" if pid == HUNG else "")

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

        results = out_dir / "results.json"
        last_listed = [time.monotonic()]

        def finished() -> bool:
            if results.exists():
                return True
            if time.monotonic() - last_listed[0] < 20:  # the CLI costs a core-second
                return False
            last_listed[0] = time.monotonic()
            text = flwr("list", CONNECTION, "--run-id", run_id, "--format", "json").stdout
            status = json.loads(text[text.index("{") :])["runs"][0]["status"] if "{" in text else ""
            assert not status.startswith("finished") or results.exists(), (
                f"run ended as {status} without results\n{context()}"
            )
            return False

        _wait_for(finished, RUN_TIMEOUT_S, "results.json", context)
        elapsed = time.monotonic() - started

        # the hang really happened: the handler started round 1 and never answered it
        assert marker_path(sites.markers, HUNG, 1).exists()
        res = json.loads(results.read_text())
        history = {h["round"]: h for h in res["history"]}
        assert sorted(history) == list(range(1, ROUNDS + 1)), res["history"]
        hung_round = history[1]
        assert hung_round["nodes_sent"] == 3 and hung_round["nodes_answered"] == 2, hung_round
        assert hung_round["round_skipped"] == 0, hung_round
        fault = res["faults_by_round"]["1"]
        assert any(f"partition {HUNG}" in w for w in fault["failed"] + fault["missing"]), fault
        # cut off at the deadline, the same SuperNode (no restart) answers round 2 ...
        assert history[2]["nodes_answered"] == 3, history[2]
        assert {p for ns in res["holders_by_round"]["2"].values() for p in ns} >= {str(HUNG)}
        assert not [j for j in res.get("rejoined", []) if j["partition"] == HUNG]
        # ... and the final evaluation
        assert sorted(res["test"]["accuracy_by_node"]) == ["0", "1", "2"], res["test"]
        print(f"hung ClientApp: {ROUNDS} rounds in {elapsed:.1f} s; round 1: {fault}")
    finally:
        left = tracker.stop()
        assert not left, f"processes still alive after teardown: {sorted(left)}"
        assert not port_open(link_port), "SuperLink port still open"
