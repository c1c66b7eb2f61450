"""Parameter groups travel as one buffer each, and the server's fast path (decode,
screen, streaming mean) gives what the per-key path gives: the same mean, the same
holders, the same rejection kinds and reasons."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from fed_iotlm.federation.aggregation import NodeUpdate, aggregate_groups
from fed_iotlm.federation.packing import LAYOUT_KEY, ModelLayout, PackingError
from fed_iotlm.federation.records import (
    decode_update,
    is_packed,
    node_reply,
    numpy_to_record,
    packed_record,
    record_nbytes,
    record_to_numpy,
    to_array,
)
from fed_iotlm.federation.round_record import facts_of
from fed_iotlm.federation.strategy import build_strategy
from fed_iotlm.federation.update_checks import CheckConfig, screen_updates
from tests.test_update_checks import BAD, COUNTS, CURRENT, GOOD

RNG = np.random.default_rng(0)
MODEL = {
    "enc.imu.net.0.weight": RNG.standard_normal((4, 3)).astype(np.float32),
    "enc.imu.net.0.bias": RNG.standard_normal(4).astype(np.float32),
    "enc.audio.net.weight": RNG.standard_normal((2, 20_001)).astype(np.float32),  # > 1 chunk
    "fusion.proj.weight": RNG.standard_normal((3, 4)).astype(np.float32),
    "head.activity.weight": RNG.standard_normal((2, 3)).astype(np.float32),
}


def _node(i: int, groups: list[str]) -> tuple[dict, dict]:
    rng = np.random.default_rng(100 + i)
    arrays = {
        k: (v + rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in MODEL.items()
        if any(k.startswith(g + ".") for g in groups)
    }
    return arrays, {g: float(5 + 3 * i) for g in groups}


NODES = [
    _node(0, ["enc.imu", "fusion", "head.activity"]),
    _node(1, ["enc.audio", "fusion"]),
    _node(2, ["enc.imu", "enc.audio", "fusion", "head.activity"]),
]


def test_packed_record_round_trips_and_is_one_buffer_per_group():
    arrays, _ = NODES[2]
    record = packed_record(arrays)
    assert is_packed(record)
    assert sorted(record.keys()) == sorted(
        [LAYOUT_KEY, "enc.imu", "enc.audio", "fusion", "head.activity"]
    )
    back = record_to_numpy(record)
    assert list(back) == list(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].flags.writeable  # callers may train into what they read


def test_strategy_on_packed_replies_equals_the_per_key_mean():
    expected = aggregate_groups(MODEL, [NodeUpdate(str(i), a, c) for i, (a, c) in enumerate(NODES)])
    for make in (packed_record, numpy_to_record):  # new nodes and per-key (older) nodes
        replies = [node_reply(i, a, c) for i, (a, c) in enumerate(NODES)]
        if make is numpy_to_record:
            for reply, (arrays, _) in zip(replies, NODES, strict=True):
                reply.content["arrays"] = numpy_to_record(arrays)
        strategy = build_strategy("federated", {"name": "fedavg"}, num_nodes=3)
        strategy._current = MODEL
        record, metrics = strategy.aggregate_train(1, replies)
        got = record_to_numpy(record)
        assert list(got) == list(MODEL)
        for key in MODEL:
            np.testing.assert_allclose(got[key], expected.state[key], rtol=1e-5, atol=1e-6)
            assert got[key].dtype == np.float32
        assert facts_of(metrics).holders == expected.holders
        assert metrics["accepted_updates"] == 3.0
        # the bytes up are the replies' payload, whichever way each was decoded
        sent = sum(record_nbytes(r.content["arrays"]) for r in replies)
        assert facts_of(metrics).bytes_up == sent


@pytest.mark.parametrize("kind", sorted(BAD))
def test_packed_updates_are_rejected_like_per_key_ones(kind):
    arrays, counts, detail = BAD[kind]
    config = CheckConfig(max_update_norm=10.0)
    per_key = screen_updates(CURRENT, [NodeUpdate("1", arrays, counts)], config).rejected
    strategy = build_strategy(
        "federated", {"name": "fedavg", "checks": {"max_update_norm": 10.0}}, num_nodes=2
    )
    strategy._current = CURRENT
    replies = [node_reply(0, GOOD, COUNTS), node_reply(1, arrays, counts)]
    assert all(is_packed(r.content["arrays"]) for r in replies)
    _, metrics = strategy.aggregate_train(1, replies)
    (reason,) = facts_of(metrics).rejections
    assert reason == per_key[0].reason
    assert detail in reason
    assert metrics["accepted_updates"] == 1.0 and metrics[f"rejected.{kind}"] == 1.0


def test_non_finite_value_is_named_by_its_key_inside_a_long_group():
    arrays, counts = NODES[2]
    layout = ModelLayout.of(MODEL)
    for key, where in (
        ("enc.audio.net.weight", [(1, 19_999), (1, 3)]),
        ("enc.imu.net.0.bias", [(1,), (3,)]),
    ):
        bad = {k: v.copy() for k, v in arrays.items()}
        bad[key][where[0]], bad[key][where[1]] = np.inf, np.nan
        update = decode_update("7", packed_record(bad), counts, layout)
        screened = screen_updates(MODEL, [update], CheckConfig())
        (rejection,) = screened.rejected
        assert rejection.kind == "non_finite" and rejection.key == key  # not its group's first
        assert "2 NaN/Inf" in rejection.reason


def test_manifest_in_another_key_order_is_reordered():
    arrays, counts = NODES[0]
    swapped = dict(reversed(list(arrays.items())))  # same keys, other order
    layout = ModelLayout.of(MODEL)
    update = decode_update("0", packed_record(swapped), counts, layout)
    assert update.problem is None
    for key, value in arrays.items():
        np.testing.assert_array_equal(update.arrays[key], value)


def test_an_array_the_manifest_does_not_name_is_rejected():
    arrays, counts = NODES[0]
    record = packed_record(arrays)
    record["smuggled"] = Array(np.zeros(3, np.float32))
    update = decode_update("0", record, counts, ModelLayout.of(MODEL))
    assert update.problem is not None and update.problem.kind == "unknown_key"
    assert update.problem.key == "smuggled"


def test_a_group_mixing_dtypes_travels_per_key():
    mixed = {"fusion.a": np.zeros(2, np.float32), "fusion.b": np.zeros(2, np.int64)}
    with pytest.raises(PackingError, match="mixes dtypes"):
        ModelLayout.of(mixed)
    record = packed_record(mixed)
    assert not is_packed(record)
    assert record_to_numpy(record)["fusion.b"].dtype == np.int64


@pytest.mark.parametrize(
    "value",
    [
        np.arange(5, dtype=np.float32),
        np.ones((3, 4), np.float64),
        np.zeros((0,), np.int64),
        np.ones((), np.float32),
        np.ones(3, ">f4"),
        np.ones((2, 3), np.int8)[:, :2],
        np.array([True, False]),
        np.array(["2026-12-01"], "datetime64[D]"),  # no buffer protocol: the tobytes path
    ],
)
def test_to_array_writes_what_flower_writes(value):
    # a 0-d array keeps its shape (np.ascontiguousarray would make it (1,))
    contiguous = value if value.flags.c_contiguous else np.ascontiguousarray(value)
    mine, flowers = to_array(value), Array(contiguous)
    assert mine.data == flowers.data
    assert (mine.dtype, mine.shape, mine.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    assert mine == flowers and mine.is_dirty and mine.object_id == flowers.object_id
    np.testing.assert_array_equal(mine.numpy(), contiguous)


def test_a_rejection_is_logged_by_the_strategy_module(caplog):
    strategy = build_strategy("federated", {"name": "fedavg"}, num_nodes=2)
    strategy._current = CURRENT
    bad = {**GOOD, "enc.imu.b": np.array([1.0, np.nan], np.float32)}
    with caplog.at_level("WARNING", logger="fed_iotlm"):
        strategy.aggregate_train(1, [node_reply(0, GOOD, COUNTS), node_reply(1, bad, COUNTS)])
    (record,) = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert record.name == "fed_iotlm.federation.strategy" and record.levelname == "WARNING"
    assert "node 1 rejected (non_finite) at 'enc.imu.b'" in record.getMessage()
