"""Macro-F1 and balanced accuracy (fed_iotlm/metrics.py) and their place in
``evaluate`` and the test report: hand-worked matrices, scikit-learn's figures on
random labels, and a real model scored across batch boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from fed_iotlm import evaluation
from fed_iotlm.metrics import balanced_accuracy, confusion_matrix, f1_macro, scores
from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel
from fed_iotlm.models.training import SplitTensors, evaluate


def test_hand_worked_confusion_matrix():
    cm = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    # F1 per class: 2·1/(2+2) = 0.5, 2·2/(2+3) = 0.8, 0 -> mean 1.3/3
    assert scores(cm) == pytest.approx(
        {"accuracy": 0.6, "f1_macro": 1.3 / 3, "balanced_accuracy": 0.5}
    )


def test_unlabelled_samples_are_left_out():
    cm = confusion_matrix(np.array([-1, 0, 1, -1]), np.array([1, 0, 1, 0]), 2)
    assert cm.sum() == 2 and scores(cm)["accuracy"] == 1.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_classes_follow_scikit_learn():
    # class 2 never labelled, never predicted: out of both; class 3 predicted but never
    # labelled: an F1 of 0, and no recall to average
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 3, 1, 1])
    cm = confusion_matrix(y_true, y_pred, 4)
    assert f1_macro(cm) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert balanced_accuracy(cm) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert balanced_accuracy(cm) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_random_skewed_labels_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    y_true = rng.choice(k, size=300, p=rng.dirichlet(np.full(k, 0.5)))
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, k, 300))
    cm = confusion_matrix(y_true, y_pred, k)
    assert f1_macro(cm) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert balanced_accuracy(cm) == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros(3, int), np.zeros(2, int), 2)
    with pytest.raises(ValueError, match=r"out of range \[0, 1\]: label 2"):
        confusion_matrix(np.array([2]), np.array([0]), 2)
    assert np.isnan(f1_macro(np.zeros((3, 3), int)))


SPEC = ModelSpec(
    modalities={
        "imu": {"kind": "imu", "feature_shape": [16, 3]},
        "env": {"kind": "tabular", "feature_shape": [5]},
    },
    tasks={"activity": 4, "place": 3},
    dim=16,
)


def _data(n: int = 53) -> SplitTensors:
    gen = torch.Generator().manual_seed(0)
    y_act = torch.randint(0, 4, (n,), generator=gen)
    y_act[::5] = -1  # some unlabelled
    return SplitTensors(
        x={"imu": torch.randn(n, 16, 3, generator=gen), "env": torch.randn(n, 5, generator=gen)},
        mask={"imu": torch.ones(n, dtype=torch.bool), "env": torch.rand(n, generator=gen) > 0.3},
        y={"activity": y_act, "place": torch.randint(0, 3, (n,), generator=gen)},
    )


def test_evaluate_sums_the_confusion_matrix_over_batches():
    torch.manual_seed(0)
    model = MultisensoryModel(SPEC).eval()
    data = _data()
    with torch.no_grad():
        logits = model(data.x, data.mask)
    per_task = evaluate(model, data, batch_size=7)  # 53 samples: 8 batches, the last short
    for t, out in logits.items():
        y = data.y[t].numpy()
        pred = out.argmax(1).numpy()
        keep = y >= 0
        assert set(per_task[t]) >= {"accuracy", "loss", "f1_macro", "balanced_accuracy"}
        assert per_task[t]["accuracy"] == pytest.approx((pred[keep] == y[keep]).mean())
        assert per_task[t]["f1_macro"] == pytest.approx(
            f1_score(y[keep], pred[keep], average="macro")
        )
        assert per_task[t]["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(y[keep], pred[keep])
        )


def test_report_carries_f1_and_balanced_accuracy_per_task_and_modality():
    torch.manual_seed(1)
    model = MultisensoryModel(SPEC).eval()
    report = evaluation.test_report(model, _data())
    for key in ("accuracy", "f1_macro", "balanced_accuracy"):
        assert report[key] == pytest.approx(
            np.mean([report["by_task"][t][key] for t in SPEC.tasks])
        )
        assert set(report[f"{key}_by_modality"]) == {"imu", "env"}
        for t in SPEC.tasks:
            assert set(report["by_task"][t][f"{key}_by_modality"]) == {"imu", "env"}
    only_imu = evaluate(model, _data(), ["imu"])
    assert report["by_task"]["place"]["f1_macro_by_modality"]["imu"] == pytest.approx(
        only_imu["place"]["f1_macro"]
    )
    torch.manual_seed(2)
    other = evaluation.test_report(MultisensoryModel(SPEC).eval(), _data(), ["env"])
    mean = evaluation.mean_reports([report, other])
    assert mean["f1_macro"] == pytest.approx((report["f1_macro"] + other["f1_macro"]) / 2)
    # a modality only one report has is averaged over that report alone
    assert mean["balanced_accuracy_by_modality"]["imu"] == pytest.approx(
        report["balanced_accuracy_by_modality"]["imu"]
    )
