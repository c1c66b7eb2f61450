"""Federated evaluation: each node scores the model on its own test split.

In a simulation the server holds a copy of the configured dataset and can score every
round on its test split.  A deployed federation has no such copy: each site reads its
own data directory, and the dataset the server could build from its config (by default
synthetic) is not the sites' data.  Scoring on it would put a number in results.json
that says nothing about the federation.  So in the deployed case (``evaluation: auto``
with a site in the roll call, or ``evaluation: nodes``) every round's accuracy and loss
come from the nodes: each scores the round's model on its own test split with its own
modalities, and the server weights their figures by their test counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fed_iotlm.config_schema import setting

from .chunked import send_and_receive_chunked

log = logging.getLogger(__name__)

SERVER, NODES, AUTO = "server", "nodes", "auto"


def evaluation_mode(cfg: dict, deployed: bool) -> str:
    """``server`` (score on the server's copy of the test split) or ``nodes``."""
    mode = str(setting(cfg, "evaluation"))
    if mode not in (SERVER, NODES, AUTO):
        raise ValueError(f"evaluation={mode!r}: expected one of auto, server, nodes")
    if mode == AUTO:
        return NODES if deployed else SERVER
    if mode == SERVER and deployed:
        raise ValueError(
            "evaluation=server, but the nodes read their own data (deployed sites): the "
            "server's copy of the configured dataset is not theirs; use evaluation=nodes"
        )
    return mode


@dataclass
class NodeScores:
    """What the nodes answered: partition id -> that node's metrics."""

    by_partition: dict[int, dict[str, float]] = field(default_factory=dict)

    def accuracy_by_node(self) -> dict[str, float]:
        return self.metric_by_node("accuracy")

    def metric_by_node(self, key: str) -> dict[str, float]:
        """``key`` (accuracy, f1_macro, ...) per partition, where the node reported it."""
        return {str(p): m[key] for p, m in sorted(self.by_partition.items()) if key in m}

    def weighted_val(self) -> dict:
        """Validation accuracy over the nodes' validation shares (what choices use when
        the server holds no data), each node weighted by its validation count."""
        val = {
            p: {"accuracy": m["val_accuracy"], "loss": m.get("val_loss", float("nan")),
                "num-examples": m.get("val_examples", 1.0)}
            for p, m in self.by_partition.items()
            if "val_accuracy" in m
        }  # fmt: skip
        return NodeScores(val).weighted()

    def val_accuracy(self) -> float:
        """The round's validation accuracy: :meth:`weighted_val`'s, each node weighted by
        its validation count as results.json's ``val`` is (not by its test count, which
        would give the last round a figure other than the final report's); NaN where no
        node reports one."""
        if not any("val_accuracy" in m for m in self.by_partition.values()):
            return float("nan")
        return float(self.weighted_val()["accuracy"])

    def weighted_val_metric(self, key: str) -> float:
        """``key`` (``val_f1_macro``) over the nodes that report it, each weighted by its
        validation count (equally where a node reports none: SecAgg+ hides counts).  NaN
        when no node answered; an error when nodes answered and none reports ``key``
        (a site running an older ClientApp, or none holds a validation share): a choice
        that needs it cannot be made, and silently falling back would make another."""
        if not self.by_partition:
            return float("nan")
        having = {p: m for p, m in self.by_partition.items() if key in m}
        if not having:
            raise RuntimeError(
                f"select_round=best_val with evaluation=nodes: none of the "
                f"{len(self.by_partition)} node(s) that answered reports {key} (their "
                "ClientApp predates it, or no node holds a validation share); use "
                "select_round=last"
            )
        by_count = all("val_examples" in m for m in having.values())
        weights = {p: float(m["val_examples"]) if by_count else 1.0 for p, m in having.items()}
        total = sum(weights.values())
        if total <= 0:
            return float("nan")
        return sum(having[p][key] * w for p, w in weights.items()) / total

    def weighted(self) -> dict:
        """Accuracy and loss over every node's test samples: each node weighted by its
        test count, so the figures are those of the union of the nodes' test splits.
        Under SecAgg+ nodes report no count, and each node weighs the same."""
        by_count = all("num-examples" in m for m in self.by_partition.values())
        weights = {
            p: float(m["num-examples"]) if by_count else 1.0 for p, m in self.by_partition.items()
        }
        scored = {p: m for p, m in self.by_partition.items() if weights[p] > 0}
        if not scored:  # nobody answered: no figure rather than a made-up one
            log.warning("evaluate: no node answered with a scored test split")
            nan = float("nan")
            return {"accuracy": nan, "loss": nan, "accuracy_by_modality": {}, "by_task": {},
                    "weighting": "none", "nodes": 0}  # fmt: skip

        def mean(key: str) -> float:
            among = [p for p in scored if key in scored[p]]
            total = sum(weights[p] for p in among)
            return sum(scored[p][key] * weights[p] for p in among) / total

        prefix = "accuracy."  # the node's per-task accuracies (clients/app.py)
        tasks = sorted(
            {k[len(prefix) :] for m in scored.values() for k in m if k.startswith(prefix)}
        )
        out = {
            "accuracy": mean("accuracy"),
            "loss": mean("loss"),
            "accuracy_by_modality": {},  # a node scores with its own modalities only
            "by_task": {
                t: {"accuracy": mean(prefix + t), "accuracy_by_modality": {}} for t in tasks
            },
            "weighting": "test samples" if by_count else "nodes",
            "nodes": len(scored),
        }
        if by_count:
            out["num_examples"] = int(sum(weights[p] for p in scored))
        return out


def evaluate_on_nodes(
    grid: Grid, arrays: ArrayRecord, timeout: float = 3600.0, server_round: int = 0
) -> NodeScores:
    """Each node listed by ``grid`` scores ``arrays`` on its own test split (a chunk of
    nodes at a time: see :mod:`.chunked`); nodes that fail or stay silent are logged
    and left out."""
    config = ConfigRecord({"server-round": server_round})
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    replies = list(send_and_receive_chunked(grid, messages, timeout=timeout))
    if len(replies) < len(messages):
        log.warning(
            "evaluate: %s node(s) did not answer within %.0f s",
            len(messages) - len(replies),
            timeout,
        )
    scores = NodeScores()
    for reply in replies:
        if reply.has_error():
            log.warning(
                "evaluate: node %s failed: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
        scores.by_partition[int(metrics["partition-id"])] = metrics
    return scores
