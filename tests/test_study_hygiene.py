"""Study tables: one code version per table, runs cached per version, intervals over seeds."""

from __future__ import annotations

import pytest

from fed_iotlm.protocol import one_code_version
from simulations.budget_study import choose_on_val
from simulations.study_runner import fmt_mean_ci, mean_ci95, point_key


def _res(commit: str, dirty: bool = False) -> dict:
    return {"code_version": {"commit": commit, "dirty": dirty}}


def test_a_table_refuses_to_mix_code_versions():
    assert one_code_version([_res("abc"), _res("abc")]) == "abc"
    with pytest.raises(ValueError, match="2 code versions"):
        one_code_version([_res("abc"), _res("def")])
    with pytest.raises(ValueError, match="code versions"):
        one_code_version([_res("abc"), _res("abc", dirty=True)])


def test_the_run_cache_is_keyed_on_the_code_version_and_the_experiment():
    overrides = ["method=federated", "seed=0"]
    key = point_key(overrides, "v1", experiment="a")
    assert key == point_key(list(reversed(overrides)), "v1", experiment="a")
    assert key != point_key(overrides, "v2", experiment="a")  # issue 11: code version
    assert key != point_key(overrides, "v1", experiment="b")  # the experiment picks the config
    assert point_key(overrides, "v1", experiment=None) not in {
        key,
        point_key(overrides, "v2", experiment=None),
    }


def test_only_code_changes_make_a_checkout_dirty(tmp_path):
    """A study rewrites its docs page while it runs; that must not mark its later runs
    as made by other code, while any change to code or configs must."""
    import subprocess

    from fed_iotlm.protocol import code_version

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("old\n")
    (tmp_path / "README.md").write_text("readme\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "docs" / "results.md").write_text("new table\n")
    (tmp_path / "README.md").write_text("new figures\n")
    code_version.cache_clear()
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    code_version.cache_clear()
    assert code_version(tmp_path)["dirty"] is True
    code_version.cache_clear()


def _git_repo(path) -> None:
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)

    (path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")


def test_outside_a_checkout_the_installed_package_version_is_recorded(monkeypatch, tmp_path):
    """A wheel install has no commit; results.json then names the package's version.
    A folder inside some checkout but not its top (a wheel in a clone's .venv) is not
    that checkout's code either."""
    from fed_iotlm import protocol

    monkeypatch.setattr(protocol, "installed_version", lambda: "0.7.1")
    protocol.code_version.cache_clear()
    try:
        bare = tmp_path / "site-packages"
        bare.mkdir()
        assert protocol.code_version(bare) == {"commit": None, "dirty": None, "package": "0.7.1"}
        clone = tmp_path / "clone"
        clone.mkdir()
        _git_repo(clone)
        venv = clone / ".venv" / "site-packages"
        venv.mkdir(parents=True)
        assert protocol.code_version(venv)["commit"] is None
        assert protocol.code_version(venv)["package"] == "0.7.1"
        assert protocol.code_version(clone)["commit"] is not None  # the checkout itself
    finally:
        protocol.code_version.cache_clear()


def test_the_package_version_is_that_of_the_installed_copy_only(monkeypatch, tmp_path):
    """installed_version names a distribution's version only for its own files: a copy
    of the sources beside it (or an editable install's checkout) is other code."""
    from fed_iotlm.protocol import installed_version

    site = tmp_path / "site"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "mod.py").write_text("")
    info = site / "fake_dist-2.3.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-dist\nVersion: 2.3.4\n")
    monkeypatch.syspath_prepend(str(site))
    own = site / "fakepkg" / "mod.py"
    assert installed_version("fake-dist", own, "fakepkg/mod.py") == "2.3.4"
    copy = tmp_path / "checkout" / "fakepkg" / "mod.py"
    copy.parent.mkdir(parents=True)
    copy.write_text("")
    assert installed_version("fake-dist", copy, "fakepkg/mod.py") is None
    assert installed_version("no-such-dist-xyz", own, "fakepkg/mod.py") is None


def _installed(package: str | None) -> dict:
    return {"code_version": {"commit": None, "dirty": None, "package": package}}


def test_a_table_of_installed_runs_refuses_to_mix_package_versions():
    assert one_code_version([_installed("0.1.0"), _installed("0.1.0")]) == "fed-iotlm==0.1.0"
    with pytest.raises(ValueError, match="2 code versions"):
        one_code_version([_installed("0.1.0"), _installed("0.2.0")])
    with pytest.raises(ValueError, match="2 code versions"):
        one_code_version([_installed("0.1.0"), _res("abc")])
    # neither a commit nor a package version: the table says it cannot tell
    assert one_code_version([_installed(None), {}]) == "unknown"


def test_outside_a_checkout_the_run_cache_is_keyed_on_the_package_version(monkeypatch):
    from simulations import study_runner

    def keyed(package: str) -> str:
        version = {"commit": None, "dirty": None, "package": package}
        monkeypatch.setattr(study_runner, "code_version", lambda: version)
        return study_runner.code_key()

    assert keyed("0.1.0") == "fed-iotlm==0.1.0"
    assert keyed("0.1.0") != keyed("0.2.0")


def test_interval_over_seeds():
    mean, half = mean_ci95([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9)
    assert half == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-3)  # t(0.975, 2) = 4.303
    assert mean_ci95([0.5]) == (0.5, 0.0)
    assert fmt_mean_ci([0.8, 0.9, 1.0]).startswith("0.900 ± 0.082 [")


def test_the_budget_is_chosen_on_validation_only():
    runs = {
        (10, 0.0): {"val": {"accuracy": 0.7}, "test": {"accuracy": 0.99}},
        (40, 0.0): {"val": {"accuracy": 0.8}, "test": {"accuracy": 0.10}},
    }
    assert choose_on_val(runs) == (40, 0.0)  # test says otherwise; it is never read
    tie = {(10, 0.0): {"val": {"accuracy": 0.8}}, (40, 0.0): {"val": {"accuracy": 0.8}}}
    assert choose_on_val(tie) == (10, 0.0)  # ties: the smaller budget


def _results(acc: float, commit: str = "abc1234", pooled: bool = False) -> dict:
    """An MMBind-study results.json: test and val, the budget, the first binding's pairs."""
    budget = (
        {"steps_per_round": 160.0, "examples_per_round": 5120.0}
        if pooled
        else {"steps_per_node_round": 20.0, "examples_per_node_round": 640.0}
    )
    task = {"accuracy": acc}
    return {
        "test": {"accuracy": acc, "by_task": {"activity": task, "location": task}},
        "val": {"accuracy": acc},
        "budget": budget,
        "code_version": {"commit": commit, "dirty": False},
        "binding": {"pair_accuracy_by_binding": {"5": {"activity": 0.1},
                                                 "1": {"activity": 0.5, "location": 0.8}}},
    }  # fmt: skip


def test_the_headline_table_names_its_version_budget_interval_and_pair_accuracy(tmp_path):
    from simulations.mmbind_study import METHODS, MLFLOW_EXPERIMENT, sweep_points
    from simulations.study_report import write_report
    from simulations.study_runner import logged_runs
    from tests.study_store import Store

    store = Store(tmp_path)
    (_, headline), = sweep_points("headline")  # fmt: skip
    outs = []
    for method, accs, pooled in [("mmbind", [0.9, 0.92, 0.94], False),
                                 ("harmony", [0.8, 0.8, 0.8], False),
                                 ("centralized", [0.95, 0.95, 0.95], True)]:  # fmt: skip
        for seed, acc in enumerate(accs):
            overrides = ["experiment=mmbind_study", *METHODS[method], f"seed={seed}", *headline]
            outs.append(store.log(MLFLOW_EXPERIMENT, overrides, _results(acc, pooled=pooled)))
    doc = tmp_path / "results.md"
    runs = logged_runs(MLFLOW_EXPERIMENT, outs, store.uri)
    write_report(runs, ["headline", "labels"], doc, tmp_path, "python -m x")
    text = doc.read_text()
    assert "Code version `abc1234`: 9 runs" in text and "`python -m x`" in text
    row = next(line for line in text.splitlines() if line.startswith("| `mmbind`"))
    assert "| 3 | 0.920 ± 0.016 [" in row and "| 20 | 640 |" in row and "| 0.500 ± 0.000 [" in row
    assert "160 (pooled)" in text
    assert "+12.0 points" in text  # mmbind vs the best other federated row (harmony)
    # the labels sweep: the headline runs are its 10 % point; the other points have none
    assert "| method | 100% labels | 30% labels | 10% labels |" in text
    assert "| `harmony` | – | – | 0.800 ± 0.000 [0.800, 0.800] |" in text
    # fed-iotlm report --study mmbind prints the page's rows from the experiment as a whole,
    from fed_iotlm.commands.report import study_tables

    printed = study_tables(MLFLOW_EXPERIMENT, store.uri, "mmbind")
    on_page = [line for line in text.splitlines() if line.startswith("| `")]
    # every sweep with runs there: also incompleteness, whose 50 % point is the headline's
    assert len(on_page) == 6 and set(on_page) < set(printed.splitlines())
    assert "Sweep: incompleteness." in printed
    outs.append(store.log(MLFLOW_EXPERIMENT, ["experiment=mmbind_study", *METHODS["harmony"],
                                              "seed=3", *headline], _results(0.8, "def5678")))  # fmt: skip
    runs = logged_runs(MLFLOW_EXPERIMENT, outs, store.uri)
    with pytest.raises(ValueError, match=r"code versions \(abc1234, def5678\)"):
        write_report(runs, ["headline"], doc, tmp_path, "python -m x")


def test_the_budget_study_reuses_the_mmbind_studys_runs_at_the_same_point(monkeypatch, tmp_path):
    import argparse

    from simulations import budget_study, mmbind_study, study_runner

    seen: dict[str, tuple] = {}

    def fake_run_one(study: str):
        def run(out, overrides, **_):
            seen[study] = (out, sorted(overrides))
            return {"test": {"accuracy": 0.5}, "val": {"accuracy": 0.5}}

        return run

    monkeypatch.setattr(budget_study, "run_one", fake_run_one("budget"))
    monkeypatch.setattr(study_runner, "run_one", fake_run_one("mmbind"))
    budget_study.run(tmp_path, "mmbind", 20, 1, budget_study.point(0.1, []))
    (_, headline), = mmbind_study.sweep_points("headline")  # fmt: skip
    args = argparse.Namespace(out=tmp_path)
    mmbind_study.run_point(args, ["train.steps=20"], "h", "x", headline, ["mmbind"], 2, {})
    assert seen["budget"] == seen["mmbind"]  # same folder, same overrides: one run serves both


def test_a_failed_study_run_names_its_log_and_shows_its_end(tmp_path):
    from simulations.study_runner import run_one

    out = tmp_path / "point" / "harmony-seed0"
    with pytest.raises(RuntimeError, match="run.log") as failed:
        run_one(out, ["no_such_key=1"], experiment="quick", mlflow_experiment="x")
    log = (out / "run.log").read_text()
    assert "no_such_key" in log and "no_such_key" in str(failed.value)
    assert not (out / "results.json").exists()


def test_the_budget_table_names_the_command_as_it_was_given(monkeypatch, tmp_path):
    import json

    from simulations import budget_study
    from tests.study_store import Store

    store = Store(tmp_path / "store")
    accs = {"harmony-seed0": 0.7, "harmony-seed1": 0.9}

    def fake_run_one(out, overrides, *, experiment, mlflow_experiment, tracking_uri):
        # what a run leaves in the store, with test and val by seed; read by the page
        acc = accs[out.name] + (0.1 if "train.steps=40" in overrides else 0.0)
        result = {"test": {"accuracy": acc}, "val": {"accuracy": acc},
                  "code_version": {"commit": "abc1234", "dirty": False}}  # fmt: skip
        if not (out / "results.json").exists():  # a finished run is read, not repeated
            store.log(mlflow_experiment, [f"experiment={experiment}", *overrides], result,
                      output_dir=out)  # fmt: skip
        return result

    monkeypatch.setattr(budget_study, "run_one", fake_run_one)
    doc = tmp_path / "budget.md"
    argv = ["--labels", "0.3", "--grid", "20,40", "--methods", "harmony", "--seeds", "2",
            "--out", str(tmp_path / "runs"), "--doc", str(doc),
            "--tracking-uri", store.uri]  # fmt: skip
    budget_study.main(argv)
    text = doc.read_text()
    assert (
        "`python -m simulations.budget_study --labels 0.3 --grid 20,40 --methods harmony " in text
    )
    assert f"--out {tmp_path / 'runs'}" in text and "Code version `abc1234`: 2 runs" in text
    # 40 steps chosen on seed 0's val (0.8 > 0.7); its two seeds in the row, the 20-step run not
    row = next(line for line in text.splitlines() if line.startswith("| 30% | harmony |"))
    assert "| 20: 0.700, 40: 0.800 | 40, config | 2 | 0.900 ± 0.100 [" in row
    saved = json.loads(doc.with_suffix(".json").read_text())
    assert saved["code_version"] == "abc1234"
    from fed_iotlm.commands.report import study_tables

    printed = study_tables(budget_study.MLFLOW_EXPERIMENT, store.uri, "budget")
    assert row in printed.splitlines()  # the CLI's table: the same row
    harmony = saved["0.3"]["harmony"]  # keyed by the label fraction as --labels gives it
    assert harmony["steps"] == 40 and harmony["test"] == pytest.approx([0.8, 1.0])
