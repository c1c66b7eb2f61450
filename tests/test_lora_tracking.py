"""The federated-LoRA app records through the federation's MLflow piece.

The whole app (:func:`server.lora_app.run_lora_federation`: roll call, rounds on the
engine, checkpoints, evaluation, results.json) runs on a stand-in Grid whose two sites
answer at once (``tests.test_lora_resume._SitesGrid``), FedIT then FedEx, against a real
MLflow sqlite store in ``tmp_path``: one parent run per app run, one nested run per
method with its rounds' metrics at their steps, the config artifact, FAILED on an
injected error, and a resumed run that continues the same runs without logging a round
twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fed_iotlm.llm.federated import FederatedSettings
from server.lora_tracking import EXPERIMENT_SUFFIX
from tests.test_lora_resume import TASK, _SitesGrid

mlflow = pytest.importorskip("mlflow")

PLANS = [FederatedSettings("fedit", 2, 1), FederatedSettings("fedex", 2, 1)]
EXPERIMENT = "lora-tracking"


class Crash(RuntimeError):
    """The server dying right after a round was checkpointed and logged."""


@pytest.fixture
def identity(monkeypatch, tmp_path):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.chdir(tmp_path)  # a sqlite store's artifacts go to ./mlruns
    for name in ("_run_id", "_node_id", "_task_id"):  # a ServerApp's, outside Flower
        monkeypatch.setattr(TaskIdentity, name, 1)


class _Grid(_SitesGrid):
    """The stand-in sites, with a distinct id on every message sent, so that the roll
    call (which pairs replies by message id) can ask both sites at once."""

    sent_count = 0

    def send_and_receive(self, messages, *, timeout=None):
        for m in messages:
            self.sent_count += 1
            m.metadata.__dict__["_message_id"] = f"m{self.sent_count}"
        return super().send_and_receive(messages, timeout=timeout)


def _mlflow(tmp_path: Path, **kw) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": EXPERIMENT, **kw}


def _run(out: Path, mcfg: dict | None, crash=None, resume: bool = False) -> Path:
    from server.lora_app import run_lora_federation

    def on_record(method, record):
        if (method, record.round) == crash:
            raise Crash(f"{method} round {record.round}")

    grid = _Grid({10: 0, 11: 1})
    return run_lora_federation(
        grid, TASK, PLANS, 2, out, on_record=on_record, resume=resume, mlflow=mcfg
    )


def _runs(mcfg: dict) -> tuple[object, object, dict[str, object]]:
    """(client, the app run, {method: its run}) of the experiment's only app run."""
    client = mlflow.MlflowClient(tracking_uri=mcfg["tracking_uri"])
    exp = client.get_experiment_by_name(EXPERIMENT + EXPERIMENT_SUFFIX)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["method"]: r for r in runs if r not in [parent]}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    return client, parent, children


def _steps(client, run, key: str) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, key))


def test_each_round_is_logged_at_its_step_in_a_run_per_method(tmp_path, identity):
    mcfg = _mlflow(tmp_path)
    doc = json.loads(_run(tmp_path / "out", mcfg).read_text())
    client, parent, children = _runs(mcfg)
    assert parent.info.status == "FINISHED" and set(children) == {"fedit", "fedex"}
    for method, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["settings.method"] == method
        for key in ("loss", "agg_error", "rel_error", "bytes_up", "bytes_down", "nodes_answered"):
            assert _steps(client, run, key) == [1, 2], (method, key)
        assert _steps(client, run, "accuracy") == [2]  # the method's final evaluation
        assert run.data.metrics["accuracy"] == doc["methods"][method]["accuracy"]
        assert parent.data.metrics[f"accuracy.{method}"] == doc["methods"][method]["accuracy"]
        by_round = {r["round"]: r for r in doc["methods"][method]["rounds"]}
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert {int(m.step): m.value for m in losses} == {
            k: pytest.approx(v["loss"]) for k, v in by_round.items()
        }
    # the whole config as an artifact, results.json beside it
    art = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "art")))
    config = json.loads((art / "config.json").read_text())
    assert [p["method"] for p in config["plans"]] == ["fedit", "fedex"]
    assert config["task"]["lora_r"] == TASK.lora_r and config["num_sites"] == 2
    assert json.loads((art / "results.json").read_text()) == doc
    assert parent.data.params["task.lora_r"] == str(TASK.lora_r)
    # results.json keeps the LoRA keys and gains the federation's that apply
    assert {"task", "num_sites", "sites", "methods"} <= set(doc)
    assert doc["config"] == config and doc["seed"] == TASK.seed and doc["wall_s"] >= 0
    assert set(doc["code_version"]) >= {"commit", "dirty"}
    assert doc["mlflow"]["run_id"] == parent.info.run_id


def test_mlflow_enabled_false_opens_no_run(tmp_path, identity):
    mcfg = _mlflow(tmp_path, enabled=False)
    doc = json.loads(_run(tmp_path / "out", mcfg).read_text())
    assert not (tmp_path / "mlflow.db").exists()
    assert "mlflow" not in doc and set(doc["methods"]) == {"fedit", "fedex"}


def test_an_error_ends_the_runs_failed_and_resume_continues_them(tmp_path, identity):
    mcfg = _mlflow(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(Crash):
        _run(out, mcfg, crash=("fedex", 1))
    client, parent, children = _runs(mcfg)
    assert parent.info.status == "FAILED" and children["fedex"].info.status == "FAILED"
    assert parent.data.tags["error"] == "Crash: fedex round 1"
    assert children["fedit"].info.status == "FINISHED"
    assert _steps(client, children["fedex"], "loss") == [1]
    ids = parent.info.run_id, {m: r.info.run_id for m, r in children.items()}

    doc = json.loads(_run(out, mcfg, resume=True).read_text())
    client, parent, children = _runs(mcfg)  # still one app run, one run per method
    assert (parent.info.run_id, {m: r.info.run_id for m, r in children.items()}) == ids
    assert parent.info.status == "FINISHED" and children["fedex"].info.status == "FINISHED"
    for key in ("loss", "bytes_up", "nodes_sent"):  # round 1 not logged again
        assert _steps(client, children["fedex"], key) == [1, 2], key
    assert _steps(client, children["fedit"], "loss") == [1, 2]
    assert doc["mlflow"]["run_id"] == parent.info.run_id


def test_a_resume_against_another_store_starts_a_linked_run_with_every_round(tmp_path, identity):
    out = tmp_path / "out"
    first = _mlflow(tmp_path / "a")
    with pytest.raises(Crash):
        _run(out, first, crash=("fedex", 1))
    old = _runs(first)[1].info.run_id
    other = _mlflow(tmp_path / "b")
    _run(out, other, resume=True)
    client, parent, children = _runs(other)
    assert parent.data.tags["fed_iotlm.resumed_from"] == old
    assert set(children) == {"fedex"}  # fedit finished in the first store
    assert _steps(client, children["fedex"], "loss") == [1, 2]


def test_a_method_evaluated_again_on_resume_is_logged_once(tmp_path, identity, monkeypatch):
    """The server dies after FedIT's evaluation was logged and before FedEx's first
    checkpoint: the resumed app evaluates FedIT again (its last checkpoint is its last
    round) and must not log its final figures a second time, in its run or the app's."""
    from server.lora_tracking import LoraTracking

    mcfg = _mlflow(tmp_path)
    out = tmp_path / "out"
    start = LoraTracking.start_method

    def dies_before_fedex(self, fs, restored, resumed):
        if fs.method == "fedex":
            raise Crash("before fedex's first round")
        return start(self, fs, restored, resumed)

    with monkeypatch.context() as m:
        m.setattr(LoraTracking, "start_method", dies_before_fedex)
        with pytest.raises(Crash):
            _run(out, mcfg)
    client, parent, children = _runs(mcfg)
    assert _steps(client, parent, "accuracy.fedit") == [0]
    assert _steps(client, children["fedit"], "accuracy") == [2]

    _run(out, mcfg, resume=True)
    client, parent, children = _runs(mcfg)
    assert parent.info.status == "FINISHED" and set(children) == {"fedit", "fedex"}
    assert _steps(client, parent, "accuracy.fedit") == [0]  # not logged again
    assert _steps(client, children["fedit"], "accuracy") == [2]
    assert _steps(client, parent, "accuracy.fedex") == [0]
