"""Domain-shift diagnostics (fed_iotlm/diagnostics/): CKA and MMD behave as measures,
no shift reads as none, a shifted modality at a shifted site reads as shifted, and the
per-site accuracy reuses the evaluation report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fed_iotlm.data.federation import build_layout
from fed_iotlm.diagnostics import linear_cka, median_bandwidth, rbf_mmd2, run_diagnostics
from fed_iotlm.experiment import model_spec
from fed_iotlm.federation.records import state_to_numpy
from fed_iotlm.models.multisensory import MultisensoryModel


def test_linear_cka_is_invariant_to_rotation_and_scale_and_low_for_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0)
    assert linear_cka(x, rng.normal(size=(200, 16))) < 0.2
    assert linear_cka(torch.from_numpy(x), x[:, :4]) < 1.0  # torch and numpy both accepted
    with pytest.raises(ValueError, match="paired"):
        linear_cka(x, x[:10])
    assert math.isnan(linear_cka(np.ones((5, 3)), x[:5]))


def test_rbf_mmd_is_zero_for_identical_sets_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 8))
    assert rbf_mmd2(x, x) == 0.0
    same = rbf_mmd2(x, rng.normal(size=(150, 8)))
    small = rbf_mmd2(x, rng.normal(size=(150, 8)) + 0.5)
    large = rbf_mmd2(x, rng.normal(size=(150, 8)) + 2.0)
    assert same < small < large
    # median heuristic: scaling both sets leaves MMD unchanged
    y = rng.normal(size=(150, 8)) + 1.0
    assert rbf_mmd2(10 * x, 10 * y) == pytest.approx(rbf_mmd2(x, y), rel=1e-4)
    d2 = torch.tensor([[0.0, 4.0], [4.0, 0.0]])
    assert median_bandwidth(d2) == pytest.approx(2.0)


def _models(cfg: dict) -> tuple[dict, dict]:
    spec = model_spec(cfg)
    torch.manual_seed(0)
    before = state_to_numpy(MultisensoryModel(spec))
    torch.manual_seed(1)
    after = state_to_numpy(MultisensoryModel(spec))  # a different "trained" model
    return before, after


def test_no_shift_reads_as_cka_one_and_mmd_zero(quick_cfg):
    cfg = quick_cfg("diagnostics.probe_samples=64")
    layout = build_layout(cfg)
    before, after = _models(cfg)
    diag = run_diagnostics(cfg, layout, model_spec(cfg), before=before, after=after)
    assert diag["unit"] == "node" and diag["sites"] == [0, 1, 2] and diag["shifted_sites"] == []
    assert diag["probe_samples"] == 64
    for stage in ("before", "after"):
        for m, v in diag["embedding_shift"][stage].items():
            for site in v["to_reference"].values():
                assert site["cka"] == pytest.approx(1.0) and site["mmd"] == 0.0, m
            assert v["mean_pairwise"]["mmd"] == 0.0


def test_shifted_site_and_modality_read_as_shifted_and_accuracy_is_per_site(quick_cfg):
    cfg = quick_cfg(
        "shift=placement",
        "shift.0.severity=1.0",
        "shift.0.sites=[1]",
        "shift.0.spread=0",
        "diagnostics.probe_samples=96",
    )
    layout = build_layout(cfg)
    before, after = _models(cfg)
    diag = run_diagnostics(cfg, layout, model_spec(cfg), before=before, after=after)
    assert diag["shifted_sites"] == [1]
    for stage in ("before", "after"):
        shift = diag["embedding_shift"][stage]
        imu = shift["imu"]["to_reference"]
        assert imu["1"]["cka"] < 0.9 and imu["1"]["mmd"] > 0
        assert imu["0"]["cka"] == pytest.approx(1.0) and imu["2"]["mmd"] == 0.0
        pair = np.array(shift["imu"]["pairwise"]["cka"])
        assert pair[0, 2] == pytest.approx(1.0) and pair[0, 1] < 0.9
        assert shift["audio"]["to_reference"]["1"]["mmd"] == 0.0  # only the IMU moved
    acc = diag["accuracy_by_site"]
    assert set(acc) == {"0", "1", "2"}
    assert sum(a["num_samples"] for a in acc.values()) == len(layout.dataset.test)
    assert set(acc["1"]["accuracy_by_modality"]) == {"imu", "audio", "depth", "thermal"}
    assert set(diag["accuracy_by_node"]) == {"0", "1", "2"}
    assert all(0.0 <= a <= 1.0 for a in diag["accuracy_by_node"].values())
