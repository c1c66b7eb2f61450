"""MMBind matching, weights and privacy knobs against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.binding.index import SearchConfig, recall_at_1, top_k
from fed_iotlm.binding.matching import MatchConfig, NodeEmbeddings, match_nodes
from fed_iotlm.binding.privacy import add_noise, dequantize_int8, quantize_int8
from fed_iotlm.binding.weights import pair_weight


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_top_k(q, db, k):
    sims = _unit(q) @ _unit(db).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


@pytest.mark.parametrize("k", [1, 3])
def test_exact_top_k_equals_brute_force(k):
    rng = np.random.default_rng(0)
    q, db = rng.normal(size=(50, 16)), rng.normal(size=(200, 16))
    sims, ids = top_k(q, db, k)
    ref_s, ref_i = _brute_top_k(q, db, k)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)


def test_approximate_index_beyond_exact_limit_has_high_recall():
    rng = np.random.default_rng(1)
    db, q = rng.normal(size=(3000, 16)), rng.normal(size=(300, 16))
    _, ids = top_k(q, db, 1, SearchConfig(exact_limit=1000))
    assert recall_at_1(q, db, ids, sample=300) >= 0.95


def test_fewer_candidates_than_k_leaves_marked_empty_slots():
    sims, ids = top_k(np.ones((2, 4)), np.eye(4)[:2], 3)
    assert (ids[:, 2] == -1).all() and np.isneginf(sims[:, 2]).all()


def _nodes(rng, labels=False):
    specs = [("a", ["imu", "audio"]), ("b", ["imu", "depth"]), ("c", ["imu", "depth", "audio"])]
    out = []
    for name, mods in specs:
        n = 40
        out.append(
            NodeEmbeddings(
                node=name,
                modalities=mods,
                shared=rng.normal(size=(n, 8)).astype(np.float32),
                ids=np.arange(100, 100 + n),
                tokens={m: rng.normal(size=(n, 4)).astype(np.float32) for m in mods if m != "imu"},
                labels=rng.integers(0, 3, n) if labels else None,
            )
        )
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_matching_equals_brute_force_over_other_nodes_holding_the_modality(k):
    nodes = _nodes(np.random.default_rng(2))
    result = match_nodes(nodes, MatchConfig(k=k, floor=-1.0, center=False))
    assert set(result["a"]) == {"depth"} and set(result["b"]) == {"audio"} and result["c"] == {}
    p = result["a"]["depth"]  # donors: b and c (never a itself)
    db = np.concatenate([nodes[1].shared, nodes[2].shared])
    ref_s, ref_i = _brute_top_k(nodes[0].shared, db, k)
    np.testing.assert_allclose(p.similarity, ref_s, atol=1e-5)
    expect_node = np.where(ref_i < 40, 1, 2)
    np.testing.assert_array_equal(p.partner_node, expect_node)
    np.testing.assert_array_equal(p.partner_ids, 100 + ref_i % 40)
    tokens = np.concatenate([nodes[1].tokens["depth"], nodes[2].tokens["depth"]])
    np.testing.assert_allclose(p.embeddings, tokens[ref_i])
    np.testing.assert_allclose(p.weight, (ref_s + 1) / 2, atol=1e-5)  # floor -1: w = (s + 1) / 2


def test_label_aware_matching_pairs_only_same_class():
    nodes = _nodes(np.random.default_rng(3), labels=True)
    nodes[0].labels[:5] = -1  # unlabelled samples are matched without labels
    p = match_nodes(nodes, MatchConfig(k=1, floor=-1.0, use_labels=True, center=False))["a"][
        "depth"
    ]
    donor_labels = {1: nodes[1].labels, 2: nodes[2].labels}
    for row in range(5, 40):
        j, pid = p.partner_node[row, 0], p.partner_ids[row, 0] - 100
        assert donor_labels[j][pid] == nodes[0].labels[row]
        # and it is the most similar among same-class candidates (brute force)
        cands = [
            (jj, r)
            for jj in (1, 2)
            for r in range(40)
            if donor_labels[jj][r] == nodes[0].labels[row]
        ]
        vecs = np.stack([nodes[jj].shared[r] for jj, r in cands])
        best = cands[int(np.argmax(_unit(vecs) @ _unit(nodes[0].shared[row : row + 1]).T))]
        assert (j, pid) == best


def test_similarity_floor_refuses_pairs_visibly():
    nodes = _nodes(np.random.default_rng(4))
    p = match_nodes(nodes, MatchConfig(k=1, floor=0.6, center=False))["a"]["depth"]
    low = p.similarity[:, 0] < 0.6
    assert low.any() and p.refused == int(low.sum())
    assert (p.weight[low] == 0).all() and (p.embeddings[low] == 0).all()


def test_pair_weight_is_non_negative_and_monotone():
    s = np.linspace(-1, 1, 401)
    for floor in (-1.0, 0.0, 0.5):
        for power in (0.5, 1.0, 2.0):
            w = pair_weight(s, floor, power)
            assert (w >= 0).all() and (w <= 1).all()
            assert (np.diff(w) >= 0).all()
            assert w[-1] == pytest.approx(1.0)
    assert pair_weight(np.array([-np.inf, np.nan]), 0.0).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        pair_weight(s, floor=1.0)


def test_int8_roundtrip_and_noise():
    x = np.random.default_rng(5).normal(size=(20, 16)).astype(np.float32)
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8
    np.testing.assert_allclose(dequantize_int8(q, scale), x, atol=np.abs(x).max() / 127)
    noisy = add_noise(x, 0.1, seed=0)
    assert 0.05 < np.std(noisy - x) < 0.15
    assert add_noise(x, 0.0, seed=0) is x


def test_weighted_info_nce_prefers_true_pairs_and_respects_weights():
    import torch

    from fed_iotlm.binding.loss import weighted_info_nce

    torch.manual_seed(0)
    p = torch.randn(8, 16)
    aligned = weighted_info_nce(p.clone().requires_grad_(), p, torch.ones(8))
    shuffled = weighted_info_nce(p[torch.randperm(8)].requires_grad_(), p, torch.ones(8))
    assert aligned < shuffled
    a = torch.randn(8, 16, requires_grad=True)
    w = torch.zeros(8)
    assert weighted_info_nce(a, p, w).item() == 0.0
    w[0] = 1.0
    weighted_info_nce(a, p.requires_grad_(), w).backward()
    assert p.grad is None  # partners are constants
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_bound_training_skips_batches_with_nothing_to_learn():
    import torch

    from fed_iotlm.binding.training import BindTrainConfig, BoundData, train_bound
    from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel
    from fed_iotlm.models.training import SplitTensors, TrainConfig

    spec = ModelSpec(
        {"env": {"kind": "tabular", "feature_shape": [3]}}, {"t": 2}, dim=8, fusion_heads=2
    )
    model = MultisensoryModel(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = SplitTensors(
        {"env": torch.randn(6, 3)},
        {"env": torch.ones(6, dtype=torch.bool)},
        {"t": torch.full((6,), -1)},
    )
    train_bound([BoundData(data, {})], model, TrainConfig(epochs=1), BindTrainConfig(), seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
