"""The statistics round and the Grid that carries its result to every node.

One ``query.stats`` message per node (a chunk at a time, :mod:`.chunked`); the replies'
per-channel sums are added up (:class:`~fed_iotlm.data.preprocess.ChannelSums`), which
is all a secure aggregate would reveal too.  With ``secagg.enabled``
:func:`secure_statistics_round` computes the same totals as one SecAgg+ sum instead, so
no node's sums reach the server.  :class:`StatisticsGrid` then attaches the
pooled mean/std to every message the server sends afterwards (train, evaluate, MMBind
phases, roll calls of rejoining sites), so a node never needs to remember them: a site
that restarts gets them with its next message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fed_iotlm.data.preprocess import ChannelSums
from fed_iotlm.federation.class_balance import (
    ASK_COUNTS,
    COUNTS_KEY,
    WEIGHTS_KEY,
    counts_from_record,
)
from fed_iotlm.federation.normalization import NORM_KEY, STATS_MESSAGE, sums_from_record
from fed_iotlm.federation.secure import SecureSettings
from fed_iotlm.federation.secure_statistics import (
    KEY_MODALITIES,
    KEY_TASKS,
    STATS_PHASE,
    SecureStatistics,
    StatsLayout,
)
from fed_iotlm.models.class_weights import add_counts

from .chunked import send_and_receive_chunked
from .roster import LiveNodesGrid

log = logging.getLogger(__name__)

# how long the (plain) statistics round waits: as long as the roll call before it
# (server/rounds.py identify_nodes), since it too needs every node, cold starts included
STATISTICS_TIMEOUT_S = 900.0


def statistics_round(grid: Grid, node_ids: Iterable[int], timeout: float) -> ChannelSums:
    """Σ over nodes of their training data's per-channel sums; every node must answer
    (statistics from some sites only would standardise the others' data wrongly)."""
    return gather_statistics(grid, node_ids, timeout)[0]


def gather_statistics(
    grid: Grid, node_ids: Iterable[int], timeout: float, class_counts: bool = False
) -> tuple[ChannelSums, dict[str, np.ndarray] | None]:
    """:func:`statistics_round`, and with ``class_counts`` (``train.class_weighting=
    balanced``) also Σ over nodes of their per-task class counts (the global counts,
    :mod:`fed_iotlm.federation.class_balance`); None without."""
    ids = list(node_ids)
    config = ConfigRecord({ASK_COUNTS: True} if class_counts else {})
    messages = [
        Message(
            RecordDict({"config": config}),
            message_type=STATS_MESSAGE,
            dst_node_id=node_id,
        )
        for node_id in ids
    ]
    replies = send_and_receive_chunked(grid, messages, timeout=timeout)
    failed = [r.metadata.src_node_id for r in replies if r.has_error()]
    if failed or len(replies) < len(ids):
        raise RuntimeError(
            f"statistics round: {len(ids) - len(replies)} node(s) did not answer and "
            f"{len(failed)} failed ({failed}); the pooled input statistics need every node"
        )
    total = ChannelSums({}, {}, {})
    counts: dict[str, np.ndarray] | None = {} if class_counts else None
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):  # a fixed float order
        total = total + sums_from_record(reply.content.array_records["stats"])
        if counts is not None:
            if COUNTS_KEY not in reply.content.array_records:
                raise RuntimeError(
                    f"statistics round: node {reply.metadata.src_node_id} sent no class "
                    "counts though train.class_weighting=balanced asked for them"
                )
            counts = add_counts(counts, counts_from_record(reply.content.array_records[COUNTS_KEY]))
    log.info("statistics round: %s nodes, modalities %s", len(replies), sorted(total.count))
    return total, counts


def secure_statistics_round(
    grid: Grid, layout: StatsLayout, settings: SecureSettings, num_nodes: int
) -> SecureStatistics:
    """The statistics round under SecAgg+ (:mod:`fed_iotlm.federation.secure_statistics`):
    a census of holders per modality, then one masked sum of every node's fixed-length
    statistics vector.  Every node must be summed, as in the plain round."""
    from .secure_rounds import SecureRounds  # the SecAgg+ machinery of the train rounds

    every_node = {"fraction_train": 1.0, "min_nodes": num_nodes}
    rounds = SecureRounds(grid, settings, every_node, num_nodes, phase=STATS_PHASE)
    modalities = ",".join(layout.modalities)
    census = rounds.secure_sum(0, [], {"phase": "census", "census-of": STATS_PHASE,
                                        KEY_MODALITIES: modalities})  # fmt: skip
    _check_everyone(rounds, num_nodes, "census")
    holders = layout.holders(census)
    minimum = int(settings.min_holders)
    release = [m for m in layout.modalities if holders[m] >= minimum]
    config = {"phase": STATS_PHASE, KEY_MODALITIES: modalities, "release": ",".join(release)}
    if layout.tasks:  # train.class_weighting=balanced: the class counts in the same sum
        config[KEY_TASKS] = layout.tasks_text()
    sums = rounds.secure_sum(0, layout.templates(), config)
    _check_everyone(rounds, num_nodes, "sum")
    found = layout.decode(sums, settings)
    below = [m for m in layout.modalities if 0 < holders[m] < minimum]  # never submitted
    found = replace(found, withheld=sorted({*below, *found.withheld}))
    for m in found.withheld:
        log.warning("statistics round: %s held by %s node(s), fewer than secagg.min_holders=%s: its "
            "statistics are not released (its data stays on its raw scale)",
            m, holders[m], minimum,
        )  # fmt: skip
    log.info("statistics round under SecAgg+: %s nodes, released %s", num_nodes,
        sorted(found.scaler.mean))  # fmt: skip
    return found


def _check_everyone(rounds, num_nodes: int, what: str) -> None:
    if rounds.collector.nodes != num_nodes:
        raise RuntimeError(
            f"secure statistics round ({what}): {rounds.collector.nodes} of {num_nodes} nodes "
            "were summed; the pooled input statistics need every node"
        )


class StatisticsGrid(LiveNodesGrid):
    """A Grid that adds the pooled statistics (``norm``) to every message it sends, and
    the class weights (``class_weights``) where ``train.class_weighting=balanced``."""

    def __init__(self, inner: Grid, norm: ArrayRecord, weights: ArrayRecord | None = None) -> None:
        super().__init__(inner, [])
        self.norm = norm
        self.weights = weights

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def _stamp(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for msg in out:
            if NORM_KEY not in msg.content.array_records:
                msg.content[NORM_KEY] = self.norm
            if self.weights is not None and WEIGHTS_KEY not in msg.content.array_records:
                msg.content[WEIGHTS_KEY] = self.weights
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._stamp(messages))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(self._stamp(messages), timeout=timeout)
