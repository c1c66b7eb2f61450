"""Encoders, masked fusion and heads with every modality subset."""

from __future__ import annotations

import itertools

import pytest
import torch

from fed_iotlm.models.fusion import MaskedAttentionFusion
from fed_iotlm.models.heads import multitask_loss
from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel

SPEC = ModelSpec(
    modalities={
        "imu": {"kind": "imu", "feature_shape": [32, 6]},
        "audio": {"kind": "audio", "feature_shape": [9, 16]},
        "depth": {"kind": "depth", "feature_shape": [1, 8, 8]},
        "env": {"kind": "tabular", "feature_shape": [5]},
    },
    tasks={"activity": 6, "location": 3},
    dim=16,
)
SUBSETS = [list(c) for r in range(1, 5) for c in itertools.combinations(SPEC.modalities, r)]


def _batch(n: int, mods: list[str]):
    x = {m: torch.randn(n, *SPEC.modalities[m]["feature_shape"]) for m in mods}
    mask = {m: torch.ones(n, dtype=torch.bool) for m in mods}
    return x, mask


@pytest.mark.parametrize("mods", SUBSETS, ids=lambda m: "+".join(m))
def test_every_subset_gives_finite_logits_per_task(mods):
    torch.manual_seed(0)
    model = MultisensoryModel(SPEC)
    out = model(*_batch(4, mods))
    assert set(out) == {"activity", "location"}
    assert out["activity"].shape == (4, 6) and out["location"].shape == (4, 3)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_state_dict_keys_are_parameter_groups():
    keys = MultisensoryModel(SPEC).state_dict()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"enc", "fusion", "head"}
    assert {k.split(".")[1] for k in keys if k.startswith("enc.")} == set(SPEC.modalities)
    assert {k.split(".")[1] for k in keys if k.startswith("head.")} == {"activity", "location"}


def test_masked_modality_does_not_change_the_output():
    """A modality masked out for a sample must not influence that sample at all."""
    torch.manual_seed(0)
    model = MultisensoryModel(SPEC).eval()
    x, mask = _batch(3, ["imu", "audio"])
    mask["audio"] = torch.tensor([False, True, False])
    x2 = {k: v.clone() for k, v in x.items()}
    x2["audio"][0] += 100.0  # garbage in a masked slot
    a, b = model.embed(x, mask), model.embed(x2, mask)
    assert torch.allclose(a[0], b[0], atol=1e-5)
    only_imu = model.embed({"imu": x["imu"]}, {"imu": mask["imu"]})
    assert torch.allclose(a[0], only_imu[0], atol=1e-5)
    assert not torch.allclose(a[1], only_imu[1], atol=1e-3)


def test_zero_filled_baseline_sees_the_zeros():
    torch.manual_seed(0)
    spec = ModelSpec(**{**SPEC.to_json(), "use_mask": False})
    model = MultisensoryModel(spec).eval()
    x, mask = _batch(2, ["imu"])
    z = model.embed(x, mask)  # absent modalities are fed as zeros, not skipped
    masked = MultisensoryModel(SPEC).eval()
    masked.load_state_dict(model.state_dict())
    assert not torch.allclose(z, masked.embed(x, mask), atol=1e-4)


def test_fusion_rows_without_any_modality_are_zero_not_nan():
    fusion = MaskedAttentionFusion(8, heads=2)
    tokens = torch.randn(3, 2, 8)
    present = torch.tensor([[True, False], [False, False], [True, True]])
    out = fusion(tokens, present)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(8))


def test_loss_ignores_unlabelled_entries():
    logits = {"a": torch.randn(4, 3, requires_grad=True), "b": torch.randn(4, 2)}
    labels = {"a": torch.tensor([0, -1, 2, -1]), "b": torch.tensor([-1, -1, -1, -1])}
    loss, counts = multitask_loss(logits, labels)
    assert counts == {"a": 2, "b": 0}
    expected = torch.nn.functional.cross_entropy(logits["a"][[0, 2]], labels["a"][[0, 2]])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits["a"].grad[1].abs().sum() == 0  # the unlabelled row gets no gradient


def test_no_modality_given_is_a_clear_error():
    with pytest.raises(ValueError, match="no modality given"):
        MultisensoryModel(SPEC).embed({}, {})


def test_late_fusion_averages_logits_over_present_modalities_only():
    torch.manual_seed(0)
    model = MultisensoryModel(ModelSpec(**{**SPEC.to_json(), "fusion": "late"})).eval()
    x, mask = _batch(3, ["imu", "audio"])
    mask["audio"] = torch.tensor([True, False, True])
    out = model(x, mask)["activity"]
    tok = model.encode(x)
    head = model.head["activity"]
    torch.testing.assert_close(out[0], (head(tok["imu"][:1]) + head(tok["audio"][:1]))[0] / 2)
    torch.testing.assert_close(out[1], head(tok["imu"][1:2])[0])
