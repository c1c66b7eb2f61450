"""Sorting a round's replies (answered / failed / missing / skipped) and its settings.

The Messages are flwr's own, with the metadata a Grid gives them after a push (message
ids; a reply names the message it answers).  The path through real processes is
tests/test_faults.py.
"""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, Metadata, MetricRecord, RecordDict

from fed_iotlm.federation.strategy import build_strategy, min_nodes_of
from server.participation import DEFAULT_ROUND_TIMEOUT_S, round_timeout_s, sort_replies


def _message(src: int, dst: int, message_id: str, reply_to: str, **payload) -> Message:
    metadata = Metadata(
        run_id=1, message_id=message_id, src_node_id=src, dst_node_id=dst,
        reply_to_message_id=reply_to, group_id="1", created_at=0.0, ttl=60.0,
        message_type="train",
    )  # fmt: skip
    return Message(metadata=metadata, **payload)


def _sent(node_id: int) -> Message:
    return _message(0, node_id, f"ins-{node_id}", "", content=RecordDict())


def _ok(msg: Message) -> Message:
    content = RecordDict({"metrics": MetricRecord({"x": 1.0})})
    dst = msg.metadata.dst_node_id
    return _message(dst, 0, "", msg.metadata.message_id, content=content)


def _error(msg: Message, reason: str) -> Message:
    # the SuperLink answers for an offline node (ErrorCode.NODE_UNAVAILABLE = 5)
    return _message(1, 0, "", msg.metadata.message_id, error=Error(code=5, reason=reason))


def test_a_round_counts_answers_failures_and_silence_by_partition():
    sent = [_sent(n) for n in (101, 102, 103, 104)]
    replies = [_ok(sent[0]), _ok(sent[1]), _error(sent[2], "Node Unavailable")]
    out = sort_replies(3, sent, replies, 2, 30.0, {101: 0, 102: 1, 103: 2, 104: 3})
    assert [r.metadata.reply_to_message_id for r in out.answered] == [
        sent[0].metadata.message_id,
        sent[1].metadata.message_id,
    ]
    assert out.failed == ["partition 2 (node 103): Node Unavailable"]
    assert out.missing == ["partition 3 (node 104)"]
    assert not out.skipped and out.faulty
    assert out.metrics() == {
        "nodes_sent": 4.0,
        "nodes_answered": 2.0,
        "nodes_failed": 1.0,
        "nodes_missing": 1.0,
        "round_skipped": 0.0,
    }


def test_a_round_with_fewer_answers_than_min_nodes_is_skipped():
    sent = [_sent(n) for n in (1, 2, 3)]
    out = sort_replies(1, sent, [_ok(sent[0])], 2, 30.0)
    assert out.skipped and out.metrics()["round_skipped"] == 1.0
    assert out.missing == ["node 2", "node 3"]  # no roster: named by node id
    assert out.report() == {"failed": [], "missing": ["node 2", "node 3"], "skipped": True}


def test_a_round_where_everyone_answered_is_not_faulty():
    sent = [_sent(n) for n in (1, 2)]
    out = sort_replies(1, sent, [_ok(m) for m in sent], 2, 30.0)
    assert not out.faulty and out.metrics()["nodes_answered"] == 2.0


@pytest.mark.parametrize("value", [0, -5, float("inf"), float("nan"), "soon", True, [3]])
def test_bad_round_timeout_is_refused_with_its_name(value):
    with pytest.raises(ValueError, match="strategy.round_timeout_s"):
        round_timeout_s({"round_timeout_s": value})


def test_round_timeout_default_and_value():
    assert round_timeout_s({}) == DEFAULT_ROUND_TIMEOUT_S
    assert round_timeout_s({"round_timeout_s": None}) == DEFAULT_ROUND_TIMEOUT_S
    assert round_timeout_s({"round_timeout_s": 45}) == 45.0


@pytest.mark.parametrize("value", [0, 4, -1, 2.5, "2", True])
def test_bad_min_nodes_is_refused_with_its_name(value):
    with pytest.raises(ValueError, match="strategy.min_nodes"):
        min_nodes_of({"min_nodes": value}, 3)


def test_min_nodes_reaches_flwr_sampling():
    assert min_nodes_of({"min_nodes": None}, 3) == 3
    cfg = {"name": "fedavg", "min_nodes": 2, "aggregation": "mean"}
    strategy = build_strategy("federated", cfg, 3)
    assert strategy.min_train_nodes == 2 and strategy.min_available_nodes == 2


@pytest.mark.parametrize(
    ("fraction", "min_nodes", "named"),
    [
        (0.1, None, "strategy.min_nodes=null (every node) asks for 105"),
        (0.1, 20, "strategy.min_nodes=20 asks for 20"),
        (0.5, None, "Set strategy.min_nodes=53"),
    ],
)
def test_a_fraction_that_min_nodes_overrides_is_refused(fraction, min_nodes, named):
    """flwr samples max(int(fraction · N), min_nodes): with the default min_nodes a
    fraction would silently train every node every round."""
    cfg = {"name": "fedavg", "fraction_train": fraction, "min_nodes": min_nodes}
    with pytest.raises(ValueError, match="strategy.fraction_train") as err:
        build_strategy("federated", cfg, 105)
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("fraction", "nodes", "min_nodes"),
    [(0.1, 105, 11), (0.01, 1000, 10), (7 / 30, 30, 7), (0.01, 50, 1)],
)
def test_a_fraction_with_a_min_nodes_it_can_meet_samples(fraction, nodes, min_nodes):
    cfg = {"name": "fedavg", "fraction_train": fraction, "min_nodes": min_nodes}
    strategy = build_strategy("federated", cfg, nodes)
    assert strategy.fraction_train == fraction and strategy.min_train_nodes == min_nodes
