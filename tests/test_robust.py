"""Robust rules equal a brute-force numpy reference per group over exactly its holders."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fed_iotlm.federation.aggregation import NodeUpdate, aggregate_groups
from fed_iotlm.federation.attacks import AttackConfig, is_attacker, maybe_attack, num_attackers
from fed_iotlm.federation.robust import RobustConfig, aggregate_robust, krum_choice, robust_config

CURRENT = {
    "enc.imu.w": np.zeros((2, 3), np.float32),
    "enc.imu.b": np.zeros(2, np.float32),
    "enc.audio.w": np.zeros(4, np.float32),
    "enc.depth.w": np.full(2, 7.0, np.float32),  # nobody holds depth
    "fusion.q": np.zeros(3, np.float32),
}
GROUP_KEYS = {
    "enc.imu": ["enc.imu.w", "enc.imu.b"],
    "enc.audio": ["enc.audio.w"],
    "fusion": ["fusion.q"],
}


def _updates(seed: int = 0) -> list[NodeUpdate]:
    """Six nodes: imu on 0-4, audio on 0, 2, 4; fusion everywhere; node 5 has a zero
    imu count (sends it but does not hold it)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(6):
        arrays = {"fusion.q": rng.normal(size=3).astype(np.float32)}
        counts = {"fusion": float(rng.integers(1, 50))}
        arrays["enc.imu.w"] = rng.normal(size=(2, 3)).astype(np.float32)
        arrays["enc.imu.b"] = rng.normal(size=2).astype(np.float32)
        counts["enc.imu"] = 0.0 if i == 5 else float(rng.integers(1, 50))
        if i % 2 == 0:
            arrays["enc.audio.w"] = rng.normal(size=4).astype(np.float32)
            counts["enc.audio"] = float(rng.integers(1, 50))
        out.append(NodeUpdate(str(i), arrays, counts))
    return out


def _holders(updates: list[NodeUpdate], group: str) -> list[NodeUpdate]:
    return [u for u in updates if u.counts.get(group, 0) > 0]


def _brute_trimmed(stack: np.ndarray, fraction: float) -> np.ndarray:
    n = stack.shape[0]
    cut = int(fraction * n)
    return np.sort(stack, axis=0)[cut : n - cut].mean(axis=0)


def _brute_krum(vectors: list[np.ndarray], f: int, select: int) -> list[int]:
    n = len(vectors)
    k = min(n - 1, max(1, n - f - 2))
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:k]))
    return sorted(range(n), key=lambda i: (scores[i], i))[:select]


def _flat(u: NodeUpdate, keys: list[str]) -> np.ndarray:
    return np.concatenate([u.arrays[k].astype(np.float64).ravel() for k in keys])


@pytest.mark.parametrize(
    "config",
    [
        RobustConfig("median"),
        RobustConfig("trimmed_mean", trim_fraction=0.2),
        RobustConfig("trimmed_mean", trim_fraction=0.4),
        RobustConfig("krum", krum_f=1, krum_select=1),
        RobustConfig("krum", krum_f=0, krum_select=2),
    ],
    ids=lambda c: f"{c.rule}-{c.trim_fraction}-{c.krum_f}-{c.krum_select}",
)
def test_rules_equal_brute_force_per_group(config):
    updates = _updates()
    out = aggregate_robust(CURRENT, updates, config)
    for group, keys in GROUP_KEYS.items():
        holders = _holders(updates, group)
        assert out.holders[group] == [u.node for u in holders]
        if config.rule == "krum":
            chosen = _brute_krum(
                [_flat(u, keys) for u in holders], config.krum_f, config.krum_select
            )
            holders = [holders[i] for i in chosen]
            assert out.selected[group] == [u.node for u in holders]
        for key in keys:
            stack = np.stack([u.arrays[key] for u in holders]).astype(np.float64)
            if config.rule == "median":
                want = np.median(stack, axis=0)
            elif config.rule == "trimmed_mean":
                want = _brute_trimmed(stack, config.trim_fraction)
            else:
                want = stack.mean(axis=0)
            np.testing.assert_allclose(out.state[key], want, rtol=1e-6, atol=1e-6)
            assert out.state[key].dtype == np.float32
    # a group no node holds stays exactly as it was
    np.testing.assert_array_equal(out.state["enc.depth.w"], CURRENT["enc.depth.w"])
    assert "enc.depth" not in out.holders


def test_median_of_even_holder_count_is_midpoint():
    ups = [NodeUpdate(str(i), {"fusion.q": np.full(3, v, np.float32)}, {"fusion": 1.0})
           for i, v in enumerate([1.0, 2.0, 10.0, 100.0])]  # fmt: skip
    out = aggregate_robust(CURRENT, ups, RobustConfig("median"))
    np.testing.assert_allclose(out.state["fusion.q"], 6.0)


def test_krum_picks_an_honest_update_when_one_is_far_away():
    rng = np.random.default_rng(1)
    honest = [rng.normal(scale=0.1, size=3).astype(np.float32) for _ in range(4)]
    outlier = np.full(3, 1000.0, np.float32)
    ups = [
        NodeUpdate(str(i), {"fusion.q": v}, {"fusion": 1.0})
        for i, v in enumerate([outlier, *honest])
    ]
    out = aggregate_robust(CURRENT, ups, RobustConfig("krum", krum_f=1))
    (chosen,) = out.selected["fusion"]
    assert chosen != "0"
    np.testing.assert_array_equal(out.state["fusion.q"], honest[int(chosen) - 1])
    # while the mean is dragged far away by the one outlier
    mean = aggregate_groups(CURRENT, ups).state["fusion.q"]
    assert np.abs(mean).min() > 100


def test_krum_scores_are_shift_invariant_and_match_brute_force():
    rng = np.random.default_rng(2)
    for n, f, m in itertools.product([1, 2, 3, 5, 7], [0, 1, 2], [1, 3]):
        vecs = rng.normal(size=(n, 11)) + 1e4  # a large common offset, as trained weights have
        want = _brute_krum(list(vecs), f, min(m, n))
        assert krum_choice(vecs, f, m).tolist() == want


def test_mean_rule_is_the_count_weighted_mean():
    updates = _updates()
    robust = aggregate_robust(CURRENT, updates, RobustConfig("mean"))
    plain = aggregate_groups(CURRENT, updates)
    for key in CURRENT:
        np.testing.assert_array_equal(robust.state[key], plain.state[key])


def test_config_defaults_and_validation():
    assert robust_config({}) == RobustConfig("mean")
    assert robust_config({"aggregation": "krum", "krum_f": 2}).krum_f == 2
    for bad in ({"aggregation": "mode"}, {"trim_fraction": 0.5}, {"krum_f": -1}):
        with pytest.raises(ValueError):
            robust_config(bad)


def test_attackers_are_the_first_partition_ids_and_scale_the_step():
    assert num_attackers(0.2, 8) == 2 and num_attackers(0.5, 3) == 2 and num_attackers(0.0, 8) == 0
    attack = AttackConfig(fraction=0.2, kind="sign_flip", scale=10.0)
    assert [is_attacker(attack, i, 8) for i in range(4)] == [True, True, False, False]
    assert not is_attacker(AttackConfig(fraction=1.0, kind="none"), 0, 8)
    current = {"fusion.q": np.ones(3, np.float32)}
    trained = {"fusion.q": np.array([2.0, 1.0, 0.0], np.float32)}
    sent = maybe_attack(trained, current, attack, 0, 8)
    np.testing.assert_allclose(sent["fusion.q"], [1 - 10, 1, 1 + 10])
    assert sent["fusion.q"].dtype == np.float32
    scaled = maybe_attack(trained, current, AttackConfig(0.2, "scale", 3.0), 1, 8)
    np.testing.assert_allclose(scaled["fusion.q"], [4, 1, -2])
    honest = maybe_attack(trained, current, attack, 2, 8)
    np.testing.assert_array_equal(honest["fusion.q"], trained["fusion.q"])
