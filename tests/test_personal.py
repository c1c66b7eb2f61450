"""Personalised site adapters (fed_iotlm/personal.py, clients/app.py): they start as the
identity, stay on the node (never uploaded, kept in context.state across rounds and
workers), are used for the node's own evaluation, and beat one global model on a site
whose IMU is worn upside down."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from clients.app import make_client_app
from clients.node import get_node
from fed_iotlm.data.federation import build_layout
from fed_iotlm.data.shift import apply_shifts
from fed_iotlm.experiment import model_spec
from fed_iotlm.federation.aggregation import NodeUpdate, aggregate_groups
from fed_iotlm.federation.records import (
    metrics_to_counts,
    numpy_to_record,
    record_to_numpy,
    state_to_numpy,
)
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors
from fed_iotlm.personal import STATE_KEY, PersonalConfig, attach_personal
from tests.client_mods import train_keys_recorder
from tests.server_side import pooled_norm

# ----------------------------------------------------------------- an in-process federation


def _message(kind: str, arrays: dict, rnd: int, node: int, cfg: dict) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=node + 1,
        reply_to_message_id="",
        group_id=str(rnd),
        created_at=time.time(),
        ttl=3600,
        message_type=kind,
    )
    content = RecordDict(
        {
            "arrays": numpy_to_record(arrays),
            "config": ConfigRecord({"server-round": rnd}),
            "norm": pooled_norm(cfg),  # what the server attaches after its statistics round
        }
    )
    return Message(content, metadata=meta)


def federate(cfg: dict) -> dict:
    """The real ClientApp driven in-process: each round every node trains on the global
    state, the server averages each group over its holders (the modality-aware rule);
    then each node evaluates the final state.  One Context per node, as Flower keeps."""
    app = make_client_app(cfg)
    n = build_layout(cfg).num_nodes
    torch.manual_seed(int(cfg["seed"]))
    state = state_to_numpy(MultisensoryModel(model_spec(cfg)))
    contexts = [
        Context(
            run_id=1,
            node_id=k + 1,
            node_config={"partition-id": k},
            state=RecordDict(),
            run_config={},
        )
        for k in range(n)
    ]
    uploaded: list[set[str]] = []
    for rnd in range(1, int(cfg["rounds"]) + 1):
        updates = []
        for k in range(n):
            reply = app(_message("train", state, rnd, k, cfg), contexts[k])
            assert not reply.has_error(), reply.error
            arrays = record_to_numpy(reply.content["arrays"])
            uploaded.append(set(arrays))
            updates.append(NodeUpdate(str(k), arrays, metrics_to_counts(reply.content["metrics"])))
        state = aggregate_groups(state, updates).state
    accuracy = {}
    for k in range(n):
        reply = app(_message("evaluate", state, 0, k, cfg), contexts[k])
        accuracy[k] = float(reply.content["metrics"]["accuracy"])
    return {"accuracy": accuracy, "state": state, "contexts": contexts, "uploaded": uploaded}


# -------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_adapters_start_as_identity_and_leave_shared_keys_alone(quick_cfg, kind):
    cfg = quick_cfg()
    layout = build_layout(cfg)
    data = SplitTensors.from_split(layout.node_data(0)[0])
    x, mask, _ = data.batch(torch.arange(16))
    torch.manual_seed(0)
    model = MultisensoryModel(model_spec(cfg)).eval()
    shared = dict(model.state_dict())
    with torch.no_grad():
        ref = model(x, mask)
    keys = attach_personal(model, PersonalConfig(True, kind, rank=3, keep_local=("head",)), 7)
    with torch.no_grad():
        out = model(x, mask)
    for t in ref:
        torch.testing.assert_close(out[t], ref[t])
    adapters = {k for k in keys if k.startswith("adapt.")}
    assert adapters and adapters == {k for k in model.state_dict() if k.startswith("adapt.")}
    assert keys - adapters == {k for k in shared if k.startswith("head.")}
    assert {k for k in model.state_dict() if not k.startswith("adapt.")} == set(shared)
    # a non-zero adapter does change the output (the hooks are live)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.startswith("adapt."):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        assert not torch.allclose(model(x, mask)["activity"], ref["activity"])
    with pytest.raises(ValueError, match="already attached"):
        attach_personal(model, PersonalConfig(True, kind), 7)


def test_config_errors(quick_cfg):
    from fed_iotlm.personal import personal_config

    with pytest.raises(ValueError, match="personal.kind"):
        personal_config({"personal": {"enabled": True, "kind": "prompt"}})
    with pytest.raises(ValueError, match="keep_local needs a modality-aware"):
        get_node(
            quick_cfg("method=fedavg", "personal.enabled=true", "personal.keep_local=[head]"), 0
        )


# ---------------------------------------------------------------------------- mechanics


def test_adapters_stay_on_the_node_and_persist_across_rounds(quick_cfg):
    cfg = quick_cfg("personal.enabled=true", "personal.keep_local=[head.location]", "rounds=2")
    run = federate(cfg)
    for keys in run["uploaded"]:  # nothing personal is ever uploaded
        assert not any(k.startswith("adapt.") or k.startswith("head.location.") for k in keys)
        assert any(k.startswith("head.activity.") for k in keys)
    assert not any(k.startswith("adapt.") for k in run["state"])  # the server never had them
    node = get_node(cfg, 0)
    stored = record_to_numpy(run["contexts"][0].state[STATE_KEY])
    assert set(stored) == node.personal_keys
    trained = [k for k in stored if k.endswith("up.weight")]
    assert trained and all(np.abs(stored[k]).max() > 0 for k in trained)  # moved off identity
    # another worker (or a model that last served another node) gets them back from the
    # node's context.state, not from whatever its cached model holds
    with torch.no_grad():
        for k, p in node.model.named_parameters():
            if k in node.personal_keys:
                p.zero_()
    app = make_client_app(cfg)
    app(_message("evaluate", run["state"], 0, 0, cfg), run["contexts"][0])
    own = node.model.state_dict()
    for k, v in stored.items():
        np.testing.assert_array_equal(own[k].numpy(), v)
    # a node without stored state starts from the identity adapters
    fresh = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    app(_message("evaluate", run["state"], 0, 0, cfg), fresh)
    for k, v in node.personal_init.items():
        np.testing.assert_array_equal(node.model.state_dict()[k].numpy(), v)


def test_disabled_personalisation_changes_nothing(quick_cfg):
    cfg = quick_cfg("rounds=1")
    node = get_node(cfg, 0)
    assert node.personal_keys == frozenset() and not hasattr(node.model, "adapt")
    run = federate(cfg)
    assert STATE_KEY not in run["contexts"][0].state


# ------------------------------------------------------------------------- the comparison

# Node 1 of 4 IMU-only nodes wears its IMU rotated by a rotation of severity 1.0 (up to
# 180 degrees); with seed 2 the drawn rotation is ~170 degrees (asserted below), i.e. the
# IMU worn upside down, which flips the sign of the axis and offset cues: the global
# model, fitted mostly to the other three nodes, reads node 1's classes as other classes.
STRONG_SHIFT = [
    "seed=2",
    "data.num_train=1200",
    "data.num_test=400",
    "data.site_shift=0",
    "data.imu_cues=1.0",
    "partition.plan=[[imu],[imu],[imu],[imu]]",
    "shift=placement",
    "shift.0.severity=1.0",
    "shift.0.sites=[1]",
    "shift.0.spread=0",
    "rounds=5",
    "train.epochs=2",
]


def _rotation_angle_deg(cfg: dict, site: int) -> float:
    """The angle of the rotation ``site`` gets, read off the transform itself."""
    eye = np.concatenate([np.eye(3), np.eye(3)], axis=1)[None].astype(np.float32)
    from fed_iotlm.data.dataset import Split

    probe = Split({"imu": eye}, {"imu": np.ones(1, bool)}, {"t": np.zeros(1, np.int64)})
    rot = apply_shifts(probe, site, cfg["shift"], int(cfg["seed"])).x["imu"][0][:, :3]
    return float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))))


def test_personal_adapters_beat_the_global_model_on_a_strongly_shifted_site(quick_cfg):
    glob_cfg = quick_cfg(*STRONG_SHIFT)
    assert _rotation_angle_deg(glob_cfg, 1) > 150
    glob = federate(glob_cfg)["accuracy"]
    pers = federate(quick_cfg(*STRONG_SHIFT, "personal.enabled=true"))["accuracy"]
    # the same margin held for the 5 (seed, site) pairs with a rotation > 150 degrees
    # among seeds 0-6 (0.15 to 0.6 points); the test keeps one of them
    assert pers[1] > glob[1] + 0.1, (pers, glob)
    others = [k for k in glob if k != 1]
    assert np.mean([pers[k] for k in others]) > np.mean([glob[k] for k in others]) - 0.05


# ---------------------------------------------------------------------- a real simulation


@pytest.mark.integration
def test_flower_run_with_adapters_and_diagnostics(quick_cfg, tmp_path):
    from simulations.run import run_experiment

    cfg = quick_cfg(
        "personal.enabled=true",
        "diagnostics.enabled=true",
        "diagnostics.probe_samples=64",
        "shift=placement",
        "mlflow.enabled=false",
    )
    log = tmp_path / "uploads.jsonl"
    res = json.loads(run_experiment(cfg, tmp_path / "run", [train_keys_recorder(log)]).read_text())
    uploads = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(uploads) == 3 * 2  # nodes x rounds
    assert not any(k.startswith("adapt.") for keys in uploads for k in keys)
    assert all("adapt" not in g for h in res["holders_by_round"].values() for g in h)
    diag = res["diagnostics"]
    assert diag["shifted_sites"] == [0, 1, 2]
    assert set(diag["embedding_shift"]) == {"before", "after"}
    assert set(diag["accuracy_by_node"]) == set(res["test"]["accuracy_by_node"]) == {"0", "1", "2"}
