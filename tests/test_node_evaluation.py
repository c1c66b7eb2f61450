"""Evaluation through the nodes (server/node_evaluation.py): the deployed case scores
every round on the nodes' own test splits, weighted by their counts, and results.json
says so; a simulation keeps scoring on the server's copy unless configured."""

from __future__ import annotations

import json
import math
import pickle
import uuid
from pathlib import Path

import pytest

from server.node_evaluation import NodeScores, evaluation_mode


def test_where_a_run_is_scored():
    assert evaluation_mode({}, deployed=False) == "server"
    assert evaluation_mode({}, deployed=True) == "nodes"
    assert evaluation_mode({"evaluation": "nodes"}, deployed=False) == "nodes"
    with pytest.raises(ValueError, match="not theirs"):
        evaluation_mode({"evaluation": "server"}, deployed=True)
    with pytest.raises(ValueError, match="evaluation='everywhere'"):
        evaluation_mode({"evaluation": "everywhere"}, deployed=False)


def test_node_figures_are_weighted_by_their_test_counts():
    scores = NodeScores(
        {
            0: {"accuracy": 0.9, "loss": 0.2, "num-examples": 30.0, "accuracy.activity": 0.8},
            1: {"accuracy": 0.3, "loss": 1.4, "num-examples": 10.0, "accuracy.activity": 0.2},
            2: {"accuracy": 0.5, "loss": 0.9, "num-examples": 0.0},  # nothing to score
        }
    )
    out = scores.weighted()
    assert out["accuracy"] == pytest.approx((0.9 * 30 + 0.3 * 10) / 40)
    assert out["loss"] == pytest.approx((0.2 * 30 + 1.4 * 10) / 40)
    assert out["by_task"]["activity"]["accuracy"] == pytest.approx((0.8 * 30 + 0.2 * 10) / 40)
    assert (out["num_examples"], out["nodes"]) == (40, 2)
    assert scores.accuracy_by_node() == {"0": 0.9, "1": 0.3, "2": 0.5}


def test_the_rounds_val_accuracy_weighs_nodes_by_their_validation_counts():
    """Per round as in results.json's ``val``: by validation count, not test count (a
    node with many test samples and few validation ones must not dominate it)."""
    scores = NodeScores(
        {
            0: {
                "accuracy": 0.9,
                "loss": 0.2,
                "num-examples": 90.0,
                "val_accuracy": 1.0,
                "val_examples": 10.0,
            },
            1: {
                "accuracy": 0.3,
                "loss": 1.4,
                "num-examples": 10.0,
                "val_accuracy": 0.0,
                "val_examples": 30.0,
            },
        }
    )
    assert scores.val_accuracy() == pytest.approx(10 / 40)
    assert scores.val_accuracy() == scores.weighted_val()["accuracy"]
    assert "val_accuracy" not in scores.weighted()  # the test block carries no val figure
    assert math.isnan(NodeScores({0: {"accuracy": 0.5, "loss": 1.0}}).val_accuracy())


def test_without_counts_every_node_weighs_the_same():
    """Under SecAgg+ nodes send no count: the mean is over nodes, and says so."""
    scores = NodeScores({0: {"accuracy": 0.9, "loss": 0.2}, 1: {"accuracy": 0.3, "loss": 1.0}})
    out = scores.weighted()
    assert out["accuracy"] == pytest.approx(0.6) and out["weighting"] == "nodes"
    assert "num_examples" not in out


def _evaluate_recorder(directory: Path):
    """A client mod keeping every evaluate reply (its round and metrics)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "evaluate":
            config = msg.content.config_records.get("config", {})
            entry = {
                "round": int(config.get("server-round", 0)),
                "metrics": dict(reply.content["metrics"]),
            }
            (directory / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(entry))
        return reply

    return mod


@pytest.mark.integration
def test_each_round_is_scored_by_the_nodes_on_their_own_test_splits(quick_cfg, tmp_path):
    from simulations.run import run_experiment

    capture = tmp_path / "evaluate"
    capture.mkdir()
    cfg = quick_cfg("evaluation=nodes", "rounds=2", "train.epochs=1", "mlflow.enabled=false")
    res = json.loads(
        run_experiment(cfg, tmp_path / "run", [_evaluate_recorder(capture)]).read_text()
    )
    entries = [pickle.loads(p.read_bytes()) for p in capture.iterdir()]
    assert res["evaluation"] == "nodes"
    by_round: dict[int, list[dict]] = {}
    for e in entries:
        by_round.setdefault(e["round"], []).append(e["metrics"])
    assert sorted(by_round) == [0, 1, 2]  # rounds 1, 2 and the final evaluation (0)
    assert all(len(v) == 3 for v in by_round.values())

    def weighted(replies: list[dict], key: str) -> float:
        n = sum(r["num-examples"] for r in replies)
        return sum(r[key] * r["num-examples"] for r in replies) / n

    for h in res["history"]:  # every round's figure is the nodes' weighted one
        assert h["accuracy"] == pytest.approx(weighted(by_round[h["round"]], "accuracy"))
        assert h["loss"] == pytest.approx(weighted(by_round[h["round"]], "loss"))
        assert h["evaluated_nodes"] == 3
    test = res["test"]  # and the final report holds the nodes' figures only
    assert test["accuracy"] == pytest.approx(weighted(by_round[0], "accuracy"))
    assert test["num_examples"] == sum(r["num-examples"] for r in by_round[0])
    assert test["accuracy_by_modality"] == {}  # the server scored nothing itself
    assert test["accuracy_by_node"] == {
        str(int(r["partition-id"])): pytest.approx(r["accuracy"]) for r in by_round[0]
    }
