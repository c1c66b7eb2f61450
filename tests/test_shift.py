"""Per-site shift transforms (fed_iotlm/data/shift.py): determinism per site, only the
asked-for modalities and sites change, physical targets (SNR, norms) are met, masks
keep their meaning, and misuse is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.data.dataset import Split
from fed_iotlm.data.modalities import ModalitySpec
from fed_iotlm.data.shift import (
    TRANSFORMS,
    apply_shifts,
    parse_shift_config,
    raw_layout,
    site_ids_from_parts,
)
from fed_iotlm.data.shift_audio import eq_filter

N, T, L = 48, 40, 512
SPECS = {
    "wrist": ModalitySpec("wrist", "imu", 50.0),
    "env": ModalitySpec("env", "timeseries"),
    "mic": ModalitySpec("mic", "audio", 8000.0),
    "cam": ModalitySpec("cam", "depth"),
    "room": ModalitySpec("room", "tabular"),
}
LAYOUT_OF = {m: raw_layout(s.kind) for m, s in SPECS.items()}
ABSENT = {"wrist": [1, 7], "mic": [2], "cam": [3, 9], "env": [], "room": [5]}


def make_split(seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    t = np.arange(T) / 50.0
    x = {
        "wrist": (np.sin(2 * np.pi * 2 * t)[None, :, None] + rng.normal(0, 0.3, (N, T, 6))),
        "env": rng.normal(5, 1, (N, T, 2)),
        "mic": np.sin(2 * np.pi * 440 * np.arange(L) / 8000)[None] + rng.normal(0, 0.1, (N, L)),
        "cam": 3.0 + rng.normal(0, 0.5, (N, 1, 12, 10)),
        "room": rng.normal(0, 1, (N, 4)),
    }
    x = {m: v.astype(np.float32) for m, v in x.items()}
    mask = {m: np.ones(N, dtype=bool) for m in x}
    for m, idx in ABSENT.items():
        mask[m][idx] = False
        x[m][idx] = 0.0
    return Split(
        x=x,
        mask=mask,
        y={"task": rng.integers(0, 3, N)},
        site=np.arange(N) % 4,
    )


def shifted(cfg, split: Split | None = None, seed: int = 0) -> tuple[Split, Split]:
    split = split or make_split()
    return split, apply_shifts(split, split.site, cfg, seed, specs=SPECS)


def test_no_shift_returns_split_unchanged():
    split = make_split()
    assert apply_shifts(split, split.site, [], 0, specs=SPECS) is split
    assert apply_shifts(split, split.site, None, 0, specs=SPECS) is split


def test_same_site_gets_same_shift_alone_or_with_others():
    cfg = [{"name": "rotation", "modalities": ["wrist"], "severity": 0.8}]
    split, whole = shifted(cfg)
    again = apply_shifts(split, split.site, cfg, 0, specs=SPECS)
    np.testing.assert_array_equal(whole.x["wrist"], again.x["wrist"])
    rows = np.flatnonzero(split.site == 2)
    alone = apply_shifts(split.subset(rows), 2, cfg, 0, specs=SPECS)  # one node, one int site
    np.testing.assert_allclose(alone.x["wrist"], whole.x["wrist"][rows], atol=1e-6)
    other_seed = apply_shifts(split, split.site, cfg, 1, specs=SPECS)
    assert not np.allclose(other_seed.x["wrist"][rows], whole.x["wrist"][rows])


def test_sites_get_different_rotations():
    cfg = [{"name": "rotation", "modalities": ["wrist"], "severity": 1.0}]
    split = make_split()
    same = split.subset(np.arange(N))
    same.x["wrist"][:] = split.x["wrist"][0]  # every sample identical
    same.mask["wrist"][:] = True
    out = apply_shifts(same, same.site, cfg, 0, specs=SPECS).x["wrist"]
    first_of_site = [int(np.flatnonzero(same.site == s)[0]) for s in range(4)]
    for a in first_of_site:
        for b in first_of_site:
            if a < b:
                assert not np.allclose(out[a], out[b])


def test_changes_only_named_modality_and_sites():
    cfg = [{"name": "noise", "modalities": ["wrist"], "severity": 0.5, "sites": [0, 3]}]
    split, out = shifted(cfg)
    for m in SPECS:
        if m != "wrist":
            np.testing.assert_array_equal(out.x[m], split.x[m])
            np.testing.assert_array_equal(out.mask[m], split.mask[m])
    shifted_rows = np.isin(split.site, [0, 3]) & split.mask["wrist"]
    diff = np.abs(out.x["wrist"] - split.x["wrist"]).reshape(N, -1).max(axis=1)
    assert (diff[shifted_rows] > 0).all()
    assert (diff[~shifted_rows] == 0).all()
    assert out.x["wrist"] is not split.x["wrist"]  # a new array; the input is untouched
    np.testing.assert_array_equal(split.x["wrist"], make_split().x["wrist"])


def test_rotation_preserves_per_sample_norms_of_each_triplet():
    cfg = [{"name": "rotation", "modalities": ["wrist"], "severity": 1.0}]
    split, out = shifted(cfg)
    for trip in (slice(0, 3), slice(3, 6)):
        np.testing.assert_allclose(
            np.linalg.norm(out.x["wrist"][:, :, trip], axis=2),
            np.linalg.norm(split.x["wrist"][:, :, trip], axis=2),
            rtol=1e-5,
            atol=1e-5,
        )
    assert not np.allclose(out.x["wrist"], split.x["wrist"])


def test_rotation_needs_xyz_triplets():
    split = make_split()
    split.x["wrist"] = split.x["wrist"][:, :, :5]
    cfg = [{"name": "rotation", "modalities": ["wrist"]}]
    with pytest.raises(ValueError, match="not a multiple of 3"):
        apply_shifts(split, split.site, cfg, 0, specs=SPECS)
    ok = [{"name": "rotation", "modalities": ["wrist"], "triplets": [[0, 1, 2]]}]
    out = apply_shifts(split, split.site, ok, 0, specs=SPECS)
    np.testing.assert_array_equal(out.x["wrist"][:, :, 3:], split.x["wrist"][:, :, 3:])


@pytest.mark.parametrize("target_db", [0.0, 10.0, 20.0])
def test_noise_reaches_requested_snr(target_db):
    cfg = [{"name": "noise", "modalities": ["mic"], "snr_db": target_db}]
    split, out = shifted(cfg)
    present = split.mask["mic"]
    signal = split.x["mic"][present].astype(np.float64)
    added = out.x["mic"][present] - signal
    snr = 10 * np.log10((signal**2).mean(axis=1) / (added**2).mean(axis=1))
    assert abs(snr.mean() - target_db) < 0.3


def test_noise_severity_is_noise_to_signal_amplitude():
    cfg = [{"name": "noise", "modalities": ["env"], "severity": 0.1}]  # = 20 dB
    split, out = shifted(cfg)
    added = out.x["env"] - split.x["env"]
    snr = 10 * np.log10((split.x["env"].astype(np.float64) ** 2).mean() / (added**2).mean())
    assert abs(snr - 20.0) < 0.5


def test_background_noise_reaches_snr_and_differs_by_site():
    cfg = [{"name": "background", "modalities": ["mic"], "snr_db": 6.0}]
    split, out = shifted(cfg)
    present = split.mask["mic"]
    added = (out.x["mic"] - split.x["mic"])[present].astype(np.float64)
    signal = split.x["mic"][present].astype(np.float64)
    snr = 10 * np.log10((signal**2).mean(axis=1) / (added**2).mean(axis=1))
    assert abs(snr.mean() - 6.0) < 0.3


def test_channel_response_is_identity_at_zero_and_keeps_length():
    h = eq_filter(np.random.default_rng(0), 0.0, taps=63, bands=6, max_gain_db=12.0)
    expected = np.zeros(63)
    expected[31] = 1.0
    np.testing.assert_allclose(h, expected, atol=1e-12)
    cfg = [{"name": "channel_response", "modalities": ["mic"], "severity": 1.0}]
    split, out = shifted(cfg)
    assert out.x["mic"].shape == split.x["mic"].shape
    assert not np.allclose(out.x["mic"], split.x["mic"])


def test_resample_keeps_slow_signals_and_rate_one_is_identity():
    t = np.arange(T, dtype=np.float64)
    split = make_split()
    slow = np.broadcast_to(np.sin(2 * np.pi * t / T)[None, :, None], (N, T, 2))
    split.x["env"] = slow.astype(np.float32)
    half = [{"name": "resample", "modalities": ["env"], "rate_factor": 0.5}]
    out = apply_shifts(split, split.site, half, 0, specs=SPECS).x["env"]
    assert 0 < np.abs(out - split.x["env"]).max() < 0.1
    same = [{"name": "resample", "modalities": ["env"], "rate_factor": 1.0}]
    np.testing.assert_array_equal(
        apply_shifts(split, split.site, same, 0, specs=SPECS).x["env"], split.x["env"]
    )


def test_time_warp_is_a_monotone_retiming_with_fixed_ends():
    split = make_split()
    ramp = np.broadcast_to(np.arange(T, dtype=np.float32)[None, :, None], (N, T, 2))
    split.x["env"] = ramp.copy()
    cfg = [{"name": "time_warp", "modalities": ["env"], "severity": 0.3}]
    out = apply_shifts(split, split.site, cfg, 0, specs=SPECS).x["env"]
    assert (np.diff(out, axis=1) >= -1e-5).all()
    np.testing.assert_allclose(out[:, [0, -1]], ramp[:, [0, -1]], atol=1e-4)
    assert np.abs(out - ramp).max() > 0.5


def test_absent_samples_stay_absent_and_zero_under_every_transform():
    split = make_split()
    for name, transform in TRANSFORMS.items():
        cfg = [{"name": name, "modalities": None, "severity": 0.7}]
        out = apply_shifts(split, split.site, cfg, 0, specs=SPECS)
        targets = [m for m in SPECS if transform.applies_to(SPECS[m].kind, {})]
        assert targets, name
        for m in SPECS:
            assert out.x[m].shape == split.x[m].shape and out.x[m].dtype == np.float32
            assert np.isfinite(out.x[m]).all(), (name, m)
            absent = ~out.mask[m]
            assert (out.x[m][absent] == 0).all(), (name, m)
            assert not (out.mask[m] & ~split.mask[m]).any(), (name, m)  # never revives one
            if not transform.drops:
                np.testing.assert_array_equal(out.mask[m], split.mask[m])
            if m not in targets:
                np.testing.assert_array_equal(out.x[m], split.x[m])


def test_dropout_modality_and_channel_set_mask_false():
    split = make_split()
    all_gone = [{"name": "dropout", "modalities": ["cam"], "mode": "modality", "severity": 1.0}]
    out = apply_shifts(split, split.site, all_gone, 0, specs=SPECS)
    assert not out.mask["cam"].any() and (out.x["cam"] == 0).all()
    dead = [{"name": "dropout", "modalities": ["room"], "mode": "channel", "severity": 1.0}]
    out = apply_shifts(split, split.site, dead, 0, specs=SPECS)
    assert not out.mask["room"].any()
    span = [{"name": "dropout", "modalities": ["wrist"], "mode": "span", "severity": 0.25}]
    out = apply_shifts(split, split.site, span, 0, specs=SPECS)
    np.testing.assert_array_equal(out.mask["wrist"], split.mask["wrist"])
    present = split.mask["wrist"]
    zero_steps = (out.x["wrist"][present] == 0).all(axis=2).sum(axis=1)
    assert (zero_steps == 10).all()  # 25 % of T = 40


@pytest.mark.parametrize(
    ("name", "modality", "extra"),
    [
        ("rotation", "mic", {}),
        ("rotation", "env", {}),  # a timeseries is not an IMU
        ("brightness", "wrist", {}),
        ("channel_response", "cam", {}),
        ("dropout", "cam", {"mode": "span"}),
        ("dropout", "mic", {"mode": "channel"}),
    ],
)
def test_wrong_kind_is_a_clear_error(name, modality, extra):
    cfg = [{"name": name, "modalities": [modality], **extra}]
    split = make_split()
    with pytest.raises(ValueError, match=rf"{name}.*{modality!r}.*kind {SPECS[modality].kind!r}"):
        apply_shifts(split, split.site, cfg, 0, specs=SPECS)


def test_featurised_audio_is_refused():
    split = make_split()
    split.x["mic"] = np.zeros((N, 16, 8), dtype=np.float32)  # a log-mel sequence
    cfg = [{"name": "background", "modalities": ["mic"]}]
    with pytest.raises(ValueError, match="before featurisation"):
        apply_shifts(split, split.site, cfg, 0, specs=SPECS)


def test_a_node_without_the_modality_is_skipped_but_a_typo_is_an_error():
    split = make_split().keep_modalities(["cam"])
    cfg = [{"name": "rotation", "modalities": ["wrist"]}]
    out = apply_shifts(split, split.site, cfg, 0, specs=SPECS)
    np.testing.assert_array_equal(out.x["cam"], split.x["cam"])
    with pytest.raises(ValueError, match="'wirst' is not in the dataset"):
        apply_shifts(
            split, split.site, [{"name": "noise", "modalities": ["wirst"]}], 0, specs=SPECS
        )


def test_without_specs_modalities_named_after_kinds_work():
    split = make_split()
    plain = Split(
        x={"imu": split.x["wrist"]}, mask={"imu": split.mask["wrist"]}, y=split.y, site=split.site
    )
    out = apply_shifts(plain, plain.site, [{"name": "rotation"}], 0)
    assert not np.allclose(out.x["imu"], plain.x["imu"])
    with pytest.raises(ValueError, match="pass specs"):
        apply_shifts(split, split.site, [{"name": "noise"}], 0)


def test_site_severity_and_spread():
    cfg = [
        {
            "name": "gain_bias",
            "modalities": ["room"],
            "severity": 0.5,
            "site_severity": {"1": 0.0},  # Hydra turns int keys into strings
            "spread": 0.5,
        }
    ]
    split, out = shifted(cfg)
    site1 = split.site == 1
    np.testing.assert_array_equal(out.x["room"][site1], split.x["room"][site1])
    assert not np.allclose(out.x["room"][~site1], split.x["room"][~site1])


def test_image_transforms():
    split = make_split()
    present = split.mask["cam"]
    occ = [{"name": "occlusion", "modalities": ["cam"], "severity": 0.25, "fill": -1.0}]
    out = apply_shifts(split, split.site, occ, 0, specs=SPECS).x["cam"]
    for s in range(4):
        rows = np.flatnonzero((split.site == s) & present)
        covered = out[rows] == -1.0
        assert (covered == covered[0]).all()  # one occluder per site
        assert 0.15 < covered[0].mean() < 0.35
    blur = [{"name": "blur", "modalities": ["cam"], "sigma_px": 1.5}]
    out = apply_shifts(split, split.site, blur, 0, specs=SPECS).x["cam"]
    assert (
        out[present].std(axis=(2, 3)).mean() < 0.6 * split.x["cam"][present].std(axis=(2, 3)).mean()
    )
    np.testing.assert_allclose(out[present].mean(), split.x["cam"][present].mean(), rtol=1e-3)


def test_config_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"shift\[0\].*unknown transform 'rotate'"):
        parse_shift_config([{"name": "rotate"}])
    with pytest.raises(ValueError, match=r"shift\[1\] \(noise\).*unknown option.*'snr'"):
        parse_shift_config([{"name": "rotation"}, {"name": "noise", "snr": 3}])
    with pytest.raises(ValueError, match="severity must be a number >= 0"):
        parse_shift_config([{"name": "noise", "severity": -1}])
    with pytest.raises(ValueError, match=r"\(dropout\): unknown mode 'pixels'"):
        parse_shift_config([{"name": "dropout", "mode": "pixels"}])
    assert parse_shift_config({"transforms": [{"name": "noise"}]})[0].name == "noise"


@pytest.mark.parametrize("preset", ["none", "placement", "hardware", "mixed"])
def test_hydra_presets_compose_and_apply(preset):
    from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic
    from fed_iotlm.settings import compose

    cfg = compose([f"shift={preset}"])
    entries = parse_shift_config(cfg["shift"])
    assert (preset == "none") == (not entries)
    ds = make_synthetic(SyntheticConfig(num_train=64, num_test=8, audio_len=256))
    out = apply_shifts(ds.train, ds.train.site, cfg["shift"], 0, specs=ds.meta.modalities)
    for m in ds.meta.modalities:
        assert np.isfinite(out.x[m]).all()
        assert out.x[m].shape == ds.train.x[m].shape


def test_site_ids_from_parts():
    parts = [np.array([0, 3]), np.array([1, 2, 4])]
    np.testing.assert_array_equal(site_ids_from_parts(parts, 5), [0, 1, 1, 0, 1])
    with pytest.raises(ValueError, match="belong to no node"):
        site_ids_from_parts(parts, 6)
