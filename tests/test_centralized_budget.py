"""The centralized reference takes the whole federation's steps per round under
``train.steps``, so an equal-budget table does not starve it (as centralized MMBind)."""

import json

PLAN = "partition.plan=[[imu,audio],[imu,depth],[imu,depth]]"


def test_centralized_takes_steps_times_nodes_per_round(quick_cfg, tmp_path):
    from fed_iotlm.baselines import run_centralized

    cfg = quick_cfg("method=centralized", PLAN, "mlflow.enabled=false", "rounds=2", "train.steps=3")
    res = json.loads(run_centralized(cfg, tmp_path).read_text())
    assert [r["steps"] for r in res["history"]] == [9, 9]  # steps x 3 nodes per round
    assert res["budget"]["steps_per_round"] == 9
    assert res["budget"]["examples_per_round"] == 9 * cfg["train"]["batch_size"]
