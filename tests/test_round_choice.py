"""simulations/round_choice.py: the round validation would choose, read from histories."""

from __future__ import annotations

import json

import pytest

from simulations.round_choice import chosen_round, main, summarise


def _history(val: list[float], test: list[float], key: str = "val_accuracy") -> list[dict]:
    return [
        {"round": i + 1, "accuracy": t, key: v}
        for i, (v, t) in enumerate(zip(val, test, strict=True))
    ]


def test_the_first_best_validation_round_is_chosen_whatever_test_says():
    row, key = chosen_round(_history([0.5, 0.8, 0.8, 0.6], [0.9, 0.4, 0.95, 0.99]))
    assert (row["round"], row["accuracy"], key) == (2, 0.4, "val_accuracy")


def test_val_macro_f1_is_preferred_where_every_round_has_it():
    rows = _history([0.9, 0.1], [0.0, 1.0])
    for r, f1 in zip(rows, [0.2, 0.7], strict=True):
        r["val_f1_macro"] = f1
    row, key = chosen_round(rows)
    assert (row["round"], key) == (2, "val_f1_macro")


def test_a_history_without_validation_is_refused():
    with pytest.raises(ValueError, match="no per-round val_accuracy"):
        chosen_round([{"round": 1, "accuracy": 0.5}])


def _run(tmp_path, name, method, seed, val, test, bind=True):
    d = tmp_path / name
    d.mkdir()
    res = {"method": method, "seed": seed, "history": _history(val, test),
           "config": {"binding": {"bind": bind}, "partition": {"alpha": 0.1}}}  # fmt: skip
    (d / "results.json").write_text(json.dumps(res))


def test_groups_by_method_as_the_tables_name_it(tmp_path, capsys):
    _run(tmp_path, "a", "mmbind", 0, [0.1, 0.9], [0.5, 0.7])
    _run(tmp_path, "b", "mmbind", 1, [0.9, 0.1], [0.6, 0.8])
    _run(tmp_path, "c", "mmbind", 0, [0.1, 0.9], [0.3, 0.4], bind=False)
    assert main([str(tmp_path)]) == 0
    groups = {g["method"]: g for g in map(json.loads, capsys.readouterr().out.splitlines())}
    assert groups["mmbind"]["chosen_accuracy"] == [0.65, 0.0707]
    assert groups["mmbind"]["last_accuracy"] == [0.75, 0.0707]
    assert groups["mmbind"]["chosen_rounds"] == [2, 1] and groups["mmbind"]["point"] == "alpha=0.1"
    assert groups["ssl_spine"]["chosen_accuracy"] == [0.4, 0.0]


def test_summarise_of_nothing_is_empty_and_a_folder_without_runs_is_an_error(tmp_path):
    assert summarise([]) == []
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
