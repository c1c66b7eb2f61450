"""A sign-flip attacker in a real Flower simulation, and the Byzantine study's plan."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from fed_iotlm.cli import main
from fed_iotlm.config_schema import node_count
from fed_iotlm.settings import compose
from simulations.byzantine_study import MLFLOW_EXPERIMENT, RULES, study_points, write_report
from simulations.run import run_experiment
from simulations.study_runner import logged_runs
from tests.study_store import Store, version


@pytest.mark.integration
def test_sign_flip_attacker_is_rejected_and_median_aggregates_the_rest(quick_cfg, tmp_path, capfd):
    # quick: 3 nodes, 2 rounds; node 0 attacks (round(0.34 · 3) = 1).  Honest update norms
    # are ~4 and the attacker's ~10x larger, so a bound of 20 separates them.
    cfg = quick_cfg(
        "mlflow.enabled=false",
        "attack.fraction=0.34",
        "attack.kind=sign_flip",
        "strategy.aggregation=median",
        "strategy.checks.max_update_norm=20",
    )
    path = run_experiment(cfg, tmp_path / "run")
    # the ServerApp leaves printing results.json's path to the command that ran it
    # (fed-iotlm run printed it twice)
    assert str(path) not in capfd.readouterr().out
    res = json.loads(path.read_text())
    assert [h["round"] for h in res["history"]] == [1, 2]
    for row in res["history"]:
        assert row["accepted_updates"] == 2 and row["rejected_updates"] == 1
        assert row["rejected.norm"] == 1
        assert 0 < row["update_norm_median"] < 20 < row["update_norm_max"]
    robustness = res["robustness"]
    assert robustness["aggregation"]["rule"] == "median"
    for rnd in ("1", "2"):
        (reason,) = robustness["rejections_by_round"][rnd]
        assert reason.startswith("node 0 rejected (norm)")
        # the dropped node holds no group that round: imu is node 1's alone
        holders = res["holders_by_round"][rnd]
        assert all("0" not in h for h in holders.values())
        assert holders["enc.imu"] == ["1"]


def test_study_plan_covers_clean_fedavg_and_each_rule_under_each_attack():
    points = study_points(list(RULES), ["scale", "sign_flip"], ["mean"])
    assert [(a, r) for a, r, _ in points] == [
        ("none", "mean"),
        *[(a, r) for a in ("scale", "sign_flip") for r in RULES],
    ]
    for attack, rule, overrides in points:
        cfg = compose(["experiment=default", *overrides])  # every override is a valid key
        assert cfg["strategy"]["aggregation"] == rule
        assert cfg["attack"]["kind"] == attack
        assert cfg["attack"]["fraction"] == (0.0 if attack == "none" else 0.25)  # 2 of 8
        assert node_count(cfg["partition"]) == 8


def test_the_study_page_is_read_back_from_the_mlflow_store(tmp_path):
    store = Store(tmp_path)
    points = {(a, r): o for a, r, o in study_points(list(RULES), ["scale"], ["mean"])}
    outs = []
    for (attack, rule), accs in {("none", "mean"): [0.5, 0.7], ("scale", "median"): [0.4],
                                 ("scale", "krum"): [0.6]}.items():  # fmt: skip
        for seed, acc in enumerate(accs):
            overrides = ["experiment=default", "method=federated", f"seed={seed}"]
            res = {"test": {"accuracy": acc}, "code_version": version("abc1234")}
            outs.append(store.log(MLFLOW_EXPERIMENT, [*overrides, *points[attack, rule]], res))
    # a run of another code version in the same experiment, not one of this study's
    store.log(MLFLOW_EXPERIMENT, ["experiment=default"], {"code_version": version("0ld0ld0")})
    runs = logged_runs(MLFLOW_EXPERIMENT, outs, tracking_uri=store.uri)
    doc = tmp_path / "byzantine.md"
    command = "python -m simulations.byzantine_study --extra rounds=3"
    write_report(runs, doc, tmp_path, seeds=2, extra=["rounds=3"], command=command)
    text = doc.read_text()
    assert "| attack | `mean` | `median` | `krum` |" in text  # rules without runs: no column
    assert "| no attack | 0.600 ± 0.100 [-0.671, 1.871] | – | – |" in text
    assert "| 25% scaled ×10 | – | 0.400 | 0.600 |" in text
    assert f"Reproduce: `{command}`" in text and "extra overrides `rounds=3`" in text
    assert "Code version `abc1234`: 4 runs." in text
    # the same table from the CLI, for the experiment as a whole: it has two versions
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["report", MLFLOW_EXPERIMENT, "--tracking-uri", store.uri,
                     "--study", "byzantine"])  # fmt: skip
    assert code == 2 and "2 code versions (0ld0ld0, abc1234)" in err.getvalue()
    with pytest.raises(ValueError, match="1 of the study's runs are not in MLflow"):
        logged_runs(MLFLOW_EXPERIMENT, [*outs, tmp_path / "never"], tracking_uri=store.uri)
