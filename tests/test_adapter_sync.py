"""sync.mode=adapters: encoders frozen, only adapters/fusion/heads travel and change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fed_iotlm.experiment import model_spec
from fed_iotlm.federation.adapter_sync import adapter_counts, sync_config
from fed_iotlm.federation.bundle import load_bundle
from fed_iotlm.federation.groups import group_of
from fed_iotlm.federation.records import state_to_numpy
from fed_iotlm.federation.run_model import sync_model
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.settings import compose
from tests.client_mods import train_keys_recorder


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_adapters_start_as_identity_with_encoders_frozen(kind):
    cfg = compose(["experiment=quick", "sync.mode=adapters", f"sync.kind={kind}"])
    spec = model_spec(cfg)
    torch.manual_seed(0)
    plain = MultisensoryModel(spec)
    torch.manual_seed(0)
    model = sync_model(cfg, spec)
    new = set(model.state_dict()) - set(plain.state_dict())
    assert new and all(k.startswith("adapter.") for k in new)
    assert {group_of(k) for k in new} == {f"adapter.{m}" for m in spec.modalities}
    assert not any(p.requires_grad for p in model.enc.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("enc."))
    x = {m: torch.randn(5, *info["feature_shape"]) for m, info in spec.modalities.items()}
    mask = {m: torch.ones(5, dtype=torch.bool) for m in spec.modalities}
    with torch.no_grad():
        for t, logits in plain(x, mask).items():
            torch.testing.assert_close(model(x, mask)[t], logits)


def test_counts_and_config():
    assert adapter_counts({"enc.imu": 3.0, "fusion": 4.0, "head.activity": 2.0}) == {
        "adapter.imu": 3.0,
        "fusion": 4.0,
        "head.activity": 2.0,
    }
    assert not sync_config({}).adapters
    with pytest.raises(ValueError, match="sync.mode"):
        sync_config({"sync": {"mode": "deltas"}})
    with pytest.raises(ValueError, match="modality-aware"):
        sync_config({"method": "fedavg", "sync": {"mode": "adapters"}})


@pytest.mark.integration
def test_flower_run_federates_adapters_and_keeps_encoders_frozen(quick_cfg, tmp_path):
    from simulations.run import run_experiment

    cfg = quick_cfg("sync.mode=adapters", "mlflow.enabled=false")
    log = tmp_path / "uploads.jsonl"
    res = json.loads(run_experiment(cfg, tmp_path / "run", [train_keys_recorder(log)]).read_text())

    uploads = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(uploads) == 3 * 2  # nodes x rounds
    sent = {k for keys in uploads for k in keys}
    assert not any(k.startswith("enc.") for k in sent)
    assert {group_of(k).split(".")[0] for k in sent} == {"adapter", "fusion", "head"}
    # plan: node 0 [imu, audio], node 1 [imu, depth], node 2 [thermal]
    for holders in res["holders_by_round"].values():
        assert sorted(holders["adapter.imu"]) == ["0", "1"]
        assert holders["adapter.thermal"] == ["2"]
        assert not any(g.startswith("enc.") for g in holders)

    # the encoders end exactly where they started; adapters and heads moved
    torch.manual_seed(int(cfg["seed"]))
    initial = state_to_numpy(sync_model(cfg, model_spec(cfg)))
    model, meta = load_bundle(tmp_path / "run" / "bundle")
    final = state_to_numpy(model)
    assert meta["sync"]["mode"] == "adapters" and set(final) == set(initial)
    for key in final:
        if key.startswith("enc."):
            np.testing.assert_array_equal(final[key], initial[key], err_msg=key)
    for prefix in ("adapter.imu.", "fusion.", "head.activity."):
        assert any(
            not np.array_equal(final[k], initial[k]) for k in final if k.startswith(prefix)
        ), prefix
    assert res["comm"]["bytes_up_per_node_round"] < res["comm"]["model_bytes"] / 2
