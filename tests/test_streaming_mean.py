"""The server's mean-rule round (screen each packed update, sum the accepted ones in
per-group batches) gives what the per-key path gives: the same verdicts, reasons and
update norms to the bit, the same holders, and the count-weighted mean within float32
rounding of a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.federation.aggregation import NodeUpdate
from fed_iotlm.federation.groups import group_of
from fed_iotlm.federation.packing import ALIGN, aligned_empty, layout_of
from fed_iotlm.federation.records import decode_update, packed_record
from fed_iotlm.federation.streaming_mean import screen_and_mean
from fed_iotlm.federation.update_checks import CheckConfig, check_packed, screen_updates

RNG = np.random.default_rng(3)
# groups of different sizes, so that their batches hold different numbers of rows
CURRENT = {
    "enc.imu.w": RNG.standard_normal((30, 40)).astype(np.float32),
    "enc.imu.b": RNG.standard_normal(30).astype(np.float32),
    "enc.audio.w": RNG.standard_normal((7, 3000)).astype(np.float32),
    "fusion.w": RNG.standard_normal((64, 64)).astype(np.float32),
    "head.activity.w": RNG.standard_normal((5, 64)).astype(np.float32),
}
GROUPS = sorted({group_of(k) for k in CURRENT})


def _updates(count: int, seed: int) -> list[tuple[dict, dict]]:
    """``count`` nodes, each with a random subset of the groups (a count of 0 for some),
    one with a NaN, one with a negative count, one far from the model, and a node
    right after the NaN one that lacks the NaN's group (its batch row is left as the
    rejected node wrote it)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        held = [g for g in GROUPS if rng.random() < 0.7] or ["fusion"]
        if i == 4:
            held = sorted(set(held) | {"enc.imu"})
        if i == 5:
            held = [g for g in held if g != "enc.imu"] or ["fusion"]
        arrays = {
            k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
            for k, v in CURRENT.items()
            if group_of(k) in held
        }
        counts = {g: float(rng.integers(0, 40)) for g in held}
        if i == 4:
            arrays["enc.imu.w"][3, 7] = np.nan
        if i == 9:
            counts[held[0]] = -2.0
        if i == 13:
            arrays = {k: v * 40 for k, v in arrays.items()}
        out.append((arrays, counts))
    return out


def _packed(nodes: list[tuple[dict, dict]]):
    layout = layout_of(CURRENT)
    return [
        decode_update(str(i), packed_record(arrays), counts, layout)
        for i, (arrays, counts) in enumerate(nodes)
    ]


def _reference_mean(nodes, accepted: set[str]) -> dict[str, np.ndarray]:
    """Σ n·w / Σ n per group over its accepted holders, in float64 (groups nobody sent
    keep the current value)."""
    out = {}
    for key, value in CURRENT.items():
        g = group_of(key)
        terms = [
            (counts[g], arrays[key].astype(np.float64))
            for i, (arrays, counts) in enumerate(nodes)
            if str(i) in accepted and key in arrays and counts[g] > 0
        ]
        if not terms:
            out[key] = value.astype(np.float64)
            continue
        total = sum(n for n, _ in terms)
        out[key] = sum(n * w for n, w in terms) / total
    return out


def _float32_bound(nodes, accepted: set[str], key: str) -> np.ndarray:
    """Float32 rounding of a sum of count-weighted differences: a few units of 2⁻²⁴ per
    term, relative to the terms' magnitude Σ n·|w − c| / Σ n, plus the final add."""
    g = group_of(key)
    terms = [
        (counts[g], np.abs(arrays[key].astype(np.float64) - CURRENT[key]))
        for i, (arrays, counts) in enumerate(nodes)
        if str(i) in accepted and key in arrays and counts[g] > 0
    ]
    eps = 2.0**-24
    if not terms:
        return np.zeros(CURRENT[key].shape)
    total = sum(n for n, _ in terms)
    spread = sum(n * d for n, d in terms) / total
    return 4 * eps * (len(terms) + 2) * spread + 2 * eps * np.abs(CURRENT[key])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bound", [None, 25.0])
def test_screened_mean_equals_the_per_key_path(seed, bound):
    nodes = _updates(23, seed=seed)
    config = CheckConfig(max_update_norm=bound)
    screened, result = screen_and_mean(
        CURRENT, layout_of(CURRENT).pack(CURRENT), _packed(nodes), config
    )

    per_key = screen_updates(
        CURRENT, [NodeUpdate(str(i), a, c) for i, (a, c) in enumerate(nodes)], config
    )
    assert [r.reason for r in screened.rejected] == [r.reason for r in per_key.rejected]
    assert {"4", "9"} <= {r.node for r in screened.rejected}
    assert ("13" in {r.node for r in screened.rejected}) == (bound is not None)
    assert screened.norms.keys() == per_key.norms.keys()
    for node, norm in screened.norms.items():  # one subtraction and dot per group either way
        assert norm == pytest.approx(per_key.norms[node], rel=1e-6)

    accepted = {u.node for u in screened.accepted}
    expected_holders = {
        g: [str(i) for i, (_, c) in enumerate(nodes) if str(i) in accepted and c.get(g, 0) > 0]
        for g in GROUPS
    }
    assert result.holders == {g: h for g, h in expected_holders.items() if h}
    reference = _reference_mean(nodes, accepted)
    for key, value in result.state.items():
        assert value.dtype == np.float32 and value.shape == CURRENT[key].shape
        assert np.isfinite(value).all(), key  # the NaN node's batch row never leaks
        error = np.abs(value.astype(np.float64) - reference[key])
        assert (error <= _float32_bound(nodes, accepted, key)).all(), key


def test_all_rejected_gives_no_mean():
    nodes = [(arrays, {g: -1.0 for g in counts}) for arrays, counts in _updates(3, seed=1)]
    screened, result = screen_and_mean(
        CURRENT, layout_of(CURRENT).pack(CURRENT), _packed(nodes), CheckConfig()
    )
    assert result is None and len(screened.rejected) == 3


def test_norms_are_the_update_distance_of_check_packed():
    # the streaming screen takes one dot per run of neighbouring groups, check_packed
    # one per group: the same ||w − c|| up to float32 rounding of the sum's order (every
    # well-formed node of a round takes the streaming path, so verdicts within a round
    # come from one formula)
    nodes = [(a, c) for i, (a, c) in enumerate(_updates(11, seed=7)) if i not in (4, 9)]
    packed = _packed(nodes)
    current = layout_of(CURRENT).pack(CURRENT)
    screened, _ = screen_and_mean(CURRENT, current, packed, CheckConfig())
    assert not screened.rejected
    for (arrays, _), upd in zip(nodes, packed, strict=True):
        _, norm = check_packed(upd, current, CheckConfig())
        exact = np.sqrt(
            sum(np.sum((v.astype(np.float64) - CURRENT[k]) ** 2) for k, v in arrays.items())
        )
        assert screened.norms[upd.node] == pytest.approx(norm, rel=1e-6), upd.node
        assert screened.norms[upd.node] == pytest.approx(exact, rel=1e-6), upd.node


def test_a_node_checked_again_in_float64_is_summed_once():
    # finite values too far apart for float32: the squared norm overflows, the node is
    # checked again (float64 differences) and accepted; the rest of its batch is then
    # summed node by node, and the far node only once, in float64
    nodes = _updates(6, seed=11)
    nodes = [(a, {g: 1.0 for g in c}) for i, (a, c) in enumerate(nodes) if i != 4]
    far_key = "fusion.w"
    arrays, counts = nodes[1]
    arrays = {**arrays, far_key: CURRENT[far_key] + np.float32(3e19)}
    counts = {**counts, "fusion": 1.0}
    nodes[1] = (arrays, counts)
    screened, result = screen_and_mean(
        CURRENT, layout_of(CURRENT).pack(CURRENT), _packed(nodes), CheckConfig()
    )
    assert not screened.rejected and screened.norms["1"] > 3e19
    reference = _reference_mean(nodes, {u.node for u in screened.accepted})
    for key, value in result.state.items():
        np.testing.assert_allclose(value, reference[key], rtol=1e-6, atol=1e-5, err_msg=key)


def test_group_buffers_are_packed_on_cache_lines():
    buffers = layout_of(CURRENT).pack(CURRENT)
    assert all(b.ctypes.data % ALIGN == 0 for b in buffers.values())
    for dtype in (np.float32, np.float64, np.int8, np.float16):
        for size in (0, 1, 17, 4096):
            out = aligned_empty(size, dtype)
            assert out.size == size and out.dtype == dtype
            assert out.ctypes.data % ALIGN == 0 or size == 0
