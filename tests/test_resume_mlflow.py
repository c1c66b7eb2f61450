"""A resumed federation continues its MLflow run (server/resume.py, fed_iotlm/tracking.py).

The whole ServerApp (:func:`server.app.make_server_app`: roll call, statistics round,
rounds, checkpoints, MLflow, results.json) runs in-process on a Grid that hands every
message to the real ClientApp of its node (:mod:`tests.inprocess_grid`), against a real
sqlite store in ``tmp_path``.
The server "crashes" (an exception) after round 2 of 3, and ``resume=true`` finishes the
run: one MLflow run must hold every round's metrics exactly once and end FINISHED.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.inprocess_grid import AppGrid, Crash

mlflow = pytest.importorskip("mlflow")

ROUNDS, CRASH_AFTER = 3, 2
EXPERIMENT = "resume-mlflow"


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's Message() needs a run id outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _cfg(quick_cfg, store: Path, *overrides: str, rounds: int = ROUNDS) -> dict:
    return quick_cfg(
        f"rounds={rounds}", "train.steps=2", f"mlflow.tracking_uri=sqlite:///{store}",
        f"mlflow.experiment={EXPERIMENT}", *overrides,
    )  # fmt: skip


def _serve(cfg: dict, out: Path, crash_at: int | None = None) -> None:
    from flwr.app import Context, RecordDict

    from clients.app import make_client_app
    from server.app import make_server_app

    grid = AppGrid(make_client_app(cfg), crash_at)
    make_server_app(cfg, out)(grid, Context(1, 0, {}, RecordDict(), {}))


def _runs(store: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _history(store: Path, run, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    return sorted((int(m.step), m.value) for m in client.get_metric_history(run.info.run_id, key))


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run that died after round 2 of 3: (its out dir, its store, the MLflow run id);
    tests resume copies of both."""
    from fed_iotlm.federation.checkpoint import checkpoint_dir, load_checkpoint
    from fed_iotlm.settings import compose

    root = tmp_path_factory.mktemp("crashed")
    store, out = root / "mlflow.db", root / "out"

    def quick_cfg(*overrides: str) -> dict:
        return compose(["experiment=quick", *overrides])

    with pytest.MonkeyPatch.context() as mp:
        from flwr.supercore.task_identity import TaskIdentity

        for name in ("_run_id", "_node_id", "_task_id"):
            mp.setattr(TaskIdentity, name, 1)
        with pytest.raises(Crash):
            _serve(_cfg(quick_cfg, store), out, crash_at=CRASH_AFTER + 1)
    (run,) = _runs(store)
    assert run.info.status == "FAILED" and "Crash" in run.data.tags["error"]
    assert [s for s, _ in _history(store, run, "accuracy")] == list(range(1, CRASH_AFTER + 1))
    ckpt = load_checkpoint(checkpoint_dir(out))
    assert ckpt.round == CRASH_AFTER and ckpt.meta["mlflow_run"] == run.info.run_id
    return out, store, run.info.run_id


def _copy(crashed, tmp_path: Path) -> tuple[Path, Path, str]:
    out, store, run_id = crashed
    shutil.copytree(out, tmp_path / "out")
    shutil.copy(store, tmp_path / "mlflow.db")
    return tmp_path / "out", tmp_path / "mlflow.db", run_id


def _assert_every_round_once(store: Path, run, results: dict) -> None:
    """``run`` holds each history key of every round exactly once, the values results.json
    reports, and the final test figure once, at the last round."""
    history, rounds = results["history"], results["rounds"]
    assert [h["round"] for h in history] == list(range(1, rounds + 1))
    for key in ("accuracy", "loss", "val_accuracy", "nodes_answered"):
        logged = _history(store, run, key)
        assert logged == [(h["round"], pytest.approx(h[key])) for h in history], key
    # the final validation figure is the last round's: the same model on the same split
    assert results["val"]["accuracy"] == pytest.approx(history[-1]["val_accuracy"])
    assert _history(store, run, "test_accuracy")[-1] == (
        rounds, pytest.approx(results["test"]["accuracy"])
    )  # fmt: skip
    _assert_once_per_step(store, run)


def _assert_once_per_step(store: Path, run) -> None:
    """No metric of ``run`` has two values at one step."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    for key in client.get_run(run.info.run_id).data.metrics:
        steps = [s for s, _ in _history(store, run, key)]
        assert len(steps) == len(set(steps)), (key, steps)


def test_a_resumed_run_continues_its_mlflow_run(crashed, quick_cfg, tmp_path, task_identity):
    out, store, run_id = _copy(crashed, tmp_path)
    _serve(_cfg(quick_cfg, store, "resume=true"), out)
    (run,) = _runs(store)  # the same run, no second one
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    _assert_every_round_once(store, run, json.loads((out / "results.json").read_text()))
    # FINISHED, so no longer tagged with the crash's error; the crash stays on record
    assert "error" not in run.data.tags
    assert "Crash: " in run.data.tags["fed_iotlm.earlier_error"]


def test_a_finished_run_resumed_with_more_rounds_logs_each_metric_once_per_step(
    crashed, quick_cfg, tmp_path, task_identity
):
    """Finished after 3 rounds, then resumed with rounds=5: the new final figures land at
    step 5 beside the old ones at step 3, never a second value at one step."""
    out, store, run_id = _copy(crashed, tmp_path)
    _serve(_cfg(quick_cfg, store, "resume=true"), out)
    first = json.loads((out / "results.json").read_text())
    _serve(_cfg(quick_cfg, store, "resume=true", rounds=ROUNDS + 2), out)
    (run,) = _runs(store)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    results = json.loads((out / "results.json").read_text())
    _assert_every_round_once(store, run, results)
    assert _history(store, run, "test_accuracy") == [
        (ROUNDS, pytest.approx(first["test"]["accuracy"])),
        (ROUNDS + 2, pytest.approx(results["test"]["accuracy"])),
    ]
    # resumed once more with nothing left to run: the same model, nothing logged again
    _serve(_cfg(quick_cfg, store, "resume=true", rounds=ROUNDS + 2), out)
    (run,) = _runs(store)
    assert [s for s, _ in _history(store, run, "test_accuracy")] == [ROUNDS, ROUNDS + 2]
    _assert_once_per_step(store, run)


def test_a_round_checkpointed_but_not_logged_is_logged_on_resume(
    quick_cfg, tmp_path, task_identity, monkeypatch
):
    """The server dies after round 2's checkpoint and before its metrics reach MLflow:
    the resumed run logs round 2 from the checkpoint (and does not run it again)."""
    from fed_iotlm.tracking import RunRecorder

    store, out = tmp_path / "mlflow.db", tmp_path / "out"
    real = RunRecorder.log_record

    def dying(self, record) -> None:
        if record.round == CRASH_AFTER:
            raise Crash(f"died before logging round {record.round}")
        real(self, record)

    with monkeypatch.context() as mp:
        mp.setattr(RunRecorder, "log_record", dying)
        with pytest.raises(Crash):
            _serve(_cfg(quick_cfg, store), out)
    (run,) = _runs(store)
    assert [s for s, _ in _history(store, run, "accuracy")] == [1]
    _serve(_cfg(quick_cfg, store, "resume=true"), out)
    (run,) = _runs(store)
    assert run.info.status == "FINISHED"
    _assert_every_round_once(store, run, json.loads((out / "results.json").read_text()))


def test_a_store_without_the_run_gets_a_new_linked_run_with_every_round(
    crashed, quick_cfg, tmp_path, task_identity, caplog
):
    out, _, run_id = _copy(crashed, tmp_path)
    other = tmp_path / "other.db"  # another tracking URI: the run is not there
    with caplog.at_level(logging.WARNING, logger="fed_iotlm.tracking"):
        _serve(_cfg(quick_cfg, other, "resume=true"), out)
    assert f"MLflow run {run_id} is not in sqlite:///{other}: a new run" in caplog.text
    (run,) = _runs(other)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fed_iotlm.resumed_from"] == run_id
    _assert_every_round_once(other, run, json.loads((out / "results.json").read_text()))


def test_a_resume_with_mlflow_off_says_so_and_leaves_the_run(
    crashed, quick_cfg, tmp_path, task_identity, caplog
):
    out, store, run_id = _copy(crashed, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fed_iotlm.tracking"):
        _serve(_cfg(quick_cfg, store, "resume=true", "mlflow.enabled=false"), out)
    assert f"mlflow.enabled=false, so the checkpoint's MLflow run {run_id} is not" in caplog.text
    (run,) = _runs(store)  # untouched: still the crashed run, no new one
    assert run.info.run_id == run_id and run.info.status == "FAILED"
    results = json.loads((out / "results.json").read_text())
    assert [h["round"] for h in results["history"]] == list(range(1, ROUNDS + 1))
