"""`flwr run .` end to end: Flower 1.41's managed local SuperLink runs the app's FAB.

The test gives the Flower CLI a private FLWR_HOME (its own ``config.toml``, state
database, installed FABs and logs) and private ports, so it never talks to a
SuperLink the user already runs on the default 39091, and it stops every process
the run started: ``flwr run`` leaves the managed SuperLink running on purpose and
Flower has no command to stop it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.doc_commands import documented
from tests.flower_procs import FLWR, REPO, ProcessTracker, flower_env, free_port, port_open

CONNECTION = "fed-iotlm-test"
NUM_NODES = 3  # experiment=quick has a 3-node partition.plan
RUN_TIMEOUT_S = 240
SECAGG_TIMEOUT_S = 420  # 5 SecAgg+ rounds: ~40 s alone on 2 cores, minutes under load
FEDLORA_TIMEOUT_S = 900  # SmolLM2 loaded by the server and each site, one round, evaluation

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the processes it started in /proc"
)


@pytest.mark.integration
def test_flwr_run_managed_superlink(tmp_path):
    flwr_bin = FLWR
    if not flwr_bin.exists():
        pytest.skip("the flwr CLI is not installed next to this Python")

    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local:"\n'
    )
    out_dir = tmp_path / "out"
    http_port, control_port = free_port(), free_port()

    env = flower_env(
        flwr_home,
        # the managed SuperLink listens on 127.0.0.1:39091 (+ 39093) unless told otherwise
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
    )
    overrides = f"experiment=quick mlflow.enabled=false output_dir={out_dir}"

    def flwr(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(flwr_bin), *args], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    run_procs = ProcessTracker([str(flwr_home), f"127.0.0.1:{http_port}"])
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
        run_procs.stop(graceful=("flower-superlink",))

    left, superlinks = run_procs.scan("flower-superlink")
    assert not superlinks, f"flower-superlink still running: {sorted(superlinks)}"
    assert not left, f"processes of the run still alive: {sorted(left)}"
    assert not port_open(http_port), "SuperLink port still open"


def _private_managed_superlink(tmp_path):
    """A Flower CLI environment whose default connection is a managed local SuperLink
    with its own FLWR_HOME and ports: (env, flwr_home, http port)."""
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local:"\n'
    )
    http_port, control_port = free_port(), free_port()
    env = flower_env(
        flwr_home,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
    )
    return env, flwr_home, http_port


def _run_as_written(doc_run, tmp_path, timeout_s: float):
    """Run a documented ``flwr run .``, token for token but for the app path: the doc runs
    it from the repository root (``.``); here it runs from a scratch directory with the
    repository's path, so the managed SuperLink, and with it the ServerApp, works there
    (``runs/``, ``mlflow.db``) and not in the checkout.  Waits for the run to finish,
    asserts ``finished:completed``, stops everything it started; returns the scratch
    directory."""
    args = shlex.split(doc_run.text, comments=True)
    assert args[:3] == ["flwr", "run", "."] and doc_run.connection is None, doc_run.text
    args[0], args[2] = str(FLWR), str(REPO)

    env, flwr_home, http_port = _private_managed_superlink(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    run_procs = ProcessTracker([str(flwr_home), f"127.0.0.1:{http_port}"])

    def flwr(*cli: str) -> str:
        done = subprocess.run(
            [str(FLWR), *cli], cwd=work, env=env, capture_output=True, text=True,
            timeout=180,  # `flwr list` took over 60 s on the loaded 2-core box (2026-12-01)
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def context() -> str:
        log = flwr_home / "local-superlink" / "superlink.log"
        return log.read_text()[-3000:] if log.exists() else "(no superlink.log)"

    cli_log = tmp_path / "flwr-run.log"
    try:
        unbuffered = {**env, "PYTHONUNBUFFERED": "1"}  # its lines reach the log as written
        proc = run_procs.start(args, cli_log, cwd=work, env=unbuffered)  # --stream: to the end
        started, deadline = None, time.monotonic() + 120
        while started is None and time.monotonic() < deadline:
            started = re.search(r"Successfully started run (\d+)", cli_log.read_text())
            if started is None and proc.poll() is not None:
                break
            time.sleep(1)  # the CLI's own output is all there is to wait on
        assert started, cli_log.read_text()[-4000:]
        run_id = started.group(1)

        status, deadline = "", time.monotonic() + timeout_s
        while not status.startswith("finished") and time.monotonic() < deadline:
            run_procs.scan()  # learn the sessions while their leaders are alive
            time.sleep(2)  # polling the SuperLink is all the CLI offers
            listed = flwr("list", "--run-id", run_id, "--format", "json")
            status = json.loads(listed[listed.index("{") :])["runs"][0]["status"]
        shown = flwr("log", run_id, "--show")[-5000:]
        assert status == "finished:completed", f"{status}\n{shown}\n{context()}"
        proc.wait(timeout=60)  # a streaming CLI ends with its run
        assert proc.returncode == 0, cli_log.read_text()[-4000:]
    finally:
        run_procs.stop(graceful=("flower-superlink",))

    left, superlinks = run_procs.scan("flower-superlink")
    assert not superlinks and not left, f"still running: {sorted(left)}"
    assert not port_open(http_port), "SuperLink port still open"
    return work


@pytest.mark.integration
def test_the_documented_secagg_command_runs_as_written(tmp_path):
    """docs/flwr-run.md's SecAgg+ command, as written (:func:`_run_as_written`)."""
    if not FLWR.exists():
        pytest.skip("the flwr CLI is not installed next to this Python")
    (doc_run,) = [
        r for r in documented() if r.doc.name == "flwr-run.md" and "secagg.enabled=true" in r.text
    ]
    work = _run_as_written(doc_run, tmp_path, SECAGG_TIMEOUT_S)

    (results,) = work.glob("runs/*-federated/results.json")
    res = json.loads(results.read_text())
    assert res["num_nodes"] == NUM_NODES and res["rounds"] == 5
    assert res["config"]["secagg"]["enabled"] is True
    assert res["secagg"]["plan"].startswith("hidden")  # nodes report liveness only
    assert [row["secagg.nodes"] for row in res["history"]] == [NUM_NODES] * 5


def _fedlora_commands():
    return [r for r in documented() if 'app="fedlora"' in r.text]


@pytest.mark.integration
def test_the_documented_fedlora_command_runs_as_written(tmp_path):
    """docs/flwr-run.md's federated-LoRA command (the same as docs/llm.md's), as written:
    the registered apps dispatch to the LoRA ServerApp and ClientApp, two sites of the
    toy data train the offline SmolLM2 for one round, and the app run is one MLflow run
    in the store of the directory the SuperLink works in."""
    if not FLWR.exists():
        pytest.skip("the flwr CLI is not installed next to this Python")
    pytest.importorskip("peft")
    runs = _fedlora_commands()
    assert sorted(r.doc.name for r in runs) == ["flwr-run.md", "llm.md"], [r.where for r in runs]
    assert len({r.text for r in runs}) == 1, "the two docs show different commands"
    work = _run_as_written(runs[0], tmp_path, FEDLORA_TIMEOUT_S)

    (results,) = work.glob("runs/*-fedlora/results.json")
    res = json.loads(results.read_text())
    assert res["num_sites"] == 2 and res["sites"]["split"] == "iid"
    assert res["task"]["model"] == "smollm2-135m-instruct" and res["task"]["data"] == "toy"
    (report,) = res["methods"].values()
    assert report["method"] == "fedit" and [r["round"] for r in report["rounds"]] == [1]
    assert report["faults_by_round"] == {}  # both sites answered
    assert 0.0 <= report["accuracy"] <= 1.0
    # results.json "config": the app's resolved settings (task, plans, sites) and the run config
    assert res["config"]["plans"][0]["local_steps"] == 2
    assert res["config"]["config"]["llm"]["federated"]["local_steps"] == 2
    assert (work / "mlflow.db").is_file() and res["mlflow"]["run_id"]
