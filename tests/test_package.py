"""The package installs and starts like a library: configs found in a checkout and in
a wheel, Flower run-config keys, one-line user errors, missing extras named, MLflow
runs of a failed run marked FAILED."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from fed_iotlm import cli, extras
from fed_iotlm.flwr_apps import APP_KEY, FEDERATION
from fed_iotlm.settings import compose, config_dir, flatten, run_config_overrides

ROOT = Path(__file__).resolve().parents[1]


def _app_config() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_config_dir_in_a_checkout_and_in_a_wheel_layout(tmp_path):
    assert config_dir() == ROOT / "configs"
    wheel_pkg = tmp_path / "site-packages" / "fed_iotlm"
    (wheel_pkg / "configs").mkdir(parents=True)
    (wheel_pkg / "configs" / "config.yaml").write_text("rounds: 1\n")
    assert config_dir(wheel_pkg) == wheel_pkg / "configs"
    with pytest.raises(FileNotFoundError, match="config tree is missing"):
        config_dir(tmp_path / "elsewhere" / "fed_iotlm")


def test_run_config_dotted_keys_become_overrides_and_win():
    run_config = {
        "overrides": "experiment=quick rounds=3",
        "rounds": 5,
        "secagg.enabled": True,
        "dp.noise_multiplier": 0.5,
        "method": "",  # unset: the config tree's value
    }
    assert run_config_overrides(run_config) == [
        "experiment=quick",
        "rounds=3",
        "rounds=5",
        "secagg.enabled=true",
        "dp.noise_multiplier=0.5",
    ]
    cfg = compose(run_config_overrides(run_config))
    assert cfg["rounds"] == 5 and cfg["secagg"]["enabled"] is True
    assert cfg["method"] == compose()["method"]


def test_declared_run_config_keys_exist_in_the_tree_and_restate_no_default():
    declared = _app_config()
    tree = flatten(compose())
    groups = {"experiment", "strategy"}  # config groups: chosen, not values
    assert declared.pop(APP_KEY) == FEDERATION  # which app runs: no config key, no Hydra default
    for key, value in declared.items():
        assert value == "", f"{key} restates a default; configs/ holds the defaults"
        assert key == "overrides" or key in groups or key in tree, f"{key} is not a config key"


def test_flower_accepts_the_secagg_key_as_docs_show_and_refuses_unknown_ones():
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    fused = get_fused_config_from_dir(ROOT, parse_config_args(["secagg.enabled=true"]))
    assert compose(run_config_overrides(fused))["secagg"]["enabled"] is True
    with pytest.raises(ValueError, match="secagg.nope"):
        get_fused_config_from_dir(ROOT, parse_config_args(["secagg.nope=true"]))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["run", "experiment=nope"], "Could not find 'experiment/nope'"),
        (["run", "nokey=1"], "unknown key 'nokey'"),
        (["run", "rounds=abc"], "rounds='abc': expected an integer"),
        (["run", "method=bogus", "mlflow.enabled=false"], "bogus"),
    ],
)
def test_a_user_error_is_one_line_and_exit_2(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fed-iotlm run: error: ") and says in err
    assert "\n" not in err and "Traceback" not in err


def test_a_command_needing_a_missing_extra_says_which(monkeypatch, capsys):
    real = extras.has
    monkeypatch.setattr(extras, "has", lambda m: m != "peft" and real(m))
    assert cli.main(["tune"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs peft" in err and "pip install 'fed-iotlm[llm]'" in err


def test_require_names_the_extra_and_keeps_real_import_errors(monkeypatch):
    monkeypatch.setitem(extras.EXTRA_OF, "no_such_module_xyz", "study")
    with pytest.raises(extras.MissingExtraError, match=r"fed-iotlm\[study\]"):
        extras.require("no_such_module_xyz", "a feature")
    assert extras.require("json", "x").dumps([]) == "[]"


def test_a_failed_run_ends_failed_in_mlflow(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from fed_iotlm.tracking import RunRecorder, fail_open_runs

    cwd = tmp_path / "cwd"  # MLflow's default artifact root is ./mlruns of the process
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = {"method": "federated", "seed": 0, "rounds": 1, "mlflow": {"tracking_uri": uri}}
    recorder = RunRecorder(cfg, tmp_path / "out", dataset="d", plan={})
    recorder.start()
    run_id = recorder.run_id
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "RUNNING"
    fail_open_runs(RuntimeError("boom"))
    assert recorder.run_id is None
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: boom"
    # the config artifact lies beside the store, nothing in the working directory
    assert run.info.artifact_uri.startswith((tmp_path.resolve() / "mlruns").as_uri())
    assert list((tmp_path / "mlruns").rglob("config.json"))
    assert not list(cwd.iterdir())


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///mlflow.db", "{cwd}/mlruns"),  # MLflow's own default: unchanged
        ("sqlite:////data/runs/mlflow.db", "/data/runs/mlruns"),
        ("sqlite:///sub/m.db?timeout=5", "{cwd}/sub/mlruns"),
        ("sqlite:///:memory:", None),
        ("http://127.0.0.1:5000", None),
        ("file:///tmp/mlruns", None),
    ],
)
def test_a_sqlite_store_keeps_its_artifacts_beside_it(uri, expected, tmp_path, monkeypatch):
    from fed_iotlm.tracking import artifact_location

    monkeypatch.chdir(tmp_path)
    want = None if expected is None else Path(expected.format(cwd=tmp_path.resolve())).as_uri()
    assert artifact_location(uri) == want


@pytest.mark.integration
def test_the_wheel_ships_every_config(tmp_path):
    """Build the wheel (offline: no build isolation) and look inside."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("fed_iotlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert f"fed_iotlm/configs/{path.relative_to(ROOT / 'configs')}" in names
    assert {"fed_iotlm/settings.py", "simulations/run.py", "clients/app.py"} <= names


def test_checkout_tracks_no_links_and_nothing_ignored():
    """A committed link (a `.venv` pointing at a developer's venv) broke CI's `make setup`
    in one second: the clean clone must hold only real files, none the ignore rules name."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an installed wheel)")
    staged = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    links = [line.split("\t", 1)[1] for line in staged if line.startswith("120000 ")]
    assert not links, f"symbolic links are committed: {links}"
    ignored = subprocess.run(
        ["git", "ls-files", "-ci", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not ignored, f"files the .gitignore rules exclude are committed: {ignored}"
