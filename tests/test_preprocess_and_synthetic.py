"""Default preprocessing per kind, the synthetic generator, and per-node data views."""

from __future__ import annotations

import numpy as np

from fed_iotlm.data.dataset import Split
from fed_iotlm.data.federation import build_layout, hide_labels, parse_plan
from fed_iotlm.data.preprocess import Standardizer, log_mel, mel_filterbank
from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic


def test_log_mel_shape_and_tone_lands_in_the_right_band():
    rate, n = 8000.0, 2048
    t = np.arange(n) / rate
    low = np.sin(2 * np.pi * 300 * t)[None]
    high = np.sin(2 * np.pi * 3000 * t)[None]
    feats = log_mel(np.concatenate([low, high]), rate)
    assert feats.ndim == 3 and feats.shape[0] == 2 and feats.shape[2] == 32
    assert feats[0].mean(0).argmax() < feats[1].mean(0).argmax()
    fb = mel_filterbank(256, 32, rate)
    assert fb.shape == (129, 32) and (fb >= 0).all()


def test_standardizer_uses_present_samples_only_and_keeps_missing_zero():
    x = np.random.default_rng(0).normal(5.0, 3.0, size=(200, 10, 2)).astype(np.float32)
    mask = np.ones(200, dtype=bool)
    mask[:50] = False
    x[:50] = 1e6  # would wreck the statistics if missing samples were used
    split = Split({"imu": x}, {"imu": mask}, {"t": np.zeros(200, np.int64)})
    out = Standardizer.fit(split).transform(split)
    z = out.x["imu"][mask]
    np.testing.assert_allclose(z.mean(axis=(0, 1)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1)), 1.0, atol=1e-3)
    assert (out.x["imu"][~mask] == 0).all()


def test_synthetic_is_seeded_and_has_the_promised_structure():
    cfg = SyntheticConfig(num_train=200, num_test=50, seed=3)
    a, b = make_synthetic(cfg), make_synthetic(cfg)
    c = make_synthetic(SyntheticConfig(num_train=200, num_test=50, seed=4))
    for m in a.train.x:
        np.testing.assert_array_equal(a.train.x[m], b.train.x[m])
        assert not np.array_equal(a.train.x[m], c.train.x[m])
    kinds = {s.kind for s in a.meta.modalities.values()}
    assert len(a.meta.modalities) >= 4 and len(kinds) >= 4
    assert a.meta.tasks["activity"].num_classes >= 6 and len(a.meta.tasks) >= 2
    assert a.train.x["imu"].shape == (200, 64, 6) and a.train.x["audio"].shape == (200, 2048)
    assert set(np.unique(a.train.site)) <= set(range(cfg.num_sites))


def test_site_shift_zero_makes_sites_alike():
    calm = make_synthetic(SyntheticConfig(num_train=2000, num_test=10, site_shift=0.0))
    shifted = make_synthetic(SyntheticConfig(num_train=2000, num_test=10, site_shift=1.0))

    def spread(ds):
        means = [ds.train.x["imu"][ds.train.site == s].mean(axis=(0, 1)) for s in range(8)]
        return float(np.std(means, axis=0).mean())

    assert spread(shifted) > 3 * spread(calm)


def test_plan_strings_from_flower_run_config():
    assert parse_plan("imu,audio;imu") == [["imu", "audio"], ["imu"]]
    assert parse_plan([["imu"]]) == [["imu"]]
    assert parse_plan(None) is None


def test_hide_labels_keeps_the_requested_fraction():
    split = Split({}, {}, {"t": np.arange(100) % 4})
    out = hide_labels(split, 0.1, seed=0)
    assert (out.y["t"] >= 0).sum() == 10


def test_node_views_hold_only_their_modalities_and_own_statistics(quick_cfg):
    cfg = quick_cfg()
    layout = build_layout(cfg)
    assert layout.plan == [["imu", "audio"], ["imu", "depth"], ["thermal"]]
    # training and carved validation shares together cover the training split once
    covered = np.sort(np.concatenate(layout.train_parts + layout.val_parts))
    np.testing.assert_array_equal(covered, np.arange(len(layout.dataset.train)))
    for node, mods in enumerate(layout.plan):
        train, test = layout.node_data(node)
        assert list(train.x) == mods and list(test.x) == mods
        for m in mods:  # standardised with the node's OWN training statistics
            axes = (0, 1) if train.x[m].ndim == 3 else (0, 2, 3)
            np.testing.assert_allclose(train.x[m].mean(axis=axes), 0.0, atol=1e-3)


def test_label_fraction_outside_unit_interval_is_an_error():
    import pytest

    split = Split({}, {}, {"t": np.arange(10)})
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_fraction"):
            hide_labels(split, bad, seed=0)
