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

from collections.abc import Iterable
from dataclasses import asdict
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from .aggregation import NodeUpdate
from .groups import group_of
from .privacy import CentralPrivacy, uniform_weights
from .records import (
    metrics_to_counts,
    numpy_to_record,
    record_nbytes,
    record_to_numpy,
    record_views,
)
from .robust import RobustConfig, aggregate_robust, robust_config
from .update_checks import CheckConfig, check_config, screen_updates


class ModalityAwareFedAvg(FedAvg):
    """FedAvg in which each parameter group is averaged only over the nodes that sent it.

    After every round ``round_holders[round]`` maps each group to the node ids that
    held it (the integration tests and the logs read it), ``round_stats[round]`` holds
    the screening/robustness metrics, ``rejections[round]`` the reasons, and ``comm``
    accumulates the payload bytes sent down and up.  ``robust``, ``checks`` and
    ``privacy`` are set after construction (flwr's FedProx/FedAdam constructors take no
    extra arguments); ``round_privacy[round]`` holds each DP release's sigma and q.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._current: dict[str, np.ndarray] | None = None
        self.robust = RobustConfig()
        self.checks = CheckConfig()
        self.round_holders: dict[int, dict[str, list[str]]] = {}
        self.round_selected: dict[int, dict[str, list[str]]] = {}
        self.round_stats: dict[int, dict[str, float]] = {}
        self.rejections: dict[int, list[str]] = {}
        self.comm = {"bytes_down": 0, "bytes_up": 0, "messages_down": 0, "messages_up": 0}
        self.privacy: CentralPrivacy | None = None
        self.round_privacy: dict[int, dict[str, float]] = {}
        self._sampled = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = record_to_numpy(arrays)
        if self.privacy is not None:  # the clipping norm (and local noise) for the nodes
            for key, value in self.privacy.train_config().items():
                config[key] = value
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled = len(messages)
        self.comm["bytes_down"] += record_nbytes(arrays) * len(messages)
        self.comm["messages_down"] += len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid or self._current is None:
            return None, None
        valid = in_partition_order(valid)
        updates = []
        for msg in valid:
            record = msg.content[self.arrayrecord_key]
            self.comm["bytes_up"] += record_nbytes(record)
            self.comm["messages_up"] += 1
            metrics = _metric_record(msg)
            updates.append(
                NodeUpdate(
                    node=str(int(metrics.get("partition-id", msg.metadata.src_node_id))),
                    arrays=record_views(record),  # read-only, no copy: O(model) extra
                    counts=metrics_to_counts(metrics),
                )
            )
        screened = screen_updates(self._current, updates, self.checks)
        self.rejections[server_round] = [r.reason for r in screened.rejected]
        for r in screened.rejected:
            log(WARNING, "aggregate_train: round %s: dropped %s", server_round, r.reason)
        stats = {**screened.metrics(), **budget_metrics(valid)}
        self.round_stats[server_round] = stats
        if not screened.accepted:
            log(WARNING, "aggregate_train: every update was rejected; the model stays as it was")
            self.round_holders[server_round] = {}
            return None, MetricRecord(stats)
        accepted_updates = screened.accepted
        if self.privacy is not None:  # DP: every holder weighs the same in its groups
            accepted_updates = uniform_weights(accepted_updates)
        result = aggregate_robust(self._current, accepted_updates, self.robust)
        if self.privacy is not None:
            result.state = self.privacy.release(server_round, result.state, result.holders)
            stats.update(self.privacy.account(server_round, self._sampled, self.round_privacy))
        self.round_holders[server_round] = result.holders
        if result.selected:
            self.round_selected[server_round] = result.selected
            stats["krum_excluded"] = float(
                sum(len(result.holders[g]) - len(sel) for g, sel in result.selected.items())
            )
        stale = sorted({group_of(k) for k in self._current} - set(result.holders))
        if stale:
            log(INFO, "aggregate_train: no holder this round for %s (kept as is)", stale)
        accepted = {id(u) for u in screened.accepted}
        metrics = self.train_metrics_aggr_fn(
            [m.content for m, u in zip(valid, updates, strict=True) if id(u) in accepted],
            self.weighted_by_key,
        )
        for key, value in stats.items():
            metrics[key] = value
        return numpy_to_record(result.state), metrics

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """Screening/robustness metrics of a round (empty before it was aggregated)."""
        return dict(self.round_stats.get(server_round, {}))

    def robustness_report(self) -> dict:
        """What results.json records about checks and robust aggregation."""
        out: dict = {
            "aggregation": asdict(self.robust),
            "checks": asdict(self.checks),
            "rejections_by_round": {str(r): v for r, v in self.rejections.items() if v},
        }
        if self.round_selected:
            out["selected_by_round"] = {str(r): v for r, v in self.round_selected.items()}
        return out


def _metric_record(msg: Message) -> MetricRecord:
    for record in msg.content.metric_records.values():
        return record
    return MetricRecord()


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
        if arrays is None or previous is None:
            return arrays, metrics
        held = set(self.round_holders.get(server_round, {}))
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
    value = cfg.get("min_nodes")
    if value is None:
        return num_nodes
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_nodes:
        raise ValueError(
            f"strategy.min_nodes must be null or an integer in 1..{num_nodes} "
            f"(the number of nodes), got {value!r}"
        )
    return value


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
    kwargs: dict = {
        "fraction_train": float(cfg.get("fraction_train", 1.0)),
        "fraction_evaluate": 0.0,  # nodes are evaluated once, after the last round
        "min_train_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    if name == "fedprox":
        kwargs["proximal_mu"] = float(cfg.get("proximal_mu", 0.01))
    if name == "fedadam":
        kwargs.update(
            eta=float(cfg.get("eta", 1e-2)),
            eta_l=float(cfg.get("eta_l", 1e-2)),
            beta_1=float(cfg.get("beta_1", 0.9)),
            beta_2=float(cfg.get("beta_2", 0.99)),
            tau=float(cfg.get("tau", 1e-3)),
        )
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
    steps, seen = [], []
    for msg in replies:
        metrics = _metric_record(msg)
        if "steps" in metrics:
            steps.append(float(metrics["steps"]))
            seen.append(float(metrics.get("examples", 0.0)))
    if not steps:
        return {}
    return {"steps_per_node": float(np.mean(steps)), "examples_per_node": float(np.mean(seen))}
