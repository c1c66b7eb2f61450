"""Screen and average packed updates in one pass: the server's mean-rule round.

Screening needs each update's difference to the current model (the NaN/Inf check and
the update norm); the mean needs each accepted update once more.  Reading a node's
update twice, once to screen it and again after every node was screened, reads 100
nodes' updates from memory twice.  Here each node is screened and, if accepted,
accumulated straight away from the difference screening just computed (still in cache):

    w_g = c_g + Σ_i n_{i,g} · (w_{i,g} − c_g) / Σ_i n_{i,g}

which is the count-weighted mean of :func:`~fed_iotlm.federation.aggregation.aggregate_groups`
(Σ n·c / Σ n = c), summed over small differences rather than whole weights.  Memory stays
O(model): one difference buffer per group, reused for every node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from .aggregation import GroupAggregate, axpy_in_place
from .packing import PackedUpdate
from .update_checks import CheckConfig, Screened, check_packed


def screen_and_mean(
    current: Mapping[str, np.ndarray],
    current_buffers: Mapping[str, np.ndarray],
    updates: Iterable[PackedUpdate],
    config: CheckConfig,
    weigh: Callable[[PackedUpdate], Mapping[str, float]] | None = None,
) -> tuple[Screened, GroupAggregate | None]:
    """The screen's verdicts and the count-weighted mean per group over the accepted
    updates (None if none was accepted); ``weigh`` gives the counts an accepted update
    weighs with (default: its own, ``update.counts``; DP: 1 per group it sent)."""
    out = Screened()
    diffs: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    weight: dict[str, float] = {}
    holders: dict[str, list[str]] = {}
    layout = None
    for upd in updates:
        rejection, norm = check_packed(upd, current_buffers, config, diffs)
        if norm is not None:
            out.norms[upd.node] = norm
        if rejection is not None:
            out.rejected.append(rejection)
            continue
        out.accepted.append(upd)
        layout = upd.layout
        counts = upd.counts if weigh is None else weigh(upd)
        for g in upd.buffers:
            n = float(counts.get(g, 0.0))
            if n <= 0:
                continue
            diff = diffs[g]  # this node's w − c, left by check_packed
            acc = sums.get(g)
            if acc is None:
                sums[g] = np.multiply(diff, n, dtype=_acc_dtype(diff))
            elif acc.dtype == diff.dtype == np.float32:
                axpy_in_place(acc, diff, n)
            else:  # float64 differences (other dtypes, or float32 values beyond its range)
                acc += (diff * n).astype(acc.dtype, copy=False)
            weight[g] = weight.get(g, 0.0) + n
            holders.setdefault(g, []).append(upd.node)
    if not out.accepted:
        return out, None
    state = dict(current)
    for g, acc in sums.items():
        group = layout.groups[g]
        np.divide(acc, weight[g], out=acc)
        mean = np.add(current_buffers[g], acc, dtype=acc.dtype).astype(group.dtype, copy=False)
        state.update(group.unpack(mean))
    return out, GroupAggregate(state, holders, weight)


def _acc_dtype(diff: np.ndarray) -> type:
    return np.float32 if diff.dtype == np.float32 else np.float64
