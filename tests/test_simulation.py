"""A real Flower simulation (Ray backend) end to end, plus the in-process baselines."""

from __future__ import annotations

import json

import pytest

from fed_iotlm.federation.bundle import load_bundle
from simulations.run import run_experiment

CHANCE = (1 / 8 + 1 / 4) / 2  # mean over the two synthetic tasks
SCHEMA_KEYS = {
    "method",
    "dataset",
    "seed",
    "num_nodes",
    "rounds",
    "plan",
    "test",
    "history",
    "comm",
    "wall_s",
}


def _check_schema(res: dict, method: str, nodes: int, rounds: int) -> None:
    assert set(res) >= SCHEMA_KEYS
    assert res["method"] == method and res["num_nodes"] == nodes and res["rounds"] == rounds
    assert [h["round"] for h in res["history"]] == list(range(1, rounds + 1))
    test = res["test"]
    assert {"accuracy", "accuracy_by_modality", "accuracy_by_node", "by_task"} <= set(test)
    assert set(test["accuracy_by_node"]) == {str(i) for i in range(nodes)}
    assert set(test["by_task"]) == {"activity", "location"}


@pytest.mark.integration
def test_flower_simulation_aggregates_each_group_over_its_holders(quick_cfg, tmp_path):
    cfg = quick_cfg(f"output_dir={tmp_path}/run")
    path = run_experiment(cfg, tmp_path / "run")
    res = json.loads(path.read_text())
    _check_schema(res, "federated", nodes=3, rounds=2)
    # plan: node 0 [imu, audio], node 1 [imu, depth], node 2 [thermal]
    for rnd in ("1", "2"):
        holders = {g: sorted(h) for g, h in res["holders_by_round"][rnd].items()}
        assert holders == {
            "enc.imu": ["0", "1"],
            "enc.audio": ["0"],
            "enc.depth": ["1"],
            "enc.thermal": ["2"],
            "fusion": ["0", "1", "2"],
            "head.activity": ["0", "1", "2"],
            "head.location": ["0", "1", "2"],
        }
    assert res["test"]["accuracy"] > CHANCE + 0.15
    # nodes upload only what they hold: less than the full model on average
    assert res["comm"]["bytes_up_per_node_round"] < res["comm"]["model_bytes"]
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 0

    # the bundle rebuilds the same model
    model, meta = load_bundle(tmp_path / "run" / "bundle")
    assert meta["method"] == "federated" and set(model.enc) == {"imu", "audio", "depth", "thermal"}

    # and the run is in MLflow's real tracking store
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=cfg["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name(cfg["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    logged = runs[0].data.metrics
    assert logged["test_accuracy"] == pytest.approx(res["test"]["accuracy"])
    assert len(client.get_metric_history(runs[0].info.run_id, "accuracy")) == 2


@pytest.mark.integration
@pytest.mark.parametrize("method", ["local", "centralized", "fedavg"])
def test_reference_methods_write_the_same_schema(quick_cfg, tmp_path, method):
    cfg = quick_cfg(f"method={method}", "mlflow.enabled=false")
    res = json.loads(run_experiment(cfg, tmp_path).read_text())
    _check_schema(res, method, nodes=3, rounds=2)
    assert res["test"]["accuracy"] > CHANCE
