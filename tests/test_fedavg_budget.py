"""Naive FedAvg (``method=fedavg``, flwr's own strategy) records the budget its nodes
report, as the modality-aware strategy does, so study tables show its steps and
examples per node per round instead of "?"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.inprocess_grid import AppGrid

RUN = ("mlflow.enabled=false", "rounds=2", "train.steps=2")


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's Message() needs a run id outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _serve(cfg: dict, out: Path) -> dict:
    """The real ServerApp and ClientApp, the whole run in this process (no Ray)."""
    from flwr.app import Context, RecordDict

    from clients.app import make_client_app
    from server.app import make_server_app

    make_server_app(cfg, out)(AppGrid(make_client_app(cfg)), Context(1, 0, {}, RecordDict(), {}))
    (results,) = out.rglob("results.json")
    return json.loads(results.read_text())


def test_fedavg_reports_the_nodes_steps_and_examples_per_round(quick_cfg, tmp_path, task_identity):
    cfg = quick_cfg("method=fedavg", *RUN)
    res = _serve(cfg, tmp_path / "fedavg")
    batch = cfg["train"]["batch_size"]
    assert [h["steps_per_node"] for h in res["history"]] == [2.0, 2.0]
    assert [h["examples_per_node"] for h in res["history"]] == [2.0 * batch] * 2
    assert res["budget"]["steps_per_node_round"] == 2.0
    assert res["budget"]["examples_per_node_round"] == 2.0 * batch


def test_reading_the_budget_leaves_what_fedavg_aggregates(
    quick_cfg, tmp_path, task_identity, monkeypatch
):
    """The same run with the budget read and without: the same global model, bit for
    bit (the budget is read beside flwr's aggregation, never fed into it)."""
    import numpy as np
    from safetensors.numpy import load_file

    import server.engine

    cfg = quick_cfg("method=fedavg", *RUN)
    _serve(cfg, tmp_path / "read")
    monkeypatch.setattr(server.engine, "budget_metrics", lambda replies: {})
    unread = _serve(cfg, tmp_path / "unread")
    assert unread["budget"]["steps_per_node_round"] is None  # the stub did take effect
    (a,) = (tmp_path / "read").rglob("model.safetensors")
    (b,) = (tmp_path / "unread").rglob("model.safetensors")
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
