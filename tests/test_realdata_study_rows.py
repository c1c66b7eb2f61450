"""simulations/realdata_study.py's further rows and points: the withheld-modality
ExtraSensory study, the binding rows (shared modality per study) and HAPT's
missing-modality rates.  Runs are fake results.json contents; no federation starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from simulations import realdata_study, study_runner
from simulations.realdata_study import method_overrides, study_points
from tests.study_store import Store


def _fake_runs(monkeypatch, tmp_path: Path) -> list[dict]:
    """Replace the study runner: every "run" returns fixed figures and is logged, as a
    real run is, to the MLflow store the study reads its table from (``--tracking-uri``
    of :func:`_argv`); the calls are kept."""
    calls: list[dict] = []
    store = Store(tmp_path / "store")
    monkeypatch.setattr(study_runner, "TRACKING_URI", store.uri)

    def run_one(out: Path, overrides: list[str], *, experiment: str, **kw) -> dict:
        calls.append({"out": out, "overrides": overrides, "experiment": experiment})
        assert kw["tracking_uri"] == store.uri
        res = _result()
        store.log(kw["mlflow_experiment"], [f"experiment={experiment}", *overrides], res,
                  output_dir=out)  # fmt: skip
        return res

    monkeypatch.setattr(study_runner, "run_one", run_one)
    return calls


def _result() -> dict:
    task = {"f1_macro": 0.8, "accuracy": 0.85, "balanced_accuracy": 0.75}
    return {
            "test": {"by_task": {"activity": task, "main_activity": task}},
            "val": {"by_task": {"activity": task, "main_activity": task}},
            "rounds": 10, "num_nodes": 30, "wall_s": 1.0,
            "budget": {"steps_per_node_round": 20.0, "examples_per_node_round": 640.0},
            "code_version": {"commit": "abc1234", "dirty": False},
        }  # fmt: skip


def _ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"study": "hapt", "alphas": [5.0], "missing_rates": [], **kw})


def test_missing_rates_add_points_at_every_alpha_for_hapt_only():
    assert study_points(_ns(alphas=[5.0, 0.1])) == [
        ["partition.alpha=5.0"],
        ["partition.alpha=0.1"],
    ]
    assert study_points(_ns(alphas=[0.1], missing_rates=[0.1, 0.5])) == [
        ["partition.alpha=0.1"],
        ["partition.alpha=0.1", "partition.missing_rate=0.1"],
        ["partition.alpha=0.1", "partition.missing_rate=0.5"],
    ]
    assert study_points(_ns(study="extrasensory_withheld")) == [[]]


def test_binding_rows_carry_the_studys_shared_modality():
    assert method_overrides("mmbind", "hapt") == [
        "method=mmbind", "model.fusion=late", "partition.shared=acc",
    ]  # fmt: skip
    assert method_overrides("ssl_spine", "extrasensory_withheld") == [
        "method=mmbind", "binding.bind=false", "model.fusion=late", "partition.shared=raw_acc",
    ]  # fmt: skip
    assert method_overrides("harmony", "extrasensory") == ["method=harmony"]
    assert method_overrides("federated", "hapt") == ["method=federated"]
    assert method_overrides("federated", "hapt", shared_for_all=True) == [
        "method=federated", "partition.shared=acc",
    ]  # fmt: skip


def test_the_withheld_study_runs_its_experiment_with_every_new_row(monkeypatch, tmp_path, capsys):
    calls = _fake_runs(monkeypatch, tmp_path)
    doc = tmp_path / "es.md"
    argv = ["extrasensory_withheld", "--data", str(tmp_path), "--seeds", "0,1",
            "--methods", "federated,harmony,ssl_spine,mmbind", "--out", str(tmp_path / "runs"),
            "--doc", str(doc)]  # fmt: skip
    assert realdata_study.main(argv) == 0
    assert {c["experiment"] for c in calls} == {"extrasensory_withheld"} and len(calls) == 8
    mmbind = [c["overrides"] for c in calls if "method=mmbind" in c["overrides"]]
    assert len(mmbind) == 4 and all("partition.shared=raw_acc" in o for o in mmbind)
    assert len({c["out"] for c in calls}) == 8  # every (method, seed) a folder of its own
    text = doc.read_text()
    row = next(x for x in text.splitlines() if "| mmbind |" in x)
    assert row.startswith("| - | mmbind | 2 | 0.750 ± 0.000 [0.750, 0.750] |")
    assert row.endswith("| 10 | 30 | 20 | 640 |")
    assert "The rows ssl_spine, mmbind have `partition.shared=raw_acc`" in text
    assert "changes no node's sensors" in text and "Code version `abc1234`: 8 runs" in text
    assert "python -m simulations.realdata_study extrasensory_withheld " in text


def test_two_studies_with_equal_overrides_into_one_out_get_two_runs(monkeypatch, tmp_path):
    """ExtraSensory natural and withheld differ only in their experiment, not in any
    override: one ``--out`` must still hold a run of each, not one run read twice."""
    calls = _fake_runs(monkeypatch, tmp_path)
    for study in ("extrasensory", "extrasensory_withheld"):
        realdata_study.main([study, "--data", str(tmp_path), "--seeds", "0",
                             "--methods", "federated", "--out", str(tmp_path / "runs")])  # fmt: skip
    natural, withheld = calls
    assert natural["overrides"] == withheld["overrides"]
    assert (natural["experiment"], withheld["experiment"]) == (
        "extrasensory_natural", "extrasensory_withheld",
    )  # fmt: skip
    assert natural["out"] != withheld["out"]


def test_missing_rate_points_say_the_binding_rows_partition_differs(monkeypatch, tmp_path, capsys):
    calls = _fake_runs(monkeypatch, tmp_path)
    argv = ["hapt", "--data", str(tmp_path), "--seeds", "0", "--alphas", "0.1",
            "--missing-rates", "0.1,0.3", "--methods", "federated,mmbind",
            "--out", str(tmp_path / "runs")]  # fmt: skip
    realdata_study.main(argv)
    out = capsys.readouterr().out
    points = [(c["overrides"][2:4], c["overrides"][-1]) for c in calls]
    assert len(calls) == 6 and sum("partition.missing_rate=0.3" in o for o, _ in points) == 2
    rows = [x for x in out.splitlines() if x.startswith("| partition.alpha=0.1 partition.missing")]
    assert len(rows) == 4  # two rates x two methods, beside the alpha's own point
    assert "The row mmbind has `partition.shared=acc`" in out
    assert "their partition differs from the other rows'" in out
    fed = [c["overrides"] for c in calls if "method=federated" in c["overrides"]]
    assert not any(o.startswith("partition.shared") for f in fed for o in f)
    # --shared-for-all: one partition for every row, and the caption says so
    calls.clear()
    realdata_study.main([*argv, "--shared-for-all"])
    out = capsys.readouterr().out
    assert all("partition.shared=acc" in c["overrides"] for c in calls)
    assert "Every row has `partition.shared=acc` (one partition for all rows)" in out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["extrasensory", "--missing-rates", "0.1"], "--missing-rates is for the hapt study"),
        (["hapt", "--missing-rates", "0.1,1.5"], "rate 1.5 is not between 0 and 1"),
        (["hapt", "--missing-rates", "0"], "rate 0 is not between 0 and 1"),
        (["hapt", "--missing-rates", "0.1,0.1"], "a rate listed twice"),
        (["hapt", "--missing-rates", "a,b"], "expected rates like 0.1,0.3,0.5"),
        (["hapt", "--missing-rates", "0.1", "partition.missing_rate=0.2"],
         "partition.missing_rate=0.2 clashes with --missing-rates"),
        (["hapt", "--methods", "mmbind", "partition.shared=gyro"],
         "partition.shared=gyro clashes with the mmbind row, which sets partition.shared=acc"),
        (["hapt", "--shared-for-all", "partition.shared=gyro"],
         "partition.shared=gyro clashes with --shared-for-all"),
    ],
)  # fmt: skip
def test_bad_options_are_one_parser_error_before_any_run(argv, says, monkeypatch, tmp_path, capsys):
    calls = _fake_runs(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as stop:
        realdata_study.main([*argv, "--data", str(tmp_path), "--out", str(tmp_path / "runs")])
    assert stop.value.code == 2 and says in capsys.readouterr().err and calls == []
