"""simulations/realdata_study.py: the figures it reads from results.json and the table it
prints beside FedMultimodal's published lines (no federation is run here)."""

from __future__ import annotations

import argparse

import pytest

from simulations.realdata_study import PUBLISHED, STUDIES, table, task_scores


def _results(f1: float, acc: float, bal: float) -> dict:
    other = {"f1_macro": 0.0, "accuracy": 0.0, "balanced_accuracy": 0.0}
    mine = {"f1_macro": f1, "accuracy": acc, "balanced_accuracy": bal}
    return {"test": {"f1_macro": 0.5, "by_task": {"activity": mine, "place": other}}}


def test_scores_come_from_the_study_task():
    got = task_scores(_results(0.8, 0.9, 0.7), "activity", STUDIES["hapt"]["metrics"])
    assert got == {"f1_macro": 0.8, "accuracy": 0.9, "balanced_accuracy": 0.7}


def test_table_gives_mean_and_std_over_seeds_beside_the_published_lines():
    args = argparse.Namespace(study="hapt", alphas=[5.0])
    rows = [
        {"point": "partition.alpha=5.0", "method": "federated", "seed": s, "rounds": 10,
         "nodes": 21, **task_scores(_results(f1, 0.9, 0.9), "activity", STUDIES["hapt"]["metrics"])}
        for s, f1 in enumerate((0.80, 0.90))
    ]  # fmt: skip
    md = table(rows, args)
    line = next(x for x in md.splitlines() if "| federated |" in x)
    assert "| 2 | 0.8500 ± 0.0500 | 0.9000 ± 0.0000 |" in line
    published = [x for x in md.splitlines() if "published" in x]
    assert len(published) == len(PUBLISHED[5.0]) and "0.8517" in published[1]
    assert "Code version " in md and "task `activity`" in md
    with pytest.raises(KeyError):
        task_scores(_results(0.8, 0.9, 0.7), "main_activity", STUDIES["extrasensory"]["metrics"])
