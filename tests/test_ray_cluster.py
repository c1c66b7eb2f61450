"""The simulation on an existing Ray cluster (``simulation.ray_address``).

The integration tests start a real ``ray start --head`` as a separate process, from
another directory and without this repo on its ``PYTHONPATH``, and run a federation on
it. A client mod records, inside every Ray worker that ran a node, which cluster it
belongs to and where it imported the project from, so the tests fail if the run
quietly started its own Ray or the workers found the code by accident.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from simulations.ray_cluster import (
    attached,
    backend_config,
    check_capacity,
    for_cluster,
    ray_settings,
    runtime_env,
)
from tests.flower_procs import REPO, free_port

# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("sim", "named"),
    [
        ({"ray_address": "headnode"}, "simulation.ray_address='headnode'"),
        ({"ray_address": "10.0.0.5:70000"}, "simulation.ray_address='10.0.0.5:70000'"),
        ({"ray_address": ":6379"}, "simulation.ray_address=':6379'"),
        ({"ray_address": "ray://10.0.0.5:10001"}, "Ray Client addresses"),
        ({"ray_address": "10.0.0.5:6379", "num_cpus": 4}, "simulation.num_cpus=4"),
        ({"num_cpus": 0}, "simulation.num_cpus=0"),
        ({"gpus_per_node": -1}, "simulation.gpus_per_node=-1"),
        ({"gpus_per_node": "half"}, "simulation.gpus_per_node='half'"),
        ({"cpus_per_node": 0}, "simulation.cpus_per_node=0"),
        ({"ray_connect_timeout_s": 0}, "simulation.ray_connect_timeout_s=0"),
    ],
)
def test_bad_simulation_settings_name_the_key(sim, named):
    with pytest.raises(ValueError) as err:
        ray_settings(sim)
    assert named in str(err.value)


def test_private_ray_never_joins_another_cluster_and_attaching_passes_no_sizes():
    private = backend_config(ray_settings({"num_cpus": 2, "gpus_per_node": 0.25}))
    # "local": ignore RAY_ADDRESS and the last `ray start` on this machine
    assert private["init_args"]["address"] == "local"
    assert private["init_args"]["num_cpus"] == 2
    assert private["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}

    attach = backend_config(ray_settings({"ray_address": "10.0.0.5:6379", "gpus_per_node": 0.5}))
    assert attach["init_args"] == {}  # ray.init refuses num_cpus etc. for an existing cluster
    assert attach["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}


def test_shipped_code_is_the_repo_without_outputs():
    env = runtime_env(ship_code=True)
    assert Path(env["working_dir"]) == REPO and (REPO / "configs" / "config.yaml").is_file()
    assert {".git", ".venv", "outputs", "runs", "mlruns", "mlflow.db"} <= set(env["excludes"])
    same_paths = runtime_env(ship_code=False)
    assert same_paths["env_vars"]["PYTHONPATH"].split(":")[0] == next(p for p in sys.path if p)


def test_capacity_counts_every_machine_and_refuses_gpu_shares_without_gpus():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 8.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},  # left the cluster
    ]
    assert check_capacity(ray_settings({}), nodes, "h:1") == 4 + 8
    # a quarter GPU each: 4 on the GPU machine, none where there is no GPU
    assert check_capacity(ray_settings({"gpus_per_node": 0.25}), nodes, "h:1") == 4
    with pytest.raises(ValueError, match=r"h:1 cannot hold one .*GPU=0"):
        check_capacity(ray_settings({"gpus_per_node": 0.5}), nodes[1:], "h:1")


def test_relative_dataset_path_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"data": {"name": "npz", "path": "my_dataset"}, "seed": 0}
    assert for_cluster(cfg)["data"]["path"] == str(tmp_path / "my_dataset")
    assert cfg["data"]["path"] == "my_dataset"  # the caller's dict is left alone
    absolute = {"data": {"name": "npz", "path": "/data/x"}}
    assert for_cluster(absolute) is absolute


def test_address_nobody_listens_on_fails_at_once_naming_it(quick_cfg, tmp_path):
    import ray

    from simulations.run import run_experiment

    address = f"127.0.0.1:{free_port()}"  # bound, released: nobody listens
    cfg = quick_cfg(f"simulation.ray_address={address}", "mlflow.enabled=false")
    with pytest.raises(ConnectionError) as err:
        run_experiment(cfg, tmp_path / "run")
    assert f"simulation.ray_address='{address}'" in str(err.value)
    assert "ray start --head" in str(err.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "run" / "results.json").exists()


def test_auto_follows_ray_address_and_names_what_it_resolved_to(quick_cfg, tmp_path, monkeypatch):
    from simulations.run import run_experiment

    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    cfg = quick_cfg("simulation.ray_address=auto", "mlflow.enabled=false")
    # Ray spells loopback as this machine's address; the port is what must survive
    with pytest.raises(ConnectionError, match=rf"ray_address='auto' \(= [^)]+:{port}\): no Ray"):
        run_experiment(cfg, tmp_path / "run")


# ---------------------------------------------------------------------- a real cluster


def _worker_recorder(path: Path):
    """A client mod appending, per message a node handles, what the Ray worker running
    it sees: its cluster (GCS address), node, GPU ids, and where ``fed_iotlm`` came from."""

    def mod(msg, context, call_next):
        import os

        import ray

        import fed_iotlm

        rc = ray.get_runtime_context()
        record = {
            "type": msg.metadata.message_type,
            "gcs": rc.gcs_address,
            "node": rc.get_node_id(),
            "gpus": rc.get_accelerator_ids().get("GPU", []),
            "code": fed_iotlm.__file__,
            "cwd": os.getcwd(),
        }
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return call_next(msg, context)

    return mod


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A 2-CPU head with one (declared) GPU, started from an empty directory."""
    from ray import cloudpickle

    from tests.ray_head import start_head, stop_head

    # the workers cannot import this test module: ship the recorder by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    head = start_head(cwd=tmp_path_factory.mktemp("head_cwd"), num_cpus=2, num_gpus=1)
    try:
        yield head
    finally:
        survivors = stop_head(head)
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        assert not survivors, f"Ray head processes survived: {survivors}"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_federation_runs_on_the_attached_cluster_with_shipped_code(ray_head, quick_cfg, tmp_path):
    from simulations.run import run_experiment

    cfg = quick_cfg(
        f"simulation.ray_address={ray_head.address}",
        "simulation.gpus_per_node=0.5",
        "rounds=1",
        "mlflow.enabled=false",
    )
    log = tmp_path / "workers.jsonl"
    path = run_experiment(cfg, tmp_path / "run", [_worker_recorder(log)])

    res = json.loads(path.read_text())
    assert path == tmp_path / "run" / "results.json"
    assert res["method"] == "federated" and [h["round"] for h in res["history"]] == [1]
    records = _records(log)
    assert {r["type"] for r in records} >= {"train"}
    assert len([r for r in records if r["type"] == "train"]) == 3  # nodes x rounds
    # every node ran in a worker of THAT cluster (a private Ray has another GCS address)
    assert {r["gcs"] for r in records} == {ray_head.address}
    # ... holding the GPU share it asked for (the head declares one GPU)
    assert all(r["gpus"] == ["0"] for r in records)
    # ... with the project imported from the copy shipped with the job, not from this repo
    for r in records:
        code = Path(r["code"]).resolve()
        assert code.is_relative_to(ray_head.temp_dir.resolve()), r
        assert not code.is_relative_to(REPO), r
    # the cluster outlives the run that used it
    assert ray_head.alive()


@pytest.mark.integration
def test_private_run_ignores_ray_address_in_the_environment(
    ray_head, quick_cfg, tmp_path, monkeypatch
):
    """``simulation.ray_address=null`` means a private Ray even where ``RAY_ADDRESS``
    names a running cluster (plain ``ray.init()`` would join it)."""
    from simulations.run import run_experiment

    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)
    cfg = quick_cfg("rounds=1", "mlflow.enabled=false", "simulation.num_cpus=2")
    log = tmp_path / "workers.jsonl"
    run_experiment(cfg, tmp_path / "run", [_worker_recorder(log)])

    records = _records(log)
    assert len([r for r in records if r["type"] == "train"]) == 3
    assert ray_head.address not in {r["gcs"] for r in records}


@pytest.mark.integration
def test_attaching_refuses_while_this_process_is_joined_elsewhere(ray_head):
    import ray

    ray.init(address=ray_head.address, logging_level="ERROR")
    try:
        with (
            pytest.raises(RuntimeError, match="already initialised"),
            attached(ray_settings({"ray_address": f"127.0.0.1:{free_port()}"})),
        ):
            pass
    finally:
        ray.shutdown()


def test_the_lora_federation_starts_a_private_local_ray_like_the_federation():
    """``address="local"``: without it ``ray.init`` silently joins whatever cluster
    ``RAY_ADDRESS`` or the last ``ray start`` here names (the LoRA study once did)."""
    from simulations.fedlora_study import lora_backend_config

    cfg = lora_backend_config(0.5)
    assert cfg["init_args"]["address"] == "local"
    assert cfg["init_args"]["include_dashboard"] is False
    assert cfg["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    with pytest.raises(ValueError, match="gpus_per_node"):
        lora_backend_config(-1.0)
