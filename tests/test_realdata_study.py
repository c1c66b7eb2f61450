"""simulations/realdata_study.py: the figures it reads from results.json and the table it
prints beside FedMultimodal's published lines (no federation is run here)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from simulations.realdata_study import PUBLISHED, STUDIES, mlflow_experiment, table, task_scores
from simulations.study_runner import logged_runs
from tests.study_store import Store


def _results(f1: float, acc: float, bal: float, val_f1: float | None = None) -> dict:
    other = {"f1_macro": 0.0, "accuracy": 0.0, "balanced_accuracy": 0.0}
    mine = {"f1_macro": f1, "accuracy": acc, "balanced_accuracy": bal}
    res = {"test": {"f1_macro": 0.5, "by_task": {"activity": mine, "place": other}}}
    if val_f1 is not None:
        res["val"] = {"by_task": {"activity": {**mine, "f1_macro": val_f1}, "place": other}}
    return res


def test_scores_come_from_the_study_task_with_validation_beside_test():
    got = task_scores(_results(0.8, 0.9, 0.7), "activity", STUDIES["hapt"]["metrics"])
    assert got == {"f1_macro": 0.8, "accuracy": 0.9, "balanced_accuracy": 0.7}
    got = task_scores(_results(0.8, 0.9, 0.7, val_f1=0.6), "activity", STUDIES["hapt"]["metrics"])
    assert got["val_f1_macro"] == 0.6 and got["f1_macro"] == 0.8


def _runs(tmp_path: Path, version: str, f1s=(0.80, 0.90), protocol=None) -> list:
    """Federated HAPT runs at alpha 5.0, one per seed, in a real MLflow store."""
    store = Store(tmp_path)
    outs = []
    for seed, f1 in enumerate(f1s):
        res = {**_results(f1, 0.9, 0.9, val_f1=f1 - 0.1), "rounds": 10, "num_nodes": 21,
               "code_version": {"commit": version, "dirty": False}}  # fmt: skip
        if protocol is not None:
            res["protocol"] = protocol(seed)
        overrides = ["experiment=hapt_fedmultimodal", f"data.path={tmp_path}",
                     "method=federated", f"seed={seed}", "partition.alpha=5.0"]  # fmt: skip
        outs.append(store.log(mlflow_experiment("hapt"), overrides, res))
    return logged_runs(mlflow_experiment("hapt"), outs, store.uri)


ARGS = argparse.Namespace(study="hapt", alphas=[5.0])


def test_table_gives_val_and_test_over_seeds_beside_the_published_lines(tmp_path):
    md = table(_runs(tmp_path, "a" * 40), ARGS)
    line = next(x for x in md.splitlines() if "| federated |" in x)
    assert line.startswith("| partition.alpha=5.0 | federated | 2 | 0.750 ± 0.050 [")
    assert "| 0.850 ± 0.050 [" in line and "| 0.900 ± 0.000 [" in line and "| 10 | 21 |" in line
    published = [x for x in md.splitlines() if x.startswith("|") and "published" in x]
    assert len(published) == len(PUBLISHED[5.0]) and "0.8517" in published[1]
    assert f"Code version `{'a' * 40}`" in md and "Task `activity`" in md


def test_table_refuses_runs_of_two_code_versions(tmp_path):
    runs = _runs(tmp_path / "a", "a" * 40) + _runs(tmp_path / "b", "b" * 40)
    with pytest.raises(ValueError, match="2 code versions"):
        table(runs, ARGS)


def test_unknown_task_is_a_key_error():
    with pytest.raises(KeyError):
        task_scores(_results(0.8, 0.9, 0.7), "main_activity", STUDIES["extrasensory"]["metrics"])


def test_the_caption_names_the_round_rule_and_refuses_two_rules(tmp_path):
    def best_val(seed: int) -> dict:
        return {"select_round": "best_val", "selected_round": 7 + seed}

    chosen = _runs(tmp_path / "chosen", "a" * 40, protocol=best_val)
    md = table(chosen, ARGS)
    assert "best validation macro-F1 (`select_round=best_val`" in md and "rounds 7, 8" in md
    assert "last round's model" not in md
    last = _runs(tmp_path / "last", "a" * 40)
    assert "last round's model (nothing chosen on any split)" in table(last, ARGS)
    with pytest.raises(ValueError, match="select_round="):
        table(chosen[:1] + last[1:], ARGS)
