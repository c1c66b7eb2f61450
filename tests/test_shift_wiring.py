"""Shifts wired into the federation layout (fed_iotlm/data/federation.py): the default
leaves the data bit-identical, a configured shift acts on raw signals per site (a node
by default), a site's test data get its training data's transform, and the shift is
part of the layout's cache key."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.data.federation import build_layout, load_raw_dataset
from fed_iotlm.data.partition import partition_indices
from fed_iotlm.data.preprocess import featurize_dataset
from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic

ROTATE_NODE_1 = [
    "shift=placement",
    "shift.0.severity=1.0",
    "shift.0.sites=[1]",
    "shift.0.spread=0",
]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_default_is_no_shift_and_data_are_bit_identical(quick_cfg):
    cfg = quick_cfg()
    assert cfg["shift"] == [] and cfg["shift_unit"] == "node"
    layout = build_layout(cfg)
    # the pre-shift pipeline, rebuilt by hand: generate, featurize, partition
    d = cfg["data"]
    fields = SyntheticConfig.__dataclass_fields__
    expected = featurize_dataset(
        make_synthetic(SyntheticConfig(**{k: v for k, v in d.items() if k in fields}))
    )
    for got, want in ((layout.dataset.train, expected.train), (layout.dataset.test, expected.test)):
        assert set(got.x) == set(want.x)
        for m in want.x:
            assert _same(got.x[m], want.x[m]), m
            assert _same(got.mask[m], want.mask[m])
        for t in want.y:
            assert _same(got.y[t], want.y[t])
    parts = partition_indices(3, "iid", 0, labels=expected.train.y["activity"], natural_ids=None)
    for a, v, b in zip(layout.train_parts, layout.val_parts, parts, strict=True):
        np.testing.assert_array_equal(np.sort(np.concatenate([a, v])), b)  # + carved val share
    # a config from before the shift feature (no shift keys at all) is the same layout
    old = {k: v for k, v in cfg.items() if k not in ("shift", "shift_unit")}
    assert build_layout(old) is layout
    # and a shift preset of severity 0 changes nothing either
    zero = build_layout(quick_cfg("shift=placement", "shift.0.severity=0"))
    assert zero is not layout
    for m in layout.dataset.train.x:
        assert _same(zero.dataset.train.x[m], layout.dataset.train.x[m])


def test_node_shift_rotates_only_that_nodes_imu_train_and_test(quick_cfg):
    base, shifted = build_layout(quick_cfg()), build_layout(quick_cfg(*ROTATE_NODE_1))
    assert shifted is not base  # the shift is part of the cache key
    np.testing.assert_array_equal(shifted.test_sites[shifted.test_parts[1]], 1)
    for split, parts in (("train", base.train_parts), ("test", base.test_parts)):
        before = getattr(base.dataset, split).x["imu"]
        after = getattr(shifted.dataset, split).x["imu"]
        for node, idx in enumerate(parts):
            changed = not np.allclose(before[idx], after[idx])
            assert changed == (node == 1), (split, node)
        for m in ("audio", "depth", "thermal"):
            assert _same(getattr(base.dataset, split).x[m], getattr(shifted.dataset, split).x[m])
    # the SAME rotation on node 1's train and test: fit R on train, it maps test too
    rot = _fit_rotation(
        base.dataset.train.x["imu"], shifted.dataset.train.x["imu"], base.train_parts[1]
    )
    idx = base.test_parts[1]
    pred = base.dataset.test.x["imu"][idx][..., :3] @ rot
    np.testing.assert_allclose(pred, shifted.dataset.test.x["imu"][idx][..., :3], atol=1e-4)
    assert not np.allclose(rot, np.eye(3), atol=0.1)


def _fit_rotation(before: np.ndarray, after: np.ndarray, idx: np.ndarray) -> np.ndarray:
    a = before[idx][..., :3].reshape(-1, 3).astype(np.float64)
    b = after[idx][..., :3].reshape(-1, 3).astype(np.float64)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def test_shift_acts_on_raw_audio_before_the_log_mel(quick_cfg):
    cfg = quick_cfg("shift=hardware")
    layout = build_layout(cfg)
    raw = load_raw_dataset(cfg["data"], 0)
    assert raw.train.x["audio"].ndim == 2  # waveforms: what the shift saw
    assert layout.dataset.train.x["audio"].ndim == 3  # log-mel after it
    base = build_layout(quick_cfg())
    assert layout.dataset.train.x["audio"].shape == base.dataset.train.x["audio"].shape
    assert not np.allclose(layout.dataset.train.x["audio"], base.dataset.train.x["audio"])


def test_site_unit_uses_the_datasets_sites(quick_cfg):
    cfg = quick_cfg(*ROTATE_NODE_1, "shift_unit=site")
    layout = build_layout(cfg)
    site = layout.dataset.train.site
    np.testing.assert_array_equal(layout.train_sites, site)
    base = build_layout(quick_cfg())
    moved = ~np.isclose(base.dataset.train.x["imu"], layout.dataset.train.x["imu"]).all(axis=(1, 2))
    np.testing.assert_array_equal(moved, site == 1)
    with pytest.raises(ValueError, match="shift_unit"):
        build_layout(quick_cfg("shift_unit=room"))


def test_bad_shift_entry_fails_before_any_data(quick_cfg):
    with pytest.raises(ValueError, match="unknown transform"):
        build_layout(quick_cfg("shift=placement", "shift.0.name=spin"))
