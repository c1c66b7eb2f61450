"""Flower strategies with modality-aware aggregation.

``ModalityAwareFedAvg`` replaces FedAvg's all-keys average with the per-group average
of :mod:`fed_iotlm.federation.aggregation`.  Because flwr's FedOpt family (FedAdam,
FedYogi, ...) and FedProx call ``super().aggregate_train`` for the average, putting
this class *between* them and FedAvg in the MRO gives modality-aware versions of all of
them without rewriting their server optimisers.

Before aggregating, every update is screened against the current state
(:mod:`~fed_iotlm.federation.update_checks`): bad ones are dropped with a logged reason
and counted in the round's metrics.  The accepted ones are aggregated per group with
the configured rule (:mod:`~fed_iotlm.federation.robust`; ``mean`` by default).
With ``dp.enabled`` (:mod:`~fed_iotlm.federation.privacy`, set as ``privacy``) the
groups are averaged with equal weights and released with Gaussian noise per group.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fed_iotlm.config_schema import section

from .aggregation import NodeUpdate
from .groups import group_of
from .packing import PackedUpdate, PackingError, layout_of
from .privacy import CentralPrivacy, uniform_weights
from .records import (
    decode_update,
    metrics_to_counts,
    numpy_to_record,
    record_nbytes,
    record_to_numpy,
)
from .robust import RobustConfig, aggregate_robust, robust_config
from .round_record import AggregateFacts, FactsMetricRecord, facts_of
from .streaming_mean import screen_and_mean
from .update_checks import CheckConfig, check_config, screen_updates

logger = logging.getLogger(__name__)


class ModalityAwareFedAvg(FedAvg):
    """FedAvg in which each parameter group is averaged only over the nodes that sent it.

    It keeps no per-round bookkeeping: ``aggregate_train`` returns what it learnt about
    the round (holders per group, screening and robust stats, rejections, Krum's
    selections, whether a DP average was released, bytes read) as the
    :class:`~fed_iotlm.federation.round_record.AggregateFacts` riding on its metrics,
    and the round engine (:mod:`server.engine`) puts them into the round's record.
    ``_current`` is the configure-to-aggregate handoff of the round in progress (as
    flwr's FedAdam keeps ``current_arrays``).  ``robust``, ``checks`` and ``privacy``
    (configuration, no state) are set after construction: flwr's FedProx/FedAdam
    constructors take no extra arguments.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", weighted_mean_metrics)
        super().__init__(**kwargs)
        self._current: dict[str, np.ndarray] | None = None
        self.robust = RobustConfig()
        self.checks = CheckConfig()
        self.privacy: CentralPrivacy | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = record_to_numpy(arrays)
        if self.privacy is not None:  # the clipping norm (and local noise) for the nodes
            for key, value in self.privacy.train_config().items():
                config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's modality-aware aggregate, and its train metrics carrying the
        round's :class:`AggregateFacts` (``facts_of(metrics)``)."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid or self._current is None:
            return None, None
        valid, valid_metrics = _in_partition_order_with_metrics(valid)
        try:
            layout = layout_of(self._current)  # cached: computed once per model
        except PackingError:  # a group mixing dtypes: per-key updates, per-key checks
            layout = None
        current_buffers = None if layout is None else layout.pack(self._current)  # per round
        updates = []
        bytes_up = 0
        for msg, metrics in zip(valid, valid_metrics, strict=True):
            record = msg.content[self.arrayrecord_key]
            # one flat, read-only buffer per group, no copy (nodes send packed groups)
            node = str(int(metrics.get("partition-id", msg.metadata.src_node_id)))
            counts = metrics_to_counts(metrics)
            if layout is None:
                bytes_up += record_nbytes(record)
                updates.append(NodeUpdate(node, record_to_numpy(record), counts))
            else:
                updates.append(update := decode_update(node, record, counts, layout))
                bytes_up += update.nbytes
        result = None
        if self.robust.rule == "mean" and layout is not None:
            # screen each node and accumulate it at once, from the difference screening
            # computed: each update is read once (streaming_mean)
            weigh = _uniform_counts if self.privacy is not None else None
            screened, result = screen_and_mean(
                self._current, current_buffers, updates, self.checks, weigh
            )
        else:
            screened = screen_updates(self._current, updates, self.checks, current_buffers)
        rejections = tuple(r.reason for r in screened.rejected)
        for reason in rejections:
            logger.warning("aggregate_train: round %s: dropped %s", server_round, reason)
        stats = {**screened.metrics(), **budget_of(valid_metrics)}
        if not screened.accepted:
            logger.warning("aggregate_train: every update was rejected; the model stays as it was")
            facts = AggregateFacts({}, stats, rejections, bytes_up=bytes_up, messages_up=len(valid))
            return None, FactsMetricRecord(stats, facts)
        if result is None:  # robust rules stack each group's holders (per-key views)
            accepted_updates = screened.accepted
            if self.privacy is not None:  # DP: every holder weighs the same in its groups
                accepted_updates = uniform_weights(accepted_updates)
            result = aggregate_robust(self._current, accepted_updates, self.robust)
        if self.privacy is not None:  # the engine accounts for the release (its records)
            result.state = self.privacy.release(server_round, result.state, result.holders)
        if result.selected:
            stats["krum_excluded"] = float(
                sum(len(result.holders[g]) - len(sel) for g, sel in result.selected.items())
            )
        stale = sorted({group_of(k) for k in self._current} - set(result.holders))
        if stale:
            logger.info("aggregate_train: no holder this round for %s (kept as is)", stale)
        accepted = {id(u) for u in screened.accepted}
        metrics = self.train_metrics_aggr_fn(
            [m.content for m, u in zip(valid, updates, strict=True) if id(u) in accepted],
            self.weighted_by_key,
        )
        facts = AggregateFacts(
            holders=result.holders,
            stats=stats,
            rejections=rejections,
            selected=dict(result.selected or {}),
            released=self.privacy is not None,
            bytes_up=bytes_up,
            messages_up=len(valid),
        )
        return numpy_to_record(result.state), FactsMetricRecord({**metrics, **stats}, facts)


def _uniform_counts(update: PackedUpdate) -> dict[str, float]:
    """DP's weights: 1 for every group the node sent with a positive count."""
    return uniform_weights([update])[0].counts


def _metric_record(msg: Message) -> MetricRecord:
    # RecordDict.metric_records builds a new typed dict per call; iterate the values
    for record in msg.content.values():
        if isinstance(record, MetricRecord):
            return record
    return MetricRecord()


def weighted_mean_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """flwr's ``aggregate_metricrecords`` (the mean of every train metric weighted by
    ``weighting_metric_name``, which is left out; list metrics element-wise), summed in
    plain dicts and typed once: Flower's version type-checks every partial sum through
    ``MetricRecord.__setitem__``, which was a third of the server's per-reply time."""
    metrics = [[r for r in content.values() if isinstance(r, MetricRecord)] for content in records]
    weights = [float(found[0][weighting_metric_name]) for found in metrics]
    total = sum(weights)
    sums: dict[str, float | list[float]] = {}
    for found, w in zip(metrics, weights, strict=True):
        factor = w / total
        for record in found:
            for key, value in record.items():
                if key == weighting_metric_name:
                    continue
                if isinstance(value, list):
                    prev = sums.get(key)
                    scaled = [v * factor for v in value]
                    sums[key] = (
                        scaled
                        if prev is None
                        else [a + b for a, b in zip(prev, scaled, strict=True)]
                    )
                else:
                    sums[key] = sums.get(key, 0.0) + value * factor
    return MetricRecord(sums)


def in_partition_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by the sender's partition id (then node id), not by arrival.

    Replies arrive in whatever order the nodes finish, and float sums depend on the
    order of their terms; aggregating in a fixed order makes a round's result a
    function of the updates alone, so a resumed run ends bit-identical to an
    uninterrupted one."""

    def key(msg: Message) -> tuple[float, int]:
        metrics = _metric_record(msg) if msg.has_content() else MetricRecord()
        return (float(metrics.get("partition-id", float("inf"))), msg.metadata.src_node_id)

    return sorted(replies, key=key)


def _in_partition_order_with_metrics(
    replies: Iterable[Message],
) -> tuple[list[Message], list[MetricRecord]]:
    """:func:`in_partition_order`, and each reply's metrics in the same order (found
    once per reply: the strategy reads them three times a round)."""
    pairs = [(msg, _metric_record(msg) if msg.has_content() else MetricRecord()) for msg in replies]
    pairs.sort(
        key=lambda p: (float(p[1].get("partition-id", float("inf"))), p[0].metadata.src_node_id)
    )
    return [msg for msg, _ in pairs], [metrics for _, metrics in pairs]


class _InPartitionOrder:
    """flwr's own strategies (``method=fedavg``), aggregating in partition order."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_train(server_round, in_partition_order(replies))


class OrderedFedAvg(_InPartitionOrder, FedAvg):
    """flwr's FedAvg, replies aggregated in partition order."""


class OrderedFedProx(_InPartitionOrder, FedProx):
    """flwr's FedProx, replies aggregated in partition order."""


class OrderedFedAdam(_InPartitionOrder, FedAdam):
    """flwr's FedAdam, replies aggregated in partition order."""


class ModalityAwareFedProx(FedProx, ModalityAwareFedAvg):
    """FedProx (clients add (mu/2)·||w - w_global||²) with modality-aware averaging."""


class ModalityAwareFedAdam(FedAdam, ModalityAwareFedAvg):
    """FedAdam on the modality-aware average.

    Adam's momentum would keep moving a group nobody sent this round; such groups are
    reset to their previous value so that "a group nobody sent stays as it was" holds
    for every server optimiser.  flwr's update multiplies by numpy float64 scalars,
    which under numpy 2 promotes float32 parameters to float64; the result is cast
    back, or the dtype screen would reject every node's float32 update from round 2 on.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        previous = self._current
        arrays, metrics = super().aggregate_train(server_round, replies)
        facts = facts_of(metrics)
        if arrays is None or previous is None or facts is None:
            return arrays, metrics
        held = set(facts.holders)
        state = record_to_numpy(arrays)
        for key, value in previous.items():
            if group_of(key) not in held:
                state[key] = value
            elif state[key].dtype != value.dtype:
                state[key] = state[key].astype(value.dtype)
        return numpy_to_record(state), metrics


STRATEGIES: dict[str, dict[str, type[FedAvg]]] = {
    # method "federated": ours, modality-aware; method "fedavg": flwr's own, all keys
    "federated": {
        "fedavg": ModalityAwareFedAvg,
        "fedprox": ModalityAwareFedProx,
        "fedadam": ModalityAwareFedAdam,
    },
    "fedavg": {"fedavg": OrderedFedAvg, "fedprox": OrderedFedProx, "fedadam": OrderedFedAdam},
}


def min_nodes_of(cfg: dict, num_nodes: int) -> int:
    """``strategy.min_nodes`` (null: every node), checked against the federation's size:
    more than ``num_nodes`` could never be met, and flwr's sampling would wait forever."""
    # the raw value, not the schema-converted one: OmegaConf would accept "2" (absent:
    # null, the schema's default)
    value = cfg.get("min_nodes")
    if value is None:
        return num_nodes
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_nodes:
        raise ValueError(
            f"strategy.min_nodes must be null or an integer in 1..{num_nodes} "
            f"(the number of nodes), got {value!r}"
        )
    return value


def check_sampling(fraction: float, min_nodes: int, num_nodes: int, given: object) -> None:
    """Refuse a ``strategy.fraction_train`` that ``strategy.min_nodes`` overrides: flwr
    samples ``max(int(fraction · N), min_nodes)`` nodes a round, so with the default
    ``min_nodes`` (null: every node) ``fraction_train=0.1`` would silently train every
    node every round."""
    # the share's own count, rounded up (int() of m/N · N may land on m − 1), at least 1
    sampled = max(math.ceil(fraction * num_nodes - 1e-9), 1)
    if fraction < 1.0 and min_nodes > sampled:
        said = "null (every node)" if given is None else repr(given)
        raise ValueError(
            f"strategy.fraction_train={fraction:g} samples {sampled} of {num_nodes} nodes a "
            f"round, but strategy.min_nodes={said} asks for {min_nodes}, and the larger wins: "
            f"every round would train {min_nodes} nodes. Set strategy.min_nodes={sampled} "
            "(or lower) to sample, or strategy.fraction_train=1"
        )


def build_strategy(method: str, cfg: dict, num_nodes: int) -> FedAvg:
    """Instantiate the configured server optimiser for ``method`` from ``cfg['strategy']``."""
    name = cfg["name"]
    try:
        cls = STRATEGIES[method][name]
    except KeyError as err:
        raise ValueError(
            f"strategy.name={name!r} with method={method!r} is not available; "
            f"choose one of {sorted(STRATEGIES.get(method, {}))}"
        ) from err
    min_nodes = min_nodes_of(cfg, num_nodes)
    cfg = section("strategy", cfg)  # the schema's defaults for what a caller left out
    check_sampling(float(cfg["fraction_train"]), min_nodes, num_nodes, cfg.get("min_nodes"))
    kwargs: dict = {
        "fraction_train": float(cfg["fraction_train"]),
        "fraction_evaluate": 0.0,  # nodes are evaluated once, after the last round
        "min_train_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    if name == "fedprox":
        kwargs["proximal_mu"] = float(cfg["proximal_mu"])
    if name == "fedadam":
        kwargs.update({k: float(cfg[k]) for k in ("eta", "eta_l", "beta_1", "beta_2", "tau")})
    robust, checks = robust_config(cfg), check_config(cfg)
    strategy = cls(**kwargs)
    if isinstance(strategy, ModalityAwareFedAvg):
        strategy.robust, strategy.checks = robust, checks
    elif robust.rule != "mean" or checks.max_update_norm is not None:
        raise ValueError(
            f"strategy.aggregation={robust.rule!r} / strategy.checks run in the modality-aware "
            "strategies (method=federated, harmony or mmbind), not in method=fedavg, "
            "flwr's plain FedAvg baseline"
        )
    return strategy


def budget_metrics(replies: list[Message]) -> dict[str, float]:
    """Mean optimiser steps and examples per answering node this round (what the nodes
    report), so results.json shows each method's training budget."""
    return budget_of(_metric_record(msg) for msg in replies)


def budget_of(node_metrics: Iterable[MetricRecord]) -> dict[str, float]:
    """:func:`budget_metrics` from the replies' metric records."""
    steps, seen = [], []
    for metrics in node_metrics:
        if "steps" in metrics:
            steps.append(float(metrics["steps"]))
            seen.append(float(metrics.get("examples", 0.0)))
    if not steps:
        return {}
    return {"steps_per_node": float(np.mean(steps)), "examples_per_node": float(np.mean(seen))}
