"""A SecAgg+ round whose nodes all fail is reported as the round's fault (server/secure_rounds.py).

Flower's SecAgg+ workflow keeps the nodes' errors to itself and stops once too few are
left, so a round where every node's ``train`` handler raised used to look like a quiet
round (``secagg.nodes: 0``, ``secagg.failures: 0``, no ``faults_by_round``).  Now it is
what a plaintext round with no usable reply is: skipped, the model kept, and each node's
reason in results.json's ``faults_by_round`` and the history row.

The whole ServerApp runs in-process on the real ClientApp (:mod:`tests.inprocess_grid`):
the statistics round is summed under SecAgg+ as usual, then a client mod makes every
node's train handler raise, either from the census on or only in the round's own sum.
"""

from __future__ import annotations

import json

import pytest

from tests.inprocess_grid import NODES, AppGrid


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's Message() needs a run id outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _failing_train(stage: str):
    """A client mod: the train handler raises on every node in the training rounds'
    ``stage`` (``census``: from the census on; ``train``: the round's own sum only)."""
    from clients.secure import phase
    from clients.statistics import is_secure_statistics

    def failing(msg) -> bool:
        if msg.metadata.message_type != "train" or is_secure_statistics(msg):
            return False
        return stage == "census" or phase(msg) == stage

    def mod(msg, context, call_next):
        if failing(msg):
            pid = context.node_config["partition-id"]
            raise RuntimeError(f"injected: partition {pid} fails in {phase(msg)}")
        return call_next(msg, context)

    return mod


@pytest.mark.parametrize("stage", ["census", "train"])
def test_a_round_without_any_masked_vector_is_a_reported_fault(
    stage, quick_cfg, tmp_path, task_identity
):
    from flwr.app import Context, RecordDict

    from clients.app import make_client_app
    from server.app import make_server_app

    cfg = quick_cfg("secagg.enabled=true", "mlflow.enabled=false", "train.steps=1")
    grid = AppGrid(make_client_app(cfg, mods=[_failing_train(stage)]))
    make_server_app(cfg, tmp_path / "out")(grid, Context(1, 0, {}, RecordDict(), {}))

    res = json.loads((tmp_path / "out" / "results.json").read_text())
    rounds = [str(r) for r in range(1, cfg["rounds"] + 1)]
    assert sorted(res["faults_by_round"]) == rounds
    for rnd in rounds:
        fault = res["faults_by_round"][rnd]
        assert fault["skipped"] is True and fault["missing"] == []
        assert [f.split(":")[0] for f in fault["failed"]] == [f"node {n}" for n in sorted(NODES)]
        assert all("injected: partition" in f for f in fault["failed"])
    for row in res["history"]:
        assert row["secagg.nodes"] == 0 and row["secagg.failures"] == len(NODES)
        assert row["round_skipped"] == 1 and row["nodes_answered"] == 0
        assert row["nodes_sent"] == len(NODES)
