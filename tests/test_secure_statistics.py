"""The statistics round's SecAgg+ arithmetic (fed_iotlm/federation/secure_statistics.py).

Each node's vector goes through Flower's own SecAgg+ quantiser (``quantize`` then
``dequantize``, stochastic rounding included) before being summed, as the protocol does
(the masks cancel in the sum, so they are left out here).  The pooled mean/std must equal
the plain round's (:class:`ChannelSums` summed in the clear) within the stated tolerance;
the whole-run test (tests/test_secagg_whole_run.py) runs the real protocol.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fed_iotlm.data.dataset import Split
from fed_iotlm.data.preprocess import ChannelSums
from fed_iotlm.federation.secure import SecureRangeError, SecureSettings
from fed_iotlm.federation.secure_statistics import (
    LIMBS,
    StatsLayout,
    channel_shape,
    held_modalities,
)

SETTINGS = SecureSettings(enabled=True, stats_bound=1000.0)
# stated tolerance: relative to the pooled std, the mean and the std agree within 1e-5
# (the two-limb error is ~nodes·step²·max_count·B²/(n·std²) ≈ 1e-8 here)
TOLERANCE = 1e-5


def _split(rng, n: int, held: dict[str, bool]) -> Split:
    """imu [N,T,C] with a large offset and a small spread (the hard case for fixed point),
    depth [N,C,H,W] (image-like, 0..255), vec [N,D]; absent modalities masked out."""
    x = {
        "imu": 9.81 + 0.05 * rng.normal(size=(n, 20, 3)),
        "depth": rng.uniform(0, 255, size=(n, 2, 4, 4)),
        "vec": rng.normal(-3.0, 2.0, size=(n, 5)),
    }
    mask = {m: np.full(n, held.get(m, False)) for m in x}
    mask["imu"][: n // 4] = False  # some samples lack the modality: not counted
    return Split(x=x, mask=mask, y={"activity": np.zeros(n, dtype=np.int64)})


def _through_secagg(vectors: list[list[np.ndarray]], settings: SecureSettings):
    """Σ over nodes of what the protocol reconstructs for each node's vector."""
    clip, q = float(settings.clipping_range), int(settings.quantization_range)
    rebuilt = [dequantize(quantize(v, clip, q), clip, q) for v in vectors]
    return [np.sum(parts, axis=0) for parts in zip(*rebuilt, strict=True)]


def _federation(rng):
    holdings = [
        {"imu": True, "depth": True},
        {"imu": True, "vec": True},
        {"imu": True, "depth": True, "vec": True},
        {"vec": False},  # holds nothing present
    ]
    return [_split(rng, int(rng.integers(30, 90)), h) for h in holdings]


def _layout(splits, settings=SETTINGS) -> StatsLayout:
    return StatsLayout.of({m: channel_shape(a) for m, a in splits[0].x.items()}, settings)


def test_secure_pooled_statistics_equal_the_plain_rounds():
    rng = np.random.default_rng(0)
    splits = _federation(rng)
    layout = _layout(splits)
    census = [np.sum([layout.census(held_modalities(s))[0] for s in splits], axis=0)]
    holders = layout.holders(census)
    assert holders == {"depth": 2, "imu": 3, "vec": 2}
    release = [m for m, h in holders.items() if h >= 2]
    vectors = [layout.encode(s, SETTINGS, release, f"node {i}") for i, s in enumerate(splits)]
    assert len({tuple(a.shape for a in v) for v in vectors}) == 1  # one fixed layout
    found = layout.decode(_through_secagg(vectors, SETTINGS), SETTINGS)

    plain = sum((ChannelSums.of(s) for s in splits), ChannelSums({}, {}, {})).standardizer()
    assert found.withheld == [] and sorted(found.scaler.mean) == ["depth", "imu", "vec"]
    for m in plain.mean:
        assert found.scaler.mean[m].shape == plain.mean[m].shape
        scale = plain.std[m]
        np.testing.assert_allclose(
            found.scaler.mean[m] / scale, plain.mean[m] / scale, rtol=0, atol=TOLERANCE
        )
        np.testing.assert_allclose(found.scaler.std[m] / scale, 1.0, rtol=0, atol=TOLERANCE)
    present = sum(int(s.mask["imu"].sum()) for s in splits)
    assert found.counts["imu"] == present  # pooled samples of the modality


def test_a_modality_with_one_holder_is_not_released_and_its_holder_sends_zeros():
    rng = np.random.default_rng(1)
    splits = [_split(rng, 40, {"imu": True, "depth": True}), _split(rng, 50, {"imu": True})]
    layout = _layout(splits)
    holders = layout.holders([sum(layout.census(held_modalities(s))[0] for s in splits)])
    assert holders["depth"] == 1
    release = [m for m, h in holders.items() if h >= SETTINGS.min_holders]
    assert release == ["imu"]
    vectors = [layout.encode(s, SETTINGS, release) for s in splits]
    i = layout.modalities.index("depth")
    per = 2 * LIMBS
    assert all(not np.any(v[per * i + k]) for v in vectors for k in range(per))
    found = layout.decode(_through_secagg(vectors, SETTINGS), SETTINGS)
    assert "depth" not in found.scaler.mean and found.withheld == []  # never submitted
    # a holder that submits anyway (an old node ignoring ``release``) is still withheld
    leaked = layout.decode(
        _through_secagg([layout.encode(s, SETTINGS, layout.modalities) for s in splits], SETTINGS),
        SETTINGS,
    )
    assert leaked.withheld == ["depth"] and "depth" not in leaked.scaler.mean


def test_a_value_beyond_the_public_bound_is_an_error_on_the_node_not_a_silent_clip():
    rng = np.random.default_rng(2)
    split = _split(rng, 10, {"imu": True, "depth": True})
    layout = _layout([split], SecureSettings(enabled=True, stats_bound={"imu": 20.0, "depth": 100.0, "vec": 9.0}))  # fmt: skip
    with pytest.raises(SecureRangeError, match=r"node 7: 'depth' value .* outside .*stats_bound"):
        layout.encode(split, SETTINGS, ["depth", "imu"], "node 7")


def test_a_node_with_another_channel_layout_is_refused_by_name():
    rng = np.random.default_rng(3)
    split = _split(rng, 10, {"imu": True})
    layout = StatsLayout.of({"imu": (1, 1, 4), "depth": (1, 2, 1, 1), "vec": (1, 5)}, SETTINGS)
    with pytest.raises(ValueError, match=r"node 2: 'imu' has channel shape \(1, 3\)"):
        layout.encode(split, SETTINGS, ["imu"], "node 2")


def test_class_counts_in_the_secure_sum_equal_the_sum_of_the_nodes_counts():
    """train.class_weighting=balanced under SecAgg+: each node's class counts end its
    vector; through the quantiser and summed they decode to the global counts, and the
    pooled mean/std are unchanged by them."""
    from fed_iotlm.models.class_weights import add_counts, class_counts

    rng = np.random.default_rng(1)
    splits = _federation(rng)
    tasks = {"activity": 5, "place": 3}
    for i, s in enumerate(splits):  # skewed labels, some unlabelled, a class only one node has
        n = len(s)
        s.y["activity"] = rng.choice([-1, 0, 1, 1, 2, 4 if i == 0 else 2], size=n)
        s.y["place"] = rng.choice([-1, 0, 2], size=n)
    layout = _layout(splits)
    counted = StatsLayout.of(
        dict(zip(layout.modalities, layout.shapes, strict=True)), SETTINGS, tasks
    )
    rebuilt = StatsLayout.from_message(
        ",".join(layout.modalities), counted.templates(), SETTINGS, counted.tasks_text()
    )
    assert rebuilt == counted  # what a node rebuilds from the server's message
    release = list(layout.modalities)
    vectors = [counted.encode(s, SETTINGS, release, f"node {i}") for i, s in enumerate(splits)]
    found = counted.decode(_through_secagg(vectors, SETTINGS), SETTINGS)
    expected: dict[str, np.ndarray] = {}
    for s in splits:
        expected = add_counts(expected, class_counts(s.y, tasks))
    assert {t: c.tolist() for t, c in found.class_counts.items()} == {
        t: c.tolist() for t, c in expected.items()
    }
    assert found.class_counts["activity"][4] > 0 and found.class_counts["activity"][3] == 0
    plain = layout.decode(
        _through_secagg([layout.encode(s, SETTINGS, release) for s in splits], SETTINGS), SETTINGS
    )
    for m in plain.scaler.mean:
        np.testing.assert_allclose(found.scaler.mean[m], plain.scaler.mean[m], rtol=1e-6)
    assert plain.class_counts == {}  # without tasks the vector is as before


def test_a_bad_task_entry_in_the_statistics_message_is_refused():
    with pytest.raises(ValueError, match="bad task entry"):
        StatsLayout.from_message("imu", [np.zeros((1, 1, 3))], SETTINGS, "activity")
