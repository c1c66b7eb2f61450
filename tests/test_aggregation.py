"""Modality-aware aggregation equals a hand-computed weighted mean over holders."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.federation.aggregation import NodeUpdate, UpdateMismatchError, aggregate_groups
from fed_iotlm.federation.groups import group_of, keys_by_group, node_groups, select_groups

CURRENT = {
    "enc.imu.w": np.zeros((2, 2), np.float32),
    "enc.audio.w": np.zeros(3, np.float32),
    "enc.depth.w": np.full(2, 7.0, np.float32),  # nobody holds depth
    "fusion.q": np.zeros(2, np.float32),
    "head.activity.w": np.zeros(2, np.float32),
}


def test_group_names():
    assert group_of("enc.imu.backbone.net.0.weight") == "enc.imu"
    assert group_of("head.activity.net.2.bias") == "head.activity"
    assert group_of("fusion.pool.in_proj_weight") == "fusion"
    assert keys_by_group(CURRENT)["enc.imu"] == ["enc.imu.w"]
    assert node_groups(["imu"], ["activity"]) == ["enc.imu", "fusion", "head.activity"]
    assert set(select_groups(CURRENT, ["enc.audio", "fusion"])) == {"enc.audio.w", "fusion.q"}


def test_weighted_mean_over_exact_holders():
    a = NodeUpdate(
        "a",
        {
            "enc.imu.w": np.ones((2, 2)),
            "fusion.q": np.array([1.0, 1.0]),
            "head.activity.w": np.array([2.0, 0.0]),
        },
        {"enc.imu": 10, "fusion": 10, "head.activity": 10},
    )
    b = NodeUpdate(
        "b",
        {
            "enc.imu.w": 4 * np.ones((2, 2)),
            "enc.audio.w": np.array([3.0, 3.0, 3.0]),
            "fusion.q": np.array([4.0, 0.0]),
        },
        {"enc.imu": 30, "enc.audio": 5, "fusion": 30},
    )
    out = aggregate_groups(CURRENT, [a, b])
    np.testing.assert_allclose(out.state["enc.imu.w"], (10 * 1 + 30 * 4) / 40)
    np.testing.assert_allclose(out.state["fusion.q"], [(10 + 120) / 40, 10 / 40])
    # a group only one node holds is exactly that node's value
    np.testing.assert_allclose(out.state["enc.audio.w"], [3.0, 3.0, 3.0])
    np.testing.assert_allclose(out.state["head.activity.w"], [2.0, 0.0])
    # a group no node holds stays as it was
    np.testing.assert_array_equal(out.state["enc.depth.w"], CURRENT["enc.depth.w"])
    assert out.holders == {
        "enc.imu": ["a", "b"],
        "fusion": ["a", "b"],
        "head.activity": ["a"],
        "enc.audio": ["b"],
    }
    assert out.state["enc.imu.w"].dtype == np.float32


def test_matches_numpy_reference_on_random_updates():
    rng = np.random.default_rng(0)
    updates, ref_num, ref_den = [], np.zeros(5), 0.0
    for i in range(6):
        n = float(rng.integers(1, 50))
        w = rng.normal(size=5)
        holds = i % 2 == 0
        arrays = {"enc.audio.w": w[:3]} if holds else {}
        arrays["fusion.q"] = w[:2]
        updates.append(NodeUpdate(str(i), arrays, {"enc.audio": n, "fusion": n}))
        if holds:
            ref_num[:3] += n * w[:3]
            ref_den += n
    out = aggregate_groups(CURRENT, updates)
    np.testing.assert_allclose(out.state["enc.audio.w"], ref_num[:3] / ref_den, rtol=1e-6)
    assert out.holders["enc.audio"] == ["0", "2", "4"]


def test_zero_count_contributes_nothing():
    upd = NodeUpdate("a", {"fusion.q": np.array([5.0, 5.0])}, {"fusion": 0})
    out = aggregate_groups(CURRENT, [upd])
    np.testing.assert_array_equal(out.state["fusion.q"], CURRENT["fusion.q"])
    assert out.holders == {}


@pytest.mark.parametrize(
    "arrays, match",
    [({"enc.gps.w": np.zeros(2)}, "unknown parameter"), ({"fusion.q": np.zeros(3)}, "shape")],
)
def test_bad_update_is_rejected_with_reason(arrays, match):
    with pytest.raises(UpdateMismatchError, match=match):
        aggregate_groups(CURRENT, [NodeUpdate("x", arrays, {"enc.gps": 1, "fusion": 1})])


def test_sums_run_on_one_blas_thread_and_the_limit_is_restored():
    # above 10 000 values OpenBLAS runs ?axpy on several threads, whose wake-ups cost
    # far more than the sums on a busy machine: every aggregation runs single-threaded
    from threadpoolctl import threadpool_info, threadpool_limits

    from fed_iotlm.federation.aggregation import single_threaded_blas

    def openblas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"}

    with threadpool_limits(limits=2, user_api="blas"):  # whatever the environment set
        assert openblas_threads() == {2}
        with single_threaded_blas():
            assert openblas_threads() == {1}
        assert openblas_threads() == {2}
