"""The one study-table renderer (``fed_iotlm.report.study_table``) on a real sqlite
MLflow store: cells over seeds, one code version per table, unfinished runs counted."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import t as student_t

from fed_iotlm.report.runs import Run, load_runs
from fed_iotlm.report.study_table import (
    Column,
    interval,
    label_of,
    matches,
    result,
    seeds_column,
    study_table,
)
from tests.study_store import Store, version

EXPERIMENT = "table-test"


def _results(accuracy: float, commit: str = "abc1234") -> dict:
    return {"test": {"accuracy": accuracy}, "code_version": version(commit)}


def _runs(store: Store) -> list[Run]:
    return load_runs(store.uri, EXPERIMENT, include_unfinished=True)[0]


def _method(run: Run) -> tuple[str]:
    return (run.params["method"],)


COLUMNS = [seeds_column(), Column("test", value=result("test", "accuracy"))]


def test_three_seeds_give_mean_std_and_the_student_t_interval(tmp_path):
    store = Store(tmp_path)
    accs = [0.5, 0.6, 0.8]
    for seed, acc in enumerate(accs):
        store.log(EXPERIMENT, ["method=local", f"seed={seed}"], _results(acc))
    store.log(EXPERIMENT, ["method=federated"], _results(0.9))
    table = study_table(_runs(store), _method, ["method"], COLUMNS)
    # computed here from the definitions: population std over seeds, and the 95 %
    # interval of the mean from the sample std and t with n-1 = 2 degrees of freedom
    mean, std = np.mean(accs), np.std(accs)
    half = student_t.ppf(0.975, 2) * np.std(accs, ddof=1) / np.sqrt(3)
    assert table.rows == [
        ["local", "3", f"{mean:.3f} ± {std:.3f} [{mean - half:.3f}, {mean + half:.3f}]"],
        ["federated", "1", "0.900"],  # one seed: its value, no spread, no interval
    ]
    assert table.rows[0][2] == "0.633 ± 0.125 [0.254, 1.013]"  # the same, by hand
    assert table.columns == ["method", "seeds", "test"]
    assert "Code version `abc1234`: 4 runs." in table.caption
    assert "not FINISHED" not in table.caption


def test_a_table_refuses_runs_of_two_code_versions(tmp_path):
    store = Store(tmp_path)
    store.log(EXPERIMENT, ["method=local", "seed=0"], _results(0.5, "abc1234"))
    store.log(EXPERIMENT, ["method=local", "seed=1"], _results(0.6, "def5678"))
    with pytest.raises(ValueError, match=r"2 code versions \(abc1234, def5678\)"):
        study_table(_runs(store), _method, ["method"], COLUMNS)
    # a table of the runs of one version is fine: the refusal is about the table's runs
    only = study_table(
        _runs(store), lambda r: _method(r) if r.params["seed"] == "0" else None,
        ["method"], COLUMNS,
    )  # fmt: skip
    assert only.rows == [["local", "1", "0.500"]]


def test_runs_not_finished_are_left_out_and_counted(tmp_path):
    store = Store(tmp_path)
    store.log(EXPERIMENT, ["method=local", "seed=0"], _results(0.5))
    store.log(EXPERIMENT, ["method=local", "seed=1"], _results(0.1, "other99"), status="FAILED")
    store.log(EXPERIMENT, ["method=local", "seed=2"], _results(0.1), status="KILLED")
    table = study_table(_runs(store), _method, ["method"], COLUMNS, caption="Test accuracy.")
    assert table.rows == [["local", "1", "0.500"]]  # the failed run's version is not counted
    assert table.caption.startswith("Test accuracy. Code version `abc1234`: 1 runs (2 not FINISHED")


def test_a_column_is_a_figure_or_a_text_and_cells_skip_missing_figures():
    with pytest.raises(ValueError, match="exactly one"):
        Column("x")
    assert interval([None, None]) == "–"
    assert interval([0.5, None]) == "0.500"


def test_a_run_is_labelled_by_the_overrides_it_was_made_with():
    params = {"method": "mmbind", "model.fusion": "late", "binding.bind": "False",
              "binding.pseudo_weight": "0.0", "strategy.name": "fedadam",
              "partition.plan": "[['imu', 'audio'], ['imu']]"}  # fmt: skip
    assert matches(params, ["binding.pseudo_weight=0", "binding.bind=false"])
    assert matches(params, ["strategy=fedadam", "partition.plan=[[imu,audio],[imu]]"])
    assert not matches(params, ["partition.plan=[[imu],[imu]]"])
    assert not matches(params, ["data.site_shift=0.5"])  # never logged: not this run
    labels = {"mmbind": ["method=mmbind", "model.fusion=late"],
              "ssl_spine": ["method=mmbind", "binding.bind=false", "model.fusion=late"],
              "local": ["method=local"]}  # fmt: skip
    assert label_of(params, labels) == "ssl_spine"  # the most specific match
    assert label_of({"method": "fedavg"}, labels) is None


def test_the_cli_prints_a_studys_table_from_the_store(tmp_path, capsys):
    from fed_iotlm.cli import main
    from simulations.shift_study import METHODS, MLFLOW_EXPERIMENT, point_overrides

    store = Store(tmp_path)
    by_node = {str(n): 0.5 if n < 3 else 0.9 for n in range(8)}
    for seed in (0, 1):
        overrides = ["experiment=shift_study", *METHODS["personal"], f"seed={seed}",
                     *point_overrides(0.5, None)]  # fmt: skip
        res = {"test": {"accuracy": 0.8, "accuracy_by_node": by_node},
               "code_version": version("abc1234")}  # fmt: skip
        store.log(MLFLOW_EXPERIMENT, overrides, res, status="FINISHED" if seed else "KILLED")
    code = main(["report", MLFLOW_EXPERIMENT, "--tracking-uri", store.uri, "--study", "shift"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Code version `abc1234`: 1 runs (1 not FINISHED left out)." in out
    assert "| severity | method | seeds | shifted nodes | other nodes |" in out
    assert "| 0.5 | personal | 1 | 0.500 | 0.900 | 0.800 |" in out
    assert main(["report", "nope", "--tracking-uri", store.uri, "--study", "shift"]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
