"""MMBind fidelity: step budgets, the own-pair term, SSL views, batched matching."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fed_iotlm.binding import index as index_module
from fed_iotlm.binding.matching import MatchConfig, NodeEmbeddings, match_nodes
from fed_iotlm.binding.schedule import run_schedule
from fed_iotlm.binding.ssl import (
    SSLConfig,
    augment,
    pretrain_shared,
    random_rotations,
    rotation_groups,
    supcon_loss,
)
from fed_iotlm.binding.training import BindTrainConfig, train_with_partners
from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel
from fed_iotlm.models.training import SplitTensors, TrainConfig

IMU_CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz")


def _two_modality_node(n: int = 20, labelled: int = 0):
    spec = ModelSpec(
        {
            "imu": {"kind": "imu", "feature_shape": [16, 6]},
            "env": {"kind": "tabular", "feature_shape": [3]},
        },
        {"t": 2},
        dim=8,
        fusion_heads=2,
        extra={"projections": ["imu"], "rotation_groups": {"imu": [[0, 1, 2], [3, 4, 5]]}},
    )
    torch.manual_seed(0)
    y = torch.full((n,), -1)
    y[:labelled] = torch.arange(labelled) % 2
    data = SplitTensors(
        {"imu": torch.randn(n, 16, 6), "env": torch.randn(n, 3)},
        {"imu": torch.ones(n, dtype=torch.bool), "env": torch.ones(n, dtype=torch.bool)},
        {"t": y},
    )
    return MultisensoryModel(spec), data


def test_schedule_takes_exactly_the_step_budget_cycling_through_the_data():
    calls = []

    def step(s, rows):
        calls.append(rows.numel())
        return True

    done = run_schedule([10], 4, epochs=1, steps=7, gen=torch.Generator().manual_seed(0), step=step)
    assert done == {"steps": 7.0, "examples": float(sum(calls))} and len(calls) == 7
    calls.clear()
    done = run_schedule([10], 4, epochs=2, steps=None, gen=torch.Generator(), step=step)
    assert done["steps"] == 6 and done["examples"] == 20  # 2 passes of 4 + 4 + 2 rows


def test_schedule_ends_when_no_batch_can_step():
    done = run_schedule([10], 4, 1, steps=5, gen=torch.Generator(), step=lambda s, r: False)
    assert done == {"steps": 0.0, "examples": 0.0}


def test_bound_training_honours_the_step_budget():
    model, data = _two_modality_node(n=20, labelled=20)
    cfg = TrainConfig(epochs=1, batch_size=4, steps=13)
    stats = train_with_partners(model, data, {}, cfg, BindTrainConfig(), seed=0)
    assert stats["steps"] == 13 and stats["examples"] == 13 * 4


def test_own_pair_term_trains_a_node_without_labels_or_partners():
    model, data = _two_modality_node()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=8)
    stats = train_with_partners(model, data, {}, cfg, BindTrainConfig(own_pair_weight=0.1), 0)
    assert stats["steps"] > 0 and stats["loss_own_pair"] > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert any(k.startswith("enc.imu.") for k in changed)
    assert any(k.startswith("enc.env.") for k in changed)
    model, data = _two_modality_node()
    stats = train_with_partners(model, data, {}, cfg, BindTrainConfig(own_pair_weight=0.0), 0)
    assert stats["steps"] == 0  # without the term there was nothing to learn


def test_rotation_groups_from_channel_names():
    assert rotation_groups(IMU_CHANNELS) == [[0, 1, 2], [3, 4, 5]]
    assert rotation_groups(("temp", "acc_z", "acc_x", "acc_y", "gyro_x")) == [[2, 3, 1]]
    assert rotation_groups(("a", "b")) == []


def test_random_rotations_are_rotations_within_the_angle():
    rot = random_rotations(64, 30.0, torch.Generator().manual_seed(0))
    eye = torch.eye(3).expand(64, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, atol=1e-5, rtol=0)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(64), atol=1e-5)
    angle = torch.arccos(((rot.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2).clamp(-1, 1))
    assert float(angle.max()) <= math.radians(30.0) + 1e-4 and float(angle.std()) > 0.05


def test_views_rotate_accelerometer_and_gyroscope_jointly_per_sample():
    torch.manual_seed(0)
    acc = torch.randn(8, 16, 3)
    x = torch.cat([acc, acc], dim=2)  # gyro = acc: a joint rotation keeps them equal
    cfg = SSLConfig(gain=0.0, jitter=0.0, rotation_deg=90.0)
    v = augment(x, torch.Generator().manual_seed(1), cfg, rotation_groups(IMU_CHANNELS))
    torch.testing.assert_close(v[:, :, :3], v[:, :, 3:])
    # per time step the vector norm is kept (a rotation), up to the per-sample shift
    norms_in = acc.norm(dim=2).sort(dim=1).values
    torch.testing.assert_close(v[:, :, :3].norm(dim=2).sort(dim=1).values, norms_in)
    assert not torch.allclose(v[:, :, :3].sort(dim=1).values, acc.sort(dim=1).values)


def test_views_shift_each_sample_by_its_own_offset():
    t = torch.arange(32.0)
    x = t[None, :, None].expand(64, 32, 6).clone()
    cfg = SSLConfig(gain=0.0, jitter=0.0, rotation_deg=0.0)
    v = augment(x, torch.Generator().manual_seed(0), cfg)
    starts = v[:, 0, 0]
    for i in range(64):  # each row is a circular shift of the original
        torch.testing.assert_close(v[i, :, 0], torch.roll(t, -int(starts[i])))
    assert len(set(starts.tolist())) > 10  # drawn per sample, not once per batch


def test_supcon_with_distinct_ids_is_nt_xent_and_classes_attract():
    torch.manual_seed(0)
    z = torch.randn(8, 5)
    ids = torch.arange(4).repeat(2)  # rows i and i+4: two views of sample i
    zn = torch.nn.functional.normalize(z, dim=1)
    logits = zn @ zn.T / 0.5
    logits.fill_diagonal_(float("-inf"))
    target = (torch.arange(8) + 4) % 8
    ref = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(supcon_loss(z, ids, 0.5), ref)
    a, b = torch.randn(1, 5), torch.randn(1, 5)
    grouped = torch.cat([a, a + 0.01, b, b + 0.01])
    assert supcon_loss(grouped, torch.tensor([0, 0, 1, 1]), 0.5) < supcon_loss(
        grouped, torch.tensor([0, 1, 0, 1]), 0.5
    )


@pytest.mark.parametrize("method", ["contrastive", "supcon_semi"])
def test_ssl_round_trains_only_the_encoder_and_projection_head(method):
    model, data = _two_modality_node(n=24, labelled=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ssl = SSLConfig(method=method, batch_size=8)
    stats = pretrain_shared(model, data, "imu", TrainConfig(steps=5), seed=0, ssl=ssl)
    assert stats["steps"] == 5 and stats["examples"] == 40
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k, v in model.state_dict().items()
               if not torch.equal(before[k], v)}  # fmt: skip
    assert changed == {"enc.imu", "proj.imu"}


def _uploads(rng, receivers: int):
    nodes = [
        NodeEmbeddings(
            node=str(i),
            modalities=["imu", "audio"],
            shared=rng.normal(size=(30, 8)).astype(np.float32),
            ids=np.arange(30),
            tokens={"audio": rng.normal(size=(30, 4)).astype(np.float32)},
            labels=rng.integers(-1, 3, 30),
        )
        for i in range(receivers)
    ]
    donors = [
        NodeEmbeddings(
            node=str(receivers + i),
            modalities=["imu", "depth"],
            shared=rng.normal(size=(25, 8)).astype(np.float32),
            ids=np.arange(25),
            tokens={"depth": rng.normal(size=(25, 4)).astype(np.float32)},
            labels=rng.integers(-1, 3, 25),
        )
        for i in range(2)
    ]
    return nodes + donors


@pytest.mark.parametrize("use_labels", [False, True])
def test_one_index_per_missing_modality_answers_every_receiver(monkeypatch, use_labels):
    built = []
    real = index_module.build_faiss_index
    monkeypatch.setattr(
        index_module, "build_faiss_index", lambda db, cfg: built.append(len(db)) or real(db, cfg)
    )
    nodes = _uploads(np.random.default_rng(0), receivers=4)
    cfg = MatchConfig(k=2, floor=-1.0, center=False, use_labels=use_labels)
    batched = match_nodes(nodes, cfg)
    # depth: 4 receivers, one search (per class with labels, plus one for the unlabelled)
    assert len(built) == (2 if not use_labels else 2 * 4)
    for i in range(4):  # the same partners as matching each receiver alone
        alone = match_nodes([nodes[i], *nodes[4:]], cfg)[str(i)]["depth"]
        got = batched[str(i)]["depth"]
        np.testing.assert_array_equal(got.partner_ids, alone.partner_ids)
        np.testing.assert_array_equal(
            got.partner_node, np.where(alone.partner_node < 0, -1, alone.partner_node + 3)
        )
        np.testing.assert_allclose(got.embeddings, alone.embeddings)


PLAN = "partition.plan=[[imu,audio],[imu,depth],[imu,depth]]"
LABELS = "partition.label_fraction=0.1"  # most labels hidden from the nodes


def test_pair_accuracy_uses_every_true_label_hidden_or_not(quick_cfg):
    from fed_iotlm.binding.matching import Partners
    from fed_iotlm.binding.stats import binding_stats, true_train_labels
    from fed_iotlm.data.federation import build_layout

    layout = build_layout(quick_cfg("method=mmbind", "partition.shared=imu", PLAN, LABELS))
    own, donor = true_train_labels(layout, 0)["activity"], true_train_labels(layout, 1)["activity"]
    assert len(own) == len(layout.node_data(0)[0]) and (own >= 0).all()
    same = np.array([np.nonzero(donor == c)[0][0] for c in own])
    other = np.array([np.nonzero(donor != c)[0][0] for c in own])

    def stats(partner_rows):
        n = len(own)
        p = Partners(
            modality="depth",
            query_ids=np.arange(n),
            partner_node=np.ones((n, 1), np.int64),
            partner_ids=partner_rows[:, None],
            similarity=np.ones((n, 1), np.float32),
            weight=np.ones((n, 1), np.float32),
            embeddings=np.zeros((n, 1, 4), np.float32),
        )
        return binding_stats({"0": {"depth": p}}, ["0", "1", "2"], layout)["pair_accuracy"]

    assert stats(same)["activity"] == 1.0 and stats(other)["activity"] == 0.0

    # a binding that paired nothing (every partner refused) reports no similarity and no
    # pair accuracy rather than a NaN mean over nothing (results.json stays valid JSON)
    n = len(own)
    refused = Partners(
        modality="depth",
        query_ids=np.arange(n),
        partner_node=np.full((n, 1), -1, np.int64),
        partner_ids=np.full((n, 1), -1, np.int64),
        similarity=np.zeros((n, 1), np.float32),
        weight=np.zeros((n, 1), np.float32),
        embeddings=np.zeros((n, 1, 4), np.float32),
    )
    empty = binding_stats({"0": {"depth": refused}}, ["0", "1", "2"], layout)
    assert empty["pairs"] == 0 and empty["mean_similarity"] is None
    assert "pair_accuracy" not in empty
    json.dumps(empty, allow_nan=False)


def test_centralized_mmbind_logs_pair_accuracy_and_takes_pooled_budgets(quick_cfg, tmp_path):
    import json

    from fed_iotlm.baselines import run_centralized_mmbind

    cfg = quick_cfg(
        "method=centralized_mmbind", "partition.shared=imu", PLAN, LABELS, "mlflow.enabled=false",
        "rounds=2", "train.steps=3", "binding.pretrain_rounds=2", "binding.rebind_every=1",
    )  # fmt: skip
    res = json.loads(run_centralized_mmbind(cfg, tmp_path).read_text())
    assert set(res["binding"]["pair_accuracy_by_binding"]) == {"1", "2"}
    assert res["ssl"]["steps"] == 3 * 2 * 3  # steps x SSL rounds x nodes, one optimiser
    assert [r["steps"] for r in res["history"]] == [9, 9]  # steps x nodes per round


def test_ssl_rounds_take_their_own_step_budget_when_given_one(quick_cfg, tmp_path):
    import json

    from fed_iotlm.baselines import run_centralized_mmbind
    from fed_iotlm.experiment import ssl_train_config

    base = ["partition.shared=imu", "train.steps=3", "binding.pretrain_epochs=4"]
    assert ssl_train_config(quick_cfg(*base)).steps == 3  # the round budget by default
    assert ssl_train_config(quick_cfg(base[0], "binding.pretrain_epochs=4")).steps is None
    assert ssl_train_config(quick_cfg(base[0], "binding.pretrain_epochs=4")).epochs == 4
    own = quick_cfg(*base, "binding.pretrain_steps=5")
    assert ssl_train_config(own).steps == 5
    cfg = quick_cfg(
        "method=centralized_mmbind", *base, "binding.pretrain_steps=5", PLAN, LABELS,
        "mlflow.enabled=false", "rounds=1", "binding.pretrain_rounds=2",
    )  # fmt: skip
    res = json.loads(run_centralized_mmbind(cfg, tmp_path).read_text())
    assert res["ssl"]["steps"] == 5 * 2 * 3  # SSL steps x SSL rounds x nodes
    assert [r["steps"] for r in res["history"]] == [9]  # supervised rounds keep train.steps


def test_pair_accuracy_counts_only_pairs_whose_two_samples_are_labelled():
    """Real data leaves minutes unlabelled (-1) for a task: two unlabelled samples are
    not "the same class", a labelled against an unlabelled one is not "different"."""
    from fed_iotlm.binding.stats import labelled_agreement

    own = np.array([[0, 0], [1, 1], [-1, -1], [2, 2]])
    partner = np.array([[0, 1], [-1, 1], [-1, 3], [2, -2]])  # -2: no pair made
    ok = np.array([[True, True], [True, True], [True, True], [True, False]])
    agree = labelled_agreement(own, partner, ok)
    # labelled pairs: (0,0) same, (0,1) diff, (1,1) same, (2,2) same
    assert agree.tolist() == [True, False, True, True]
