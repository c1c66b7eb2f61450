"""Who answered a round, who failed, who missed the deadline, and whether it counts.

A deployed round sends one message per sampled node and waits at most
``strategy.round_timeout_s`` for the replies (``Grid.send_and_receive``).  A node can
then (a) answer, (b) answer with an error (its ClientApp raised, or the SuperLink
answers for it with ``NODE_UNAVAILABLE`` once it has missed its heartbeats), or
(c) not answer before the deadline (it hangs, or died and the SuperLink does not know
yet).  Only (a) is aggregated, and only when at least ``strategy.min_nodes`` nodes
answered: an average over fewer nodes than the operator asked for would move the
model on too little evidence, so such a round is *skipped* (the model stays as it
was) and the run goes on; :class:`RoundOutcome` says which happened and why, for the
log, results.json and MLflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message

from fed_iotlm.config_schema import StrategyConfig
from fed_iotlm.federation.round_record import Participation

log = logging.getLogger(__name__)

DEFAULT_ROUND_TIMEOUT_S = float(StrategyConfig.round_timeout_s)  # the schema's


def round_timeout_s(strategy_cfg: Mapping) -> float:
    """``strategy.round_timeout_s``, checked: a positive, finite number of seconds
    (absent or null in a caller's partial block: the schema's default)."""
    value = strategy_cfg.get("round_timeout_s")
    if value is None:
        return DEFAULT_ROUND_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"strategy.round_timeout_s must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"strategy.round_timeout_s must be > 0 and finite, got {value!r}")
    return float(value)


@dataclass
class RoundOutcome:
    """One round's replies, sorted into answered / failed / missing.

    ``failed`` and ``missing`` name each node by its partition id where the roster
    knows it (``p2 (node 123…)``), because that is what the operator started the
    SuperNode with."""

    sent: int
    answered: list[Message] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "<who>: <reason>"
    missing: list[str] = field(default_factory=list)  # "<who>"
    skipped: bool = False

    @property
    def faulty(self) -> bool:
        return self.summary().faulty

    def metrics(self) -> dict[str, float]:
        """Per-round numbers for results.json's history and MLflow."""
        return self.summary().metrics()

    def report(self) -> dict:
        """The reasons, for results.json's ``faults_by_round``."""
        return self.summary().report()

    def summary(self) -> Participation:
        """The frozen part the round's record keeps (counts and reasons, no messages)."""
        return Participation(
            self.sent, len(self.answered), tuple(self.failed), tuple(self.missing), self.skipped
        )


def sort_replies(
    rnd: int,
    sent: list[Message],
    replies: Iterable[Message],
    min_nodes: int,
    timeout_s: float,
    partition_of: Mapping[int, int] | None = None,
) -> RoundOutcome:
    """Sort a round's ``replies`` to the ``sent`` messages and log every fault.

    ``partition_of`` maps Flower node ids to partition ids (the roster) for the log.
    """
    names = partition_of or {}

    def who(node_id: int) -> str:
        pid = names.get(node_id)
        return f"partition {pid} (node {node_id})" if pid is not None else f"node {node_id}"

    outcome = RoundOutcome(sent=len(sent))
    replied_to = set()
    by_id = {m.metadata.message_id: m for m in sent}
    for reply in replies:
        replied_to.add(reply.metadata.reply_to_message_id)
        if reply.has_error():
            original = by_id.get(reply.metadata.reply_to_message_id)
            node = original.metadata.dst_node_id if original else reply.metadata.src_node_id
            outcome.failed.append(f"{who(node)}: {reply.error.reason}")
        else:
            outcome.answered.append(reply)
    outcome.missing = [
        who(m.metadata.dst_node_id) for m in sent if m.metadata.message_id not in replied_to
    ]
    for failure in outcome.failed:
        log.warning("round %s: dropped the reply of %s", rnd, failure)
    for node in outcome.missing:
        log.warning("round %s: %s did not answer within %.0f s", rnd, node, timeout_s)
    if len(outcome.answered) < min_nodes:
        outcome.skipped = True
        log.warning("round %s skipped: %s of %s node(s) answered, strategy.min_nodes=%s; "
            "the model stays as it was",
            rnd, len(outcome.answered), len(sent), min_nodes,
        )  # fmt: skip
    return outcome
