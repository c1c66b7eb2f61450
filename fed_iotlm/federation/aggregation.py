"""Modality-aware FedAvg: each group is averaged only over the nodes that sent it.

For group g with holders H_g:  w_g = Σ_{i∈H_g} n_{i,g} · w_{i,g} / Σ_{i∈H_g} n_{i,g}.
This is a ratio of two sums, so secure aggregation can compute it when every node
submits n·w for the groups it holds and zeros elsewhere.  A group nobody sent keeps
its current value.  Accumulation is streaming (one running sum per key), so memory is
O(model), not O(nodes × model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .groups import group_of


class UpdateMismatchError(ValueError):
    """An update names an unknown key or has the wrong shape for it."""


@dataclass
class NodeUpdate:
    """What one node sent: arrays for the groups it trained and a count per group."""

    node: str
    arrays: Mapping[str, np.ndarray]
    counts: Mapping[str, float]


@dataclass
class GroupAggregate:
    """Result of one aggregation: the new state and, per group, which nodes held it
    (``selected``: the holders a selecting rule such as Krum kept, where one ran)."""

    state: dict[str, np.ndarray]
    holders: dict[str, list[str]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    selected: dict[str, list[str]] = field(default_factory=dict)


def aggregate_groups(
    current: Mapping[str, np.ndarray], updates: Iterable[NodeUpdate]
) -> GroupAggregate:
    """Count-weighted mean of each group over its holders; other groups stay as they were."""
    sums: dict[str, np.ndarray] = {}
    weight: dict[str, float] = {}
    holders: dict[str, list[str]] = {}
    for upd in updates:
        groups_sent = {group_of(k) for k in upd.arrays}
        for g in groups_sent:
            n = float(upd.counts.get(g, 0.0))
            if n <= 0:
                continue
            weight[g] = weight.get(g, 0.0) + n
            holders.setdefault(g, []).append(upd.node)
        for key, value in upd.arrays.items():
            if key not in current:
                raise UpdateMismatchError(f"node {upd.node}: unknown parameter {key!r}")
            if value.shape != current[key].shape:
                raise UpdateMismatchError(
                    f"node {upd.node}: {key!r} has shape {value.shape}, "
                    f"expected {current[key].shape}"
                )
            n = float(upd.counts.get(group_of(key), 0.0))
            if n <= 0:
                continue
            acc = sums.get(key)
            if acc is None:
                sums[key] = value.astype(np.float64) * n
            else:
                acc += value * n
    state: dict[str, np.ndarray] = {}
    for key, value in current.items():
        g = group_of(key)
        if key in sums:
            state[key] = (sums[key] / weight[g]).astype(value.dtype)
        else:
            state[key] = value
    return GroupAggregate(state, holders, weight)
