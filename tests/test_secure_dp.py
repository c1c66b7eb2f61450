"""Distributed DP under SecAgg+ (fed_iotlm/federation/secure_dp.py): the holders' noise
shares add up to the central noise, so the released average carries σC/h_g."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.federation.privacy import DPConfig
from fed_iotlm.federation.secure import SecureSettings, SumLayout
from fed_iotlm.federation.secure_dp import check_range, noisy_vector, parse_holders, round_config

SETTINGS = SecureSettings(enabled=True, clipping_range=4.0, max_count=1000.0)


def _sum(vectors):
    return [np.sum(parts, axis=0) for parts in zip(*vectors, strict=True)]


def test_the_released_noise_has_the_central_std():
    """Zero updates from h holders: what the server releases is the noise alone, with
    std σC/h_g on the average (σC on the sum), while one node's share is σC/√h_g."""
    current = {"enc.imu.w": np.zeros((100, 200)), "fusion.w": np.zeros(30_000)}
    layout = SumLayout.of(current)
    sigma, clip, h = 1.2, 0.5, 4
    holders = {"enc.imu": h, "fusion": h}
    counts = {"enc.imu": 80, "fusion": 80}
    vectors = [
        noisy_vector(
            layout,
            current,
            current,
            counts,
            holders,
            sigma,
            clip,
            SETTINGS,
            np.random.default_rng(i),
            f"node {i}",
        )  # fmt: skip
        for i in range(h)
    ]
    share = np.concatenate([v.ravel() for v in vectors[0][:-2]])
    assert share.std() == pytest.approx(sigma * clip / np.sqrt(h), rel=0.03)
    decoded = layout.decode(_sum(vectors), current, SETTINGS.max_count, 2)
    released = np.concatenate([decoded.state[k].ravel() for k in current])
    assert released.std() == pytest.approx(sigma * clip / h, rel=0.03)
    assert abs(released.mean()) < 0.01
    assert decoded.holders == holders  # every holder weighs the same (share 1)


def test_updates_are_clipped_jointly_and_averaged_unweighted():
    current = {"enc.imu.w": np.zeros(4), "fusion.w": np.zeros(3)}
    layout = SumLayout.of(current)
    big = {"enc.imu.w": np.full(4, 10.0), "fusion.w": np.full(3, 10.0)}  # norm ~26
    small = {"enc.imu.w": np.full(4, 0.1), "fusion.w": np.full(3, 0.1)}
    holders = {"enc.imu": 2, "fusion": 2}
    counts = [{"enc.imu": 900, "fusion": 900}, {"enc.imu": 10, "fusion": 10}]
    vectors = [
        noisy_vector(layout, t, current, c, holders, 0.0, 1.0, SETTINGS, np.random.default_rng())
        for t, c in zip([big, small], counts, strict=True)
    ]
    state = layout.decode(_sum(vectors), current, SETTINGS.max_count, 2).state
    clipped = 1.0 / np.sqrt(7)  # the big update scaled to norm C=1
    np.testing.assert_allclose(state["enc.imu.w"], (clipped + 0.1) / 2, atol=1e-5)


def test_round_config_round_trips_and_the_range_is_checked():
    dp = DPConfig(enabled=True, mode="distributed", clipping_norm=1.0, noise_multiplier=1.0)
    config = round_config(dp, {"enc.imu": 3, "head.activity": 2})
    assert parse_holders(config["dp-holders"]) == {"enc.imu": 3, "head.activity": 2}
    with pytest.raises(ValueError, match="clipping_range=2.0 is below 5.24"):
        check_range(dp, SecureSettings(enabled=True))
    check_range(dp, SecureSettings(enabled=True, clipping_range=6.0))


@pytest.mark.integration
def test_secagg_with_distributed_dp_runs_and_accounts(quick_cfg, tmp_path):
    """A real simulation: SecAgg+ rounds whose sums carry the nodes' noise shares; the
    accountant composes the released rounds exactly as central DP-FedAvg would."""
    import json

    from fed_iotlm.federation.privacy import epsilon_after
    from simulations.run import run_experiment

    cfg = quick_cfg(
        "secagg.enabled=true", "normalization=per_site", "secagg.clipping_range=4.0",
        "dp.enabled=true",
        "dp.mode=distributed", "dp.noise_multiplier=0.5", "dp.clipping_norm=1.0",
        "partition.plan=[[imu,audio],[imu,depth],[audio,depth]]",
        "rounds=2", "train.epochs=1", "mlflow.enabled=false",
    )  # fmt: skip
    res = json.loads(run_experiment(cfg, tmp_path / "run").read_text())
    privacy = res["privacy"]
    assert privacy["mode"] == "distributed" and "under SecAgg+" in privacy["mechanism"]
    assert privacy["epsilon"] == pytest.approx(epsilon_after([(0.5, 1.0)] * 2, 1e-5))
    eps = [h["dp.epsilon"] for h in res["history"]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    for h in res["history"]:  # no group's count, even summed, next to the noisy release
        assert h["secagg.nodes"] == 3 and not any(k.startswith("secagg.count.") for k in h)
    assert res["secagg"]["withheld_by_round"] == {"1": [], "2": []}
