"""Byzantine-robust aggregation, per parameter group over exactly the nodes holding it.

The count-weighted mean (:func:`~fed_iotlm.federation.aggregation.aggregate_groups`)
lets one node move a group anywhere: a single scaled or sign-flipped update dominates
it.  The rules here bound that influence.  As in the modality-aware mean, each group
is aggregated only over the nodes that sent it (an encoder over the nodes holding its
modality), and a group nobody sent keeps its current value.  Robust rules are
*unweighted*: a sample count is the node's own claim, so weighting by it would hand an
attacker the influence the rule is meant to take away.

* ``median``: coordinate-wise median.
* ``trimmed_mean``: per coordinate, drop the ``int(trim_fraction · n)`` smallest and
  largest values and average the rest (flwr's own ``trim_mean``); with few holders
  this may trim nothing, e.g. 0.2 of 4 nodes.
* ``krum``: score each holder by the summed squared distance of its group vector to its
  ``n − f − 2`` nearest others (at least 1) and average the ``krum_select`` best
  (1 = Krum, more = multi-Krum), as in flwr's ``select_multikrum``, which needs whole
  ArrayRecords and so cannot score one group.

Unlike the streaming mean these stack the holders' arrays: memory O(holders × group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fed_iotlm.config_schema import section

from .aggregation import GroupAggregate, NodeUpdate, UpdateMismatchError, aggregate_groups
from .groups import group_of, keys_by_group

RULES = ("mean", "median", "trimmed_mean", "krum")


@dataclass(frozen=True)
class RobustConfig:
    """Which rule aggregates each group, with its parameters (``mean`` = count-weighted)."""

    rule: str = "mean"
    trim_fraction: float = 0.2
    krum_f: int = 1
    krum_select: int = 1

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"strategy.aggregation={self.rule!r}: choose one of {RULES}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(
                f"strategy.trim_fraction must be in [0, 0.5), got {self.trim_fraction}"
            )
        if self.krum_f < 0:
            raise ValueError(f"strategy.krum_f must be >= 0, got {self.krum_f}")
        if self.krum_select < 1:
            raise ValueError(f"strategy.krum_select must be >= 1, got {self.krum_select}")


def robust_config(strategy_cfg: Mapping) -> RobustConfig:
    """``strategy.aggregation`` and its parameters from the config tree (absent = the
    schema's: mean)."""
    s = section("strategy", strategy_cfg)
    return RobustConfig(
        rule=str(s["aggregation"]),
        trim_fraction=float(s["trim_fraction"]),
        krum_f=int(s["krum_f"]),
        krum_select=int(s["krum_select"]),
    )


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0 (the nodes) of a (nodes, ...) stack."""
    return np.median(stack, axis=0)


def trimmed_mean(stack: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Mean over axis 0 after dropping ``int(trim_fraction · n)`` values at each end."""
    return trim_mean(stack, trim_fraction)


def krum_scores(flat: np.ndarray, f: int) -> np.ndarray:
    """Krum score per row of ``flat`` (nodes, d): summed squared distance to its
    ``max(1, n − f − 2)`` nearest other rows (all pairwise distances from one Gram matrix)."""
    n = flat.shape[0]
    if n == 1:
        return np.zeros(1)
    centred = flat - flat.mean(axis=0)  # distances are shift-invariant; this keeps precision
    sq = np.einsum("ij,ij->i", centred, centred)
    dist = sq[:, None] + sq[None, :] - 2.0 * (centred @ centred.T)
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, np.inf)
    k = min(n - 1, max(1, n - f - 2))
    return np.sort(dist, axis=1)[:, :k].sum(axis=1)


def krum_choice(flat: np.ndarray, f: int, select: int) -> np.ndarray:
    """Row indices of the ``select`` lowest Krum scores (ties: the earlier row)."""
    return np.argsort(krum_scores(flat, f), kind="stable")[: min(select, flat.shape[0])]


def aggregate_robust(
    current: Mapping[str, np.ndarray], updates: Sequence[NodeUpdate], config: RobustConfig
) -> GroupAggregate:
    """Aggregate each group with ``config.rule`` over its holders (mean: count-weighted).

    ``holders`` lists the nodes that sent each group; ``selected`` (Krum) the ones whose
    values were averaged; ``weights`` the number of nodes used per group.
    """
    if config.rule == "mean":
        return aggregate_groups(current, updates)
    groups = keys_by_group(current)
    holders: dict[str, list[NodeUpdate]] = {}
    for upd in updates:
        _validate(upd, current, groups)
        for g in sorted({group_of(k) for k in upd.arrays}):
            if float(upd.counts.get(g, 0.0)) > 0:
                holders.setdefault(g, []).append(upd)
    state = dict(current)
    selected: dict[str, list[str]] = {}
    for g, nodes in holders.items():
        keys = groups[g]
        if config.rule == "krum":
            flat = np.stack(
                [
                    np.concatenate([u.arrays[k].astype(np.float64).ravel() for k in keys])
                    for u in nodes
                ]
            )
            chosen = krum_choice(flat, config.krum_f, config.krum_select)
            nodes = [nodes[i] for i in chosen]
            selected[g] = [u.node for u in nodes]
        for k in keys:
            stack = np.stack([u.arrays[k] for u in nodes]).astype(np.float64)
            if config.rule == "median":
                value = coordinate_median(stack)
            elif config.rule == "trimmed_mean":
                value = trimmed_mean(stack, config.trim_fraction)
            else:  # krum: plain mean of the selected
                value = stack.mean(axis=0)
            state[k] = value.astype(current[k].dtype)
    return GroupAggregate(
        state,
        holders={g: [u.node for u in nodes] for g, nodes in holders.items()},
        weights={g: float(len(selected.get(g, nodes))) for g, nodes in holders.items()},
        selected=selected,
    )


def _validate(
    upd: NodeUpdate, current: Mapping[str, np.ndarray], groups: Mapping[str, list[str]]
) -> None:
    """Robust rules stack whole groups: every key known, right shape, no key missing."""
    for key, value in upd.arrays.items():
        if key not in current:
            raise UpdateMismatchError(f"node {upd.node}: unknown parameter {key!r}")
        if value.shape != current[key].shape:
            raise UpdateMismatchError(
                f"node {upd.node}: {key!r} has shape {value.shape}, expected {current[key].shape}"
            )
    for g in {group_of(k) for k in upd.arrays}:
        missing = [k for k in groups[g] if k not in upd.arrays]
        if missing:
            raise UpdateMismatchError(f"node {upd.node}: group {g} lacks {missing[0]!r}")
