"""Bad updates are dropped with a reason and counted; good ones alongside still aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.federation.aggregation import NodeUpdate
from fed_iotlm.federation.records import (
    node_reply,
    record_to_numpy,
)
from fed_iotlm.federation.round_record import RoundRecord, facts_of, robustness_block
from fed_iotlm.federation.strategy import ModalityAwareFedAdam, build_strategy
from fed_iotlm.federation.update_checks import CheckConfig, check_config, screen_updates

CURRENT = {
    "enc.imu.w": np.zeros((2, 2), np.float32),
    "enc.imu.b": np.zeros(2, np.float32),
    "fusion.q": np.zeros(2, np.float32),
}
GOOD = {
    "enc.imu.w": np.ones((2, 2), np.float32),
    "enc.imu.b": np.ones(2, np.float32),
    "fusion.q": np.ones(2, np.float32),
}
COUNTS = {"enc.imu": 10.0, "fusion": 10.0}

BAD = {
    "unknown_key": ({**GOOD, "enc.gps.w": np.zeros(2, np.float32)}, COUNTS, "'enc.gps.w'"),
    "missing_key": ({"enc.imu.w": GOOD["enc.imu.w"]}, COUNTS, "'enc.imu.b'"),
    "shape": ({**GOOD, "fusion.q": np.zeros(3, np.float32)}, COUNTS, "(3,)"),
    "dtype": ({**GOOD, "fusion.q": np.zeros(2, np.float64)}, COUNTS, "float64"),
    "non_finite": ({**GOOD, "enc.imu.b": np.array([1.0, np.nan], np.float32)}, COUNTS, "NaN"),
    "norm": ({**GOOD, "fusion.q": np.full(2, 100.0, np.float32)}, COUNTS, "bound 10"),
    "bad_count": (GOOD, {"enc.imu": -1.0, "fusion": 10.0}, "enc.imu"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_kind_is_rejected_with_reason_and_counted(kind):
    arrays, counts, detail = BAD[kind]
    screened = screen_updates(
        CURRENT,
        [NodeUpdate("good", GOOD, COUNTS), NodeUpdate("bad", arrays, counts)],
        CheckConfig(max_update_norm=10.0),
    )
    assert [u.node for u in screened.accepted] == ["good"]
    (rejection,) = screened.rejected
    assert rejection.kind == kind
    assert rejection.reason.startswith(f"node bad rejected ({kind})")
    assert detail in rejection.reason
    metrics = screened.metrics()
    assert metrics["rejected_updates"] == 1 and metrics[f"rejected.{kind}"] == 1
    assert metrics["accepted_updates"] == 1


def test_norm_bound_is_off_when_null_and_norm_is_measured():
    big = {**GOOD, "fusion.q": np.full(2, 100.0, np.float32)}
    screened = screen_updates(CURRENT, [NodeUpdate("a", big, COUNTS)], check_config({}))
    assert len(screened.accepted) == 1
    assert screened.norms["a"] == pytest.approx(np.sqrt(4 + 2 + 2 * 100.0**2))
    with pytest.raises(ValueError, match="max_update_norm"):
        CheckConfig(max_update_norm=0.0)


def _strategy(strategy_cfg: dict):
    strategy = build_strategy("federated", {"name": "fedavg", **strategy_cfg}, num_nodes=2)
    strategy._current = dict(CURRENT)
    return strategy


def test_strategy_drops_bad_update_aggregates_the_rest_and_reports_it():
    strategy = _strategy({"checks": {"max_update_norm": None}})
    nan = {**GOOD, "fusion.q": np.array([np.inf, 0.0], np.float32)}
    arrays, metrics = strategy.aggregate_train(
        1, [node_reply(0, GOOD, COUNTS), node_reply(1, nan, COUNTS)]
    )
    state = record_to_numpy(arrays)
    np.testing.assert_array_equal(state["fusion.q"], GOOD["fusion.q"])  # the good one alone
    assert metrics["rejected_updates"] == 1 and metrics["rejected.non_finite"] == 1
    facts = facts_of(metrics)
    assert facts.stats["accepted_updates"] == 1 and facts.holders == {
        "enc.imu": ["0"],
        "fusion": ["0"],
    }
    assert "node 1 rejected (non_finite) at 'fusion.q'" in facts.rejections[0]
    record = RoundRecord("train", 1, rejections=facts.rejections)
    report = robustness_block([record], {}, {})
    assert report["rejections_by_round"] == {"1": list(facts.rejections)}


def test_all_rejected_keeps_state_and_still_counts():
    strategy = _strategy({"checks": {"max_update_norm": 0.5}})
    arrays, metrics = strategy.aggregate_train(1, [node_reply(0, GOOD, COUNTS)])
    assert arrays is None  # flwr keeps the previous arrays
    assert metrics["rejected_updates"] == 1 and metrics["rejected.norm"] == 1


def test_fedadam_with_all_rejected_keeps_state():
    strategy = build_strategy(
        "federated", {"name": "fedadam", "checks": {"max_update_norm": 0.5}}, num_nodes=1
    )
    assert isinstance(strategy, ModalityAwareFedAdam)
    strategy._current = dict(CURRENT)
    strategy.current_arrays = dict(CURRENT)
    arrays, metrics = strategy.aggregate_train(1, [node_reply(0, GOOD, COUNTS)])
    assert arrays is None and metrics["rejected_updates"] == 1


def test_plain_fedavg_refuses_robust_settings():
    with pytest.raises(ValueError, match="modality-aware"):
        build_strategy("fedavg", {"name": "fedavg", "aggregation": "median"}, num_nodes=2)
