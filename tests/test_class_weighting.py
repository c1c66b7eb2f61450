"""``train.class_weighting=balanced`` (fed_iotlm/models/class_weights.py): the weights
formula, the weighted loss against a hand computation, ``none`` left bit-identical, the
federation's global counts as the sum of the nodes' counts (the real ClientApp answering
the real statistics round through an in-process Grid), and the baselines' records."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fed_iotlm.models.class_weights import (
    add_counts,
    balanced_weights,
    class_counts,
    class_weighting_mode,
)
from fed_iotlm.models.heads import multitask_loss

# ----------------------------------------------------------------------------- formula


def test_balanced_weights_are_n_over_k_n_c_with_unlabelled_excluded_and_empty_at_zero(caplog):
    y = {"act": np.array([0, 0, 0, 1, -1, 2, 2, -1])}  # 6 labelled, class 3 never seen
    counts = class_counts(y, {"act": 4})
    np.testing.assert_array_equal(counts["act"], [3, 1, 2, 0])
    with caplog.at_level(logging.WARNING, logger="fed_iotlm.models.class_weights"):
        w = balanced_weights(counts, "node 7's data")["act"]
    np.testing.assert_allclose(w, [6 / (4 * 3), 6 / (4 * 1), 6 / (4 * 2), 0.0])
    assert np.all(np.isfinite(w))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "'act'" in warning and "class 3" in warning and "node 7's data" in warning
    # every seen class carries the same total weight: w_c · n_c = n / K
    np.testing.assert_allclose((w * counts["act"])[:3], 6 / 4)


def test_a_task_without_any_label_gets_zero_weights_not_a_division_by_zero(caplog):
    counts = class_counts({"loc": np.full(5, -1)}, {"loc": 2})
    with caplog.at_level(logging.WARNING, logger="fed_iotlm.models.class_weights"):
        w = balanced_weights(counts)["loc"]
    np.testing.assert_array_equal(w, [0.0, 0.0])
    assert len(caplog.records) == 2


def test_a_label_beyond_the_tasks_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"task 'act': label 4 is outside its 4 classes"):
        class_counts({"act": np.array([0, 4])}, {"act": 4})


def test_counts_of_disagreeing_class_numbers_do_not_add():
    with pytest.raises(ValueError, match="nodes disagree"):
        add_counts({"act": np.array([1, 2])}, {"act": np.array([1, 2, 3])})


def test_the_setting_is_checked():
    assert class_weighting_mode({}) == "none"
    assert class_weighting_mode({"train": {"class_weighting": "balanced"}}) == "balanced"
    with pytest.raises(ValueError, match=r"train.class_weighting='inverse': expected one of"):
        class_weighting_mode({"train": {"class_weighting": "inverse"}})


# ---------------------------------------------------------------------------- the loss


def _logits_and_labels():
    g = torch.Generator().manual_seed(3)
    logits = {"act": torch.randn(6, 3, generator=g, requires_grad=True)}
    labels = {"act": torch.tensor([0, 2, -1, 2, 1, 2])}
    return logits, labels


def _nll(logits: torch.Tensor, i: int, c: int) -> float:
    """-log softmax(logits[i])[c], from the definition."""
    row = [float(v) for v in logits[i].detach()]
    return -(row[c] - math.log(sum(math.exp(v) for v in row)))


def test_the_balanced_loss_equals_a_hand_computation():
    logits, labels = _logits_and_labels()
    cw = (0.5, 2.0, 0.25)
    loss, counts = multitask_loss(logits, labels, class_weights={"act": cw})
    rows = [(i, c) for i, c in enumerate(labels["act"].tolist()) if c >= 0]
    num = sum(cw[c] * _nll(logits["act"], i, c) for i, c in rows)
    den = sum(cw[c] for _, c in rows)
    assert counts == {"act": 5}
    assert float(loss) == pytest.approx(num / den, rel=1e-6)
    loss.backward()
    assert logits["act"].grad[2].abs().sum() == 0  # the unlabelled row is not trained


def test_the_balanced_loss_with_sample_weights_equals_a_hand_computation():
    logits, labels = _logits_and_labels()
    cw, sw = (0.5, 2.0, 0.25), torch.tensor([1.0, 0.5, 9.0, 0.0, 2.0, 1.0])
    loss, _ = multitask_loss(logits, labels, class_weights={"act": cw}, sample_weight=sw)
    rows = [(i, c) for i, c in enumerate(labels["act"].tolist()) if c >= 0]
    num = sum(float(sw[i]) * cw[c] * _nll(logits["act"], i, c) for i, c in rows)
    den = sum(float(sw[i]) * cw[c] for i, c in rows)
    assert float(loss) == pytest.approx(num / den, rel=1e-6)


def test_a_batch_of_zero_weight_classes_only_contributes_nothing():
    logits, labels = _logits_and_labels()
    loss, _ = multitask_loss(logits, labels, class_weights={"act": (0.0, 0.0, 0.0)})
    assert float(loss) == 0.0 and torch.isfinite(loss)


def test_wrongly_sized_weights_are_refused():
    logits, labels = _logits_and_labels()
    with pytest.raises(ValueError, match="2 weights for a task of 3 classes"):
        multitask_loss(logits, labels, class_weights={"act": (1.0, 1.0)})


def test_none_leaves_the_loss_bit_identical():
    """Without class weights the loss is exactly the unweighted mean cross-entropy (and
    the sample-weighted mean), bit for bit; train_config gives no weights under none."""
    from fed_iotlm.experiment import train_config

    logits, labels = _logits_and_labels()
    keep = labels["act"] >= 0
    loss, _ = multitask_loss(logits, labels)
    assert torch.equal(loss, F.cross_entropy(logits["act"][keep], labels["act"][keep]))
    sw = torch.tensor([1.0, 0.5, 9.0, 0.0, 2.0, 1.0])
    loss, _ = multitask_loss(logits, labels, sample_weight=sw)
    per = F.cross_entropy(logits["act"][keep], labels["act"][keep], reduction="none")
    assert torch.equal(loss, (sw[keep] * per).sum() / sw[keep].sum())
    assert train_config({"train": {}}).class_weights is None
    assert train_config({"train": {"class_weighting": "balanced"}}).class_weights is None


def test_mmbind_weighs_its_own_and_its_pseudo_pair_supervised_terms(monkeypatch):
    """MMBind's supervised terms (own modalities, and fused with partners) take the same
    class weights as plain training."""
    import fed_iotlm.binding.training as bt
    from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel
    from fed_iotlm.models.training import SplitTensors, TrainConfig

    seen = []

    def recording(logits, labels, weights=None, class_weights=None, sample_weight=None):
        seen.append((class_weights, sample_weight is not None))
        return multitask_loss(logits, labels, weights, class_weights, sample_weight)

    monkeypatch.setattr(bt, "multitask_loss", recording)
    torch.manual_seed(0)
    mods = {m: {"kind": "tabular", "feature_shape": [3]} for m in ("a", "b")}
    model = MultisensoryModel(ModelSpec(mods, {"t": 2}, dim=8, fusion_heads=2))
    n = 8
    data = SplitTensors(
        {"a": torch.randn(n, 3)}, {"a": torch.ones(n, dtype=torch.bool)},
        {"t": torch.tensor([0, 0, 0, 0, 0, 0, 1, -1])},
    )  # fmt: skip
    partners = {"b": bt.PartnerTensors(torch.randn(n, 2, 8), torch.full((n, 2), 0.5))}
    cw = {"t": (0.5, 3.0)}
    cfg = TrainConfig(epochs=1, batch_size=8, class_weights=cw)
    bt.train_with_partners(model, data, partners, cfg, bt.BindTrainConfig(), seed=0)
    assert seen == [(cw, False), (cw, True)]


# ---------------------------------------------------------- the federation's global counts


class _AppGrid:
    """An in-process Grid: each message goes to the real ClientApp of its node."""

    def __init__(self, app, nodes: dict[int, int]) -> None:
        self.app, self.nodes = app, nodes
        self.sent = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, RecordDict

        replies = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            context = Context(1, node, {"partition-id": self.nodes[node]}, RecordDict(), {})
            replies.append(self.app(m, context))
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's Message() needs a run id outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _expected_global_counts(cfg) -> dict[str, np.ndarray]:
    from fed_iotlm.data.federation import build_layout

    layout = build_layout(cfg)
    tasks = {t: s.num_classes for t, s in layout.dataset.meta.tasks.items()}
    total: dict[str, np.ndarray] = {}
    for i in range(layout.num_nodes):
        total = add_counts(total, class_counts(layout.node_raw(i).train.y, tasks))
    return total


def test_the_statistics_round_sums_the_nodes_class_counts(quick_cfg, task_identity):
    """The real ClientApp answers the real statistics round; the global counts are the
    sum of each node's counts of its labelled training samples, the weights are
    computed from them, travel with every later message and reach the node's train."""
    from clients.app import make_client_app, received_class_weights
    from fed_iotlm.data.federation import build_layout
    from fed_iotlm.federation.class_balance import COUNTS_KEY, WEIGHTS_KEY
    from server.federated_run import pooled_statistics

    cfg = quick_cfg("train.class_weighting=balanced", "partition.label_fraction=0.5")
    layout = build_layout(cfg)
    grid = _AppGrid(make_client_app(cfg), {101: 0, 102: 1, 103: 2})
    balance: dict = {}
    stamped, _ = pooled_statistics(grid, cfg, [101, 102, 103], 60.0, layout, [], balance)

    expected = _expected_global_counts(cfg)
    assert balance["counts"] == {t: c.tolist() for t, c in expected.items()}
    assert sum(balance["counts"]["activity"]) < len(layout.dataset.train)  # labels hidden
    for t, w in balance["weights"].items():
        np.testing.assert_allclose(w, balanced_weights(expected)[t])
    assert balance["counts_from"].startswith("global")

    stamped.send_and_receive([_query(stamped_to=103)], timeout=1)  # any later message
    later = grid.sent[-1]
    assert WEIGHTS_KEY in later.content.array_records and COUNTS_KEY not in later.content
    got = received_class_weights(later, cfg, 2)
    assert set(got) == set(expected)
    np.testing.assert_allclose(got["activity"], balance["weights"]["activity"])


def test_nodes_send_no_class_counts_unless_balanced_asks(quick_cfg, task_identity):
    from clients.app import make_client_app
    from fed_iotlm.data.federation import build_layout
    from fed_iotlm.federation.class_balance import COUNTS_KEY
    from server.statistics import gather_statistics

    cfg = quick_cfg()
    grid = _AppGrid(make_client_app(cfg), {101: 0, 102: 1, 103: 2})
    sums, counts = gather_statistics(grid, [101, 102, 103], 60.0)
    assert counts is None
    assert sums.count == build_layout(cfg).training_sums().count
    assert all(COUNTS_KEY not in r.content.array_records for r in _replies(grid, cfg))


def _replies(grid, cfg):
    from fed_iotlm.federation.normalization import STATS_MESSAGE

    stats = [m for m in grid.sent if m.metadata.message_type == STATS_MESSAGE]
    return grid.send_and_receive(stats)


def _query(stamped_to: int):
    from flwr.app import ConfigRecord, Message, RecordDict

    return Message(
        RecordDict({"config": ConfigRecord()}),
        message_type="query.identify",
        dst_node_id=stamped_to,
    )


def test_a_balanced_node_refuses_a_message_without_the_weights(quick_cfg, task_identity):
    from clients.app import received_class_weights

    msg = _query(stamped_to=101)
    assert received_class_weights(msg, quick_cfg(), 0) is None  # none: nothing needed
    with pytest.raises(RuntimeError, match="carries no class weights"):
        received_class_weights(msg, quick_cfg("train.class_weighting=balanced"), 0)


def test_balanced_refuses_per_site_normalization(quick_cfg):
    from fed_iotlm.data.federation import build_layout
    from server.federated_run import pooled_statistics

    cfg = quick_cfg("train.class_weighting=balanced", "normalization=per_site")
    with pytest.raises(ValueError, match="needs normalization=federated"):
        pooled_statistics(None, cfg, [], 1.0, build_layout(cfg), [])


# ------------------------------------------------------------------------ the baselines


def test_centralized_weights_come_from_the_pooled_counts(quick_cfg, tmp_path):
    from fed_iotlm.baselines import run_centralized

    cfg = quick_cfg(
        "method=centralized", "mlflow.enabled=false", "rounds=1", "train.steps=1",
        "train.class_weighting=balanced", "partition.label_fraction=0.5",
    )  # fmt: skip
    res = json.loads(run_centralized(cfg, tmp_path).read_text())
    block = res["class_weighting"]
    assert block["mode"] == "balanced" and block["counts_from"].startswith("pooled")
    # the pooled labels (hidden with the centralized run's own draw) are the federation's
    # labelled training samples in number, though not necessarily the same ones
    expected = _expected_global_counts(cfg)
    assert {t: sum(c) for t, c in block["counts"].items()} == {
        t: int(c.sum()) for t, c in expected.items()
    }
    for t, c in block["counts"].items():
        np.testing.assert_allclose(block["weights"][t], balanced_weights({t: np.array(c)})[t])


def test_local_only_weights_come_from_each_nodes_own_counts(quick_cfg, tmp_path):
    from fed_iotlm.baselines import run_local_only
    from fed_iotlm.data.federation import build_layout

    cfg = quick_cfg(
        "method=local", "mlflow.enabled=false", "rounds=1", "train.steps=1",
        "train.class_weighting=balanced", "partition.scheme=dirichlet", "partition.alpha=0.3",
    )  # fmt: skip
    res = json.loads(run_local_only(cfg, tmp_path).read_text())
    block = res["class_weighting"]
    assert block["counts_from"].startswith("local")
    layout = build_layout(cfg)
    tasks = {t: s.num_classes for t, s in layout.dataset.meta.tasks.items()}
    for i in range(layout.num_nodes):
        own = class_counts(layout.node_raw(i).train.y, tasks)
        assert block["by_node"][str(i)]["counts"] == {t: c.tolist() for t, c in own.items()}


def test_none_records_no_class_weighting(quick_cfg, tmp_path):
    from fed_iotlm.baselines import run_centralized

    cfg = quick_cfg("method=centralized", "mlflow.enabled=false", "rounds=1", "train.steps=1")
    assert "class_weighting" not in json.loads(run_centralized(cfg, tmp_path).read_text())


# ------------------------------------------------------------------- a whole (tiny) run


@pytest.mark.integration
@pytest.mark.parametrize("secagg", ["false", "true"])
def test_a_federated_run_trains_every_node_on_the_global_weights(quick_cfg, tmp_path, secagg):
    """Flower's simulation engine, one round: every node's train handler finds the
    weights on its message (it fails otherwise), and results.json records the global
    counts, which equal the sum of the nodes' counts, plaintext or under SecAgg+."""
    from simulations.run import run_experiment

    cfg = quick_cfg(
        "train.class_weighting=balanced", "partition.label_fraction=0.5",
        f"secagg.enabled={secagg}", "mlflow.enabled=false", "rounds=1", "train.steps=2",
    )  # fmt: skip
    res = json.loads(run_experiment(cfg, tmp_path / "run").read_text())
    # a node whose message lacked the weights would have failed its round (and a failed
    # round does not fail the run): every node answered every round
    assert not res.get("faults_by_round"), res.get("faults_by_round")
    assert [h.get("round_skipped", 0.0) for h in res["history"]] == [0.0]
    if secagg == "true":  # SecAgg+ rounds report the nodes summed instead
        assert [h["secagg.nodes"] for h in res["history"]] == [3.0]
    block = res["class_weighting"]
    expected = _expected_global_counts(cfg)
    assert block["counts"] == {t: c.tolist() for t, c in expected.items()}
    assert ("SecAgg+" in block["counts_from"]) == (secagg == "true")
    for t, w in block["weights"].items():
        np.testing.assert_allclose(w, balanced_weights(expected)[t])
