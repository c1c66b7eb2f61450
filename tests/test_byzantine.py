"""A sign-flip attacker in a real Flower simulation, and the Byzantine study's plan."""

from __future__ import annotations

import json

import pytest

from fed_iotlm.config_schema import node_count
from fed_iotlm.settings import compose
from simulations.byzantine_study import RULES, study_points, write_report
from simulations.run import run_experiment


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


def test_study_plan_covers_clean_fedavg_and_each_rule_under_each_attack(tmp_path):
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
    fake = {"accuracy": 0.5, "code_version": {"commit": "abc123", "dirty": False}}
    table = {"none": {"mean": [fake, fake]}, "scale": {"median": [fake], "krum": [fake]}}
    doc = tmp_path / "byzantine.md"
    command = "python -m simulations.byzantine_study --extra rounds=3"
    write_report(table, doc, tmp_path, seeds=2, extra=["rounds=3"], command=command)
    text = doc.read_text()
    assert "| no attack | 0.500 ± 0.000 |  |  |" in text
    assert "| 25% scaled ×10 |  | 0.500 ± 0.000 | 0.500 ± 0.000 |" in text
    assert f"Reproduce: `{command}`" in text and "extra overrides `rounds=3`" in text
    assert "Produced by code version `abc123`" in text
    other = {**fake, "code_version": {"commit": "def456", "dirty": False}}
    with pytest.raises(ValueError, match="2 code versions"):  # a table never mixes versions
        write_report({"none": {"mean": [fake, other]}}, doc, tmp_path, 2, [], command)
