"""The validation protocol: a val split everywhere, no statistics from evaluation data,
equal step budgets, and test labels that can change no choice a run makes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fed_iotlm.data.dataset import MultisensoryDataset, Split
from fed_iotlm.data.exchange import load_dataset, save_dataset
from fed_iotlm.data.federation import build_layout
from fed_iotlm.data.preprocess import ChannelSums, Standardizer
from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic
from fed_iotlm.data.validation import carve_validation, stratified_holdout
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors, TrainConfig, train_local
from fed_iotlm.settings import compose


def test_holdout_is_stratified_seeded_and_sized():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    held = stratified_holdout(labels, 0.1, seed=3)
    assert len(held) == 10
    assert np.bincount(labels[held], minlength=4).tolist() == [4, 3, 2, 1]
    assert np.array_equal(held, stratified_holdout(labels, 0.1, seed=3))
    assert not np.array_equal(held, stratified_holdout(labels, 0.1, seed=4))
    assert stratified_holdout(labels, 0.0, seed=3).size == 0


def test_carved_shares_are_disjoint_from_training_and_cover_the_part():
    labels = np.arange(200) % 5
    parts = [np.arange(0, 120), np.arange(120, 200)]
    train, val = carve_validation(parts, labels, 0.2, seed=0)
    for p, t, v in zip(parts, train, val, strict=True):
        assert not set(t) & set(v)
        assert sorted(np.concatenate([t, v])) == sorted(p)
        assert len(v) == int(0.2 * len(p))


def test_layout_never_trains_on_validation_samples(quick_cfg):
    cfg = quick_cfg("mlflow.enabled=false")
    layout = build_layout(cfg)
    val = set(np.concatenate(layout.val_parts).tolist())
    assert val and layout.val_source == "train"
    assert not val & set(np.concatenate(layout.train_parts).tolist())
    node = layout.node_raw(0)
    assert len(node.val) == len(layout.val_parts[0])
    # labels are hidden on training samples only; the validation share keeps its own
    assert (node.val.y["activity"] >= 0).all()


def test_a_dataset_with_val_npz_uses_it(tmp_path):
    ds = make_synthetic(SyntheticConfig(num_train=300, num_test=120, seed=0))
    val = ds.test.subset(np.arange(60))
    save_dataset(MultisensoryDataset(ds.meta, ds.train, ds.test, val), tmp_path / "d")
    loaded = load_dataset(tmp_path / "d")
    assert loaded.val is not None and len(loaded.val) == 60
    np.testing.assert_array_equal(loaded.val.y["activity"], val.y["activity"])
    cfg = compose(["experiment=quick", "data=npz", f"data.path={tmp_path / 'd'}"])
    layout = build_layout(cfg)
    assert layout.val_source == "val"
    assert sum(len(p) for p in layout.val_parts) == 60
    # no training sample went to validation
    assert sum(len(p) for p in layout.train_parts) == len(loaded.train)


def test_pooled_sums_give_the_statistics_of_the_pooled_training_data():
    rng = np.random.default_rng(0)

    def split(n, offset):
        x = rng.normal(offset, 2.0, size=(n, 10, 3)).astype(np.float32)
        mask = np.ones(n, dtype=bool)
        mask[:3] = False  # missing samples must not count
        return Split({"imu": x}, {"imu": mask}, {"t": np.zeros(n, dtype=np.int64)})

    a, b = split(50, 1.0), split(80, -3.0)
    pooled = ChannelSums.of(a) + ChannelSums.of(b)
    both = Split(
        {"imu": np.concatenate([a.x["imu"], b.x["imu"]])},
        {"imu": np.concatenate([a.mask["imu"], b.mask["imu"]])},
        {"t": np.zeros(130, dtype=np.int64)},
    )
    want = Standardizer.fit(both)
    got = pooled.standardizer()
    np.testing.assert_allclose(got.mean["imu"], want.mean["imu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.std["imu"], want.std["imu"], rtol=1e-5)
    # the wire form round-trips
    again = ChannelSums.from_arrays(pooled.to_arrays()).standardizer()
    np.testing.assert_allclose(again.mean["imu"], got.mean["imu"])


def test_a_step_budget_is_exact_whatever_the_node_holds(quick_cfg):
    cfg = quick_cfg("mlflow.enabled=false")
    layout = build_layout(cfg)
    train, _ = layout.node_data(0)
    data = SplitTensors.from_split(train)
    from fed_iotlm.experiment import model_spec

    model = MultisensoryModel(model_spec(cfg))
    for steps in (0, 1, 7, 40):  # 40 steps > one pass over ~180 samples in batches of 32
        stats = train_local(model, data, TrainConfig(steps=steps, batch_size=32))
        assert stats["steps"] == steps
        assert 0 < stats["examples"] <= 32 * steps or steps == 0
    epochs = train_local(model, data, TrainConfig(epochs=2, batch_size=32))
    assert epochs["examples"] == 2 * stats["num_labelled"]
    with pytest.raises(ValueError, match="train.steps"):
        train_local(model, data, TrainConfig(steps=-1))


def test_per_site_normalisation_is_only_used_when_asked(quick_cfg):
    from fed_iotlm.data.reference import reference_sets

    layout = build_layout(quick_cfg("mlflow.enabled=false"))
    scaler = layout.training_sums().standardizer()
    fed = reference_sets(layout, scaler, "federated")
    tta = reference_sets(layout, None, "per_site")
    # federated: the test set is NOT standardised with its own statistics
    present = layout.dataset.test.mask["imu"]
    own_mean = fed.test.x["imu"][present].mean(axis=(0, 1))
    assert np.abs(own_mean).max() > 1e-3
    # per-site TTA: every test site is centred on its own statistics
    for site in np.unique(layout.test_sites):
        rows = (layout.test_sites == site) & present
        np.testing.assert_allclose(tta.test.x["imu"][rows].mean(axis=(0, 1)), 0.0, atol=1e-4)


# ------------------------------------------------------------ test labels change no choice


def _permuted_copy(src: Path, dst: Path, seed: int) -> None:
    """The same dataset with every test label permuted (val and train untouched)."""
    ds = load_dataset(src)
    rng = np.random.default_rng(seed)
    y = {t: v[rng.permutation(len(v))] for t, v in ds.test.y.items()}
    save_dataset(replace(ds, test=replace(ds.test, y=y)), dst)


def _two_runs(tmp_path: Path, quick_cfg, *overrides: str) -> tuple[dict, dict, Path, Path]:
    from simulations.run import run_experiment

    ds = make_synthetic(SyntheticConfig(num_train=600, num_test=300, num_sites=3, seed=0))
    save_dataset(ds, tmp_path / "data")
    _permuted_copy(tmp_path / "data", tmp_path / "permuted", seed=1)
    out = []
    for name in ("data", "permuted"):
        cfg = quick_cfg(
            "data=npz", f"data.path={tmp_path / name}", "mlflow.enabled=false", *overrides
        )
        path = run_experiment(cfg, tmp_path / f"run-{name}")
        out.append((json.loads(path.read_text()), path.parent))
    (a, dir_a), (b, dir_b) = out
    return a, b, dir_a, dir_b


def _assert_only_test_changed(a: dict, b: dict, dir_a: Path, dir_b: Path) -> None:
    # every choice and everything the run learned is the same ...
    assert a["protocol"]["choices"] == b["protocol"]["choices"]
    assert a["val"]["accuracy"] == b["val"]["accuracy"]
    assert [h["val_accuracy"] for h in a["history"]] == [h["val_accuracy"] for h in b["history"]]
    wa = load_file(str(dir_a / "bundle" / "model.safetensors"))
    wb = load_file(str(dir_b / "bundle" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    # ... only the reported test figures moved
    assert a["test"]["accuracy"] != b["test"]["accuracy"]


@pytest.mark.integration
def test_permuting_test_labels_changes_no_choice_of_the_federation(quick_cfg, tmp_path):
    torch.manual_seed(0)
    # two rounds: a test figure of round 1 that fed back would change round 2
    a, b, dir_a, dir_b = _two_runs(tmp_path, quick_cfg, "rounds=2", "train.epochs=1")
    _assert_only_test_changed(a, b, dir_a, dir_b)
    assert a["protocol"]["normalization"] == "federated"
    assert a["budget"]["steps_per_node_round"] > 0


@pytest.mark.integration
def test_permuting_test_labels_changes_no_choice_of_mmbind(quick_cfg, tmp_path):
    a, b, dir_a, dir_b = _two_runs(
        tmp_path,
        quick_cfg,
        "method=mmbind",
        "partition.shared=imu",
        "partition.plan=[[imu,audio],[imu,depth],[imu,thermal]]",
        "binding.pretrain_rounds=1",
        "binding.pretrain_epochs=1",
        "rounds=1",
        "train.epochs=1",
    )
    _assert_only_test_changed(a, b, dir_a, dir_b)
