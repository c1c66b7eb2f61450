"""A deployed federation on one machine, with real processes, as docs/deploy.md walks it.

One SuperLink with TLS and SuperNode authentication (``fed-iotlm certs``), three
SuperNodes, each authenticated by its own registered key and reading its own site
directory (``fed-iotlm sites``) through ``--node-config``, run two rounds of the app
with ``flwr run``.  A SuperNode whose key was never registered is refused, and one
that does not trust the CA cannot connect.  Ports are picked at run time; every
process is stopped afterwards, whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fed_iotlm.federation.certs import Layout, generate
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

pytestmark = REAL_PROCESS_MARKS

CONNECTION = "fed-iotlm-deploy"
SITES = ("site-0", "site-1", "site-2")
QUICK = ("experiment=quick",)  # 3 nodes, 2 rounds; the sites' data must match it
RUN_TIMEOUT_S = 600  # a loaded 2-core machine needed ~4 min for the doc walk-through
REFUSAL_TIMEOUT_S = 90


@dataclass
class Federation:
    """The running SuperLink and what the tests need to reach it."""

    root: Path
    keys: Layout
    data: Path
    port: int
    tracker: ProcessTracker
    cli_env: dict[str, str]
    supernodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def flwr(self, *args: str, timeout: float = 60, env: dict | None = None):
        return subprocess.run(
            [str(FLWR), *args], cwd=REPO, env=env or self.cli_env, capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def supernode(self, name: str, key: str, *, ca: bool = True, node_config: str = ""):
        """Start a SuperNode (its own FLWR_HOME and Runtime API port); returns it and its log."""
        home = self.root / f"home-{name}"
        home.mkdir()
        port = free_port()
        self.tracker.markers.append(f"127.0.0.1:{port}")
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
        if ca:
            args += ["--root-certificates", str(self.keys.ca_cert)]
        args += ["--auth-supernode-private-key", str(self.keys.site_key(key))]
        args += ["--port", str(port), "--max-retries", "3"]
        if node_config:
            args += ["--node-config", node_config]
        log = self.root / f"{name}.log"
        proc = self.tracker.start(args, log, cwd=home, env=flower_env(home))
        return proc, log


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    generate(root / "certs", sites=[*SITES, "stranger", "no-ca"])
    keys = Layout(root / "certs")
    export_sites(compose(list(QUICK)), root / "data")

    port = free_port()
    tracker = ProcessTracker([str(root), f"127.0.0.1:{port}"])
    link_home, cli_home = root / "home-superlink", root / "home-cli"
    link_home.mkdir()
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{keys.ca_cert}"\n'
    )
    fed = Federation(root, keys, root / "data", port, tracker, flower_env(cli_home))
    try:
        superlink = tracker.start(
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(keys.ca_cert),
                "--ssl-certfile", str(keys.server_cert),
                "--ssl-keyfile", str(keys.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(port),
            ],
            root / "superlink.log", cwd=link_home, env=flower_env(link_home),
        )  # fmt: skip
        wait_for_port(port, timeout=60, proc=superlink)
        for site in (*SITES, "no-ca"):  # "stranger" is never registered
            reg = fed.flwr("supernode", "register", str(keys.site_pub(site)), CONNECTION,
                           "--name", site, "--format", "json")  # fmt: skip
            assert reg.returncode == 0, reg.stdout + reg.stderr
            assert json.loads(reg.stdout[reg.stdout.index("{") :])["success"] is True
        yield fed
    finally:
        left = tracker.stop()
        assert not left, f"processes still alive after teardown: {sorted(left)}"
        assert not port_open(port), "SuperLink port still open"


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return proc.poll()


def test_unregistered_supernode_is_refused(federation):
    proc, log = federation.supernode("stranger", "stranger", node_config="partition-id=0")
    code = _wait_exit(proc, REFUSAL_TIMEOUT_S)
    text = log.read_text()
    assert code not in (None, 0), f"an unregistered SuperNode was not refused:\n{text[-3000:]}"
    assert "Failed to activate SuperNode" in text, text[-3000:]


def test_supernode_without_the_ca_cannot_connect(federation):
    # its key IS registered: only the missing trust anchor stops it
    proc, log = federation.supernode("no-ca", "no-ca", ca=False, node_config="partition-id=0")
    code = _wait_exit(proc, REFUSAL_TIMEOUT_S)
    text = log.read_text()
    assert code not in (None, 0), f"a SuperNode without the CA connected:\n{text[-3000:]}"
    assert "CERTIFICATE_VERIFY_FAILED" in text, text[-3000:]

    # nor does the flwr CLI talk to the SuperLink without it
    no_ca = federation.root / "home-cli-no-ca"
    no_ca.mkdir()
    (no_ca / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "127.0.0.1:{federation.port}"\n'
    )
    listed = federation.flwr("supernode", "list", "x", env=flower_env(no_ca))
    assert listed.returncode != 0, listed.stdout + listed.stderr


def test_three_sites_run_two_rounds_with_tls_and_node_auth(federation, tmp_path):
    plans = {}
    for i, site in enumerate(SITES):
        meta = json.loads((federation.data / site / "meta.json").read_text())
        plans[str(i)] = list(meta["modalities"])
        node_config = (
            f'partition-id={i} data-dir="{federation.data / site}" '
            f'modalities="{",".join(plans[str(i)])}"'
        )
        federation.supernodes[site] = federation.supernode(site, site, node_config=node_config)

    out_dir = tmp_path / "out"
    overrides = " ".join([*QUICK, "mlflow.enabled=false", f"output_dir={out_dir}"])
    start = time.monotonic()
    run = federation.flwr(
        "run", ".", CONNECTION, "--run-config", f'overrides="{overrides}"', "--stream",
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    logs = "\n".join(
        f"--- {name} ---\n{log.read_text()[-1500:]}"
        for name, (_, log) in federation.supernodes.items()
    )
    context = f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n{logs}"
    assert run.returncode == 0, context
    run_id = next(
        (w for line in run.stdout.splitlines() if "started run" in line for w in line.split()
         if w.isdigit()), None,
    )  # fmt: skip
    assert run_id, context
    listed = federation.flwr("list", CONNECTION, "--run-id", run_id, "--format", "json")
    runs = json.loads(listed.stdout[listed.stdout.index("{") :])["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], listed.stdout + context

    res = json.loads((out_dir / "results.json").read_text())
    assert res["rounds"] == 2 and [h["round"] for h in res["history"]] == [1, 2]
    assert res["plan"] == plans  # reported by the sites themselves
    assert sorted(res["test"]["accuracy_by_node"]) == ["0", "1", "2"]
    assert res["test"]["accuracy"] > 0.25, res["test"]
    # scored by the sites on their own test splits, never on a server-side copy
    assert res["evaluation"] == "nodes" and res["test"]["nodes"] == 3, res["test"]
    assert res["test"]["accuracy_by_modality"] == {}, res["test"]
    assert all(h["evaluated_nodes"] == 3 for h in res["history"]), res["history"]
    assert (out_dir / "checkpoint" / "state.json").is_file()

    nodes = federation.flwr("supernode", "list", CONNECTION, "--format", "json")
    assert nodes.returncode == 0, nodes.stdout + nodes.stderr
    print(f"deployed run: 2 rounds in {elapsed:.1f} s")
