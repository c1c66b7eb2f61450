"""simulations/budget_study.py's grid beyond steps and learning rate (``--grid-extra``):
the choice is made on validation, ties follow the documented rule, every grid point is
a run folder named by its overrides and found again on resume, and bad text is refused
by the parser.  Runs are fake results.json files; no federation is started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations import budget_study
from simulations.budget_study import choose_on_val, grid_points
from tests.study_store import Store

PW = "binding.pseudo_weight"


def _fake_runs(
    monkeypatch, scores: dict[str, tuple[float, float]], tmp_path: Path
) -> dict[str, int]:
    """``run_one`` that "runs" a point once (writes its results.json and logs its MLflow
    run to the store of :func:`_argv`'s ``--tracking-uri``) and afterwards reads it, as
    the real one does; val/test from ``scores`` by the run's pseudo-weight override.
    Returns the count of runs actually made per folder."""
    made: dict[str, int] = {}
    store = Store(tmp_path)

    def run_one(out: Path, overrides: list[str], **kw) -> dict:
        results = out / "results.json"
        if results.is_file():
            return json.loads(results.read_text())
        weight = next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{PW}="))
        val, test = scores[weight]
        res = {
            "val": {"accuracy": val},
            "test": {"accuracy": test},
            "overrides": overrides,
            "budget": {"steps_per_round": 160.0, "examples_per_round": 4800.0},
            "code_version": {"commit": "abc", "dirty": False},
        }
        assert kw["tracking_uri"] == store.uri
        store.log(kw["mlflow_experiment"], [f"experiment={kw['experiment']}", *overrides], res,
                  output_dir=out)  # fmt: skip
        made[str(out)] = made.get(str(out), 0) + 1
        return res

    monkeypatch.setattr(budget_study, "run_one", run_one)
    return made


def _argv(tmp_path: Path, seeds: int = 2) -> list[str]:
    return ["--labels", "0.1", "--grid", "20", "--methods", "centralized_mmbind",
            "--grid-extra", f"centralized_mmbind:{PW}=1.0,0.0", "--seeds", str(seeds),
            "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "budget.md"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip


def test_an_extra_key_is_chosen_on_validation_where_test_disagrees(monkeypatch, tmp_path):
    # seed 0 of the hand-made choice: 0.925 at 0.0 vs 0.895 at 1.0 on val; test says 1.0
    _fake_runs(monkeypatch, {"0.0": (0.925, 0.80), "1.0": (0.895, 0.95)}, tmp_path)
    budget_study.main(_argv(tmp_path))
    got = json.loads((tmp_path / "budget.json").read_text())["0.1"]["centralized_mmbind"]
    assert got["extras"] == [f"{PW}=0.0"] and got["steps"] == 20
    assert got["chosen_on"] == "val accuracy, seed 0"
    assert got["val_by_grid_point"] == {f"20,0.0,{PW}=1.0": 0.895, f"20,0.0,{PW}=0.0": 0.925}
    assert got["test"] == [0.80, 0.80]  # every seed ran at the validation choice
    row = next(x for x in (tmp_path / "budget.md").read_text().splitlines() if "| 10% |" in x)
    assert f"| 20, config, {PW}=0.0 |" in row
    assert f"20 {PW}=1.0: 0.895, 20 {PW}=0.0: 0.925" in row


def test_ties_go_to_the_smaller_budget_then_lr_then_the_extra_value_listed_first():
    grid = grid_points([40, 10], [0.01, 0.001], [(PW, ("1.0", "0.0"))])
    assert grid[:3] == [
        (10, 0.001, (f"{PW}=1.0",)),
        (10, 0.001, (f"{PW}=0.0",)),
        (10, 0.01, (f"{PW}=1.0",)),
    ]
    assert len(grid) == 8
    flat = {c: {"val": {"accuracy": 0.9}} for c in grid}
    assert choose_on_val(flat) == (10, 0.001, (f"{PW}=1.0",))  # all tied: first in order
    flat[(40, 0.01, (f"{PW}=0.0",))] = {"val": {"accuracy": 0.91}}
    assert choose_on_val(flat) == (40, 0.01, (f"{PW}=0.0",))  # a better val wins outright
    # the order of the dict does not matter for steps and lr, only for the extra values
    tied = {
        (20, 0.0, ("a",)): {"val": {"accuracy": 0.5}},
        (10, 0.0, ("b",)): {"val": {"accuracy": 0.5}},
    }
    assert choose_on_val(tied) == (10, 0.0, ("b",))


def test_grid_points_are_run_folders_named_by_their_overrides_and_resumed(monkeypatch, tmp_path):
    made = _fake_runs(monkeypatch, {"0.0": (0.925, 0.80), "1.0": (0.895, 0.95)}, tmp_path)
    budget_study.main(_argv(tmp_path, seeds=2))
    runs = {Path(k): json.loads((Path(k) / "results.json").read_text()) for k in made}
    # two grid points at seed 0 (one folder each), then seed 1 at the choice; the choice's
    # seed 0 is its grid run, read again rather than repeated
    assert sorted(p.name for p in runs) == ["centralized_mmbind-seed0"] * 2 + [
        "centralized_mmbind-seed1"
    ]
    assert all(n == 1 for n in made.values())
    by_weight = {
        next(o for o in r["overrides"] if o.startswith(PW)): p.parent
        for p, r in runs.items()
        if p.name.endswith("seed0")
    }
    assert len(set(by_weight.values())) == 2  # each extra value has its own point folder
    seed1 = next(p for p in runs if p.name.endswith("seed1"))
    assert seed1.parent == by_weight[f"{PW}=0.0"]  # the chosen point's folder
    assert runs[seed1]["overrides"][:2] == ["method=centralized_mmbind", "model.fusion=late"]
    made.clear()
    budget_study.main(_argv(tmp_path, seeds=2))  # the study again: everything is read back
    assert made == {}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (f"{PW}=0.0,1.0", "expected METHOD:KEY=V1,V2"),
        (f"centralized_mmbind:{PW}", "expected METHOD:KEY=V1,V2"),
        (f"nope:{PW}=0.0", "unknown method 'nope'"),
        ("centralized_mmbind:=0.0", "no config key before '='"),
        (f"centralized_mmbind:{PW}=0.0,", "an empty value"),
        (f"centralized_mmbind:{PW}=0.0,0.0", "a value listed twice"),
        ("centralized_mmbind:train.steps=10,40", "train.steps has its own grid option"),
    ],
)
def test_bad_grid_extra_text_is_a_parser_error_naming_it(text, says, capsys):
    with pytest.raises(SystemExit) as stop:
        budget_study.main(["--methods", "centralized_mmbind", "--grid-extra", text])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --grid-extra: {text!r}: {says}" in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--methods", "harmony", "--grid-extra", f"centralized_mmbind:{PW}=0.0,1.0"],
         "centralized_mmbind is not in --methods (harmony)"),
        (["--methods", "centralized_mmbind", "--grid-extra", "centralized_mmbind:model.fusion=late,attention"],
         "model.fusion is already set by the centralized_mmbind row or --extra"),
        (["--methods", "centralized_mmbind", "--extra", f"{PW}=0.5", "--grid-extra",
          f"centralized_mmbind:{PW}=0.0,1.0"], f"{PW} is already set"),
        (["--methods", "centralized_mmbind", "--grid-extra", f"centralized_mmbind:{PW}=0.0",
          "--grid-extra", f"centralized_mmbind:{PW}=1.0"], f"centralized_mmbind:{PW} twice"),
        (["--methods", "centralized_mmbind", "--grid-extra", "centralized_mmbind:binding.psuedo_weight=0.0"],
         "binding.psuedo_weight"),
        (["--methods", "centralized_mmbind", "--grid-extra", f"centralized_mmbind:{PW}=zero"],
         f"centralized_mmbind:{PW}=zero"),
    ],
)  # fmt: skip
def test_a_grid_extra_that_would_clash_or_be_dropped_is_refused(
    argv, says, tmp_path, capsys, monkeypatch
):
    def no_run(*_, **__):  # a refusal comes before any run; never start a real one here
        raise AssertionError("a study run started although --grid-extra was bad")

    monkeypatch.setattr(budget_study, "run_one", no_run)
    with pytest.raises(SystemExit) as stop:
        budget_study.main([*argv, "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "d.md")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: --grid-extra" in err and says in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "d.md").exists()
