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

The usual node (finite counts, no structural problem, float32 groups, finite values) is
screened by :func:`_squares_of_clean`, three numpy calls per group and nothing else;
anything else goes through :func:`~fed_iotlm.federation.update_checks.check_packed`,
which finds and names the problem.  Both compute the same differences and norms, so
the verdicts and the mean do not depend on which path a node took.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from .aggregation import GroupAggregate, axpy_in_place
from .packing import PackedUpdate
from .update_checks import CheckConfig, Screened, check_packed, norm_verdict


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
    # one float32 difference buffer per float32 group of the server's model, reused
    clean = {
        g: np.empty(ref.size, np.float32)
        for g, ref in current_buffers.items()
        if ref.dtype == np.float32
    }
    sums: dict[str, np.ndarray] = {}
    weight: dict[str, float] = {}
    holders: dict[str, list[str]] = {}
    layout = None
    for upd in updates:
        squares = _squares_of_clean(upd, current_buffers, clean)
        if squares is not None:
            rejection, norm = norm_verdict(upd.node, squares, config)
            diffs: dict[str, np.ndarray] = clean
        else:  # something to name (or float32 values too far apart): the full screen
            diffs = {}
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
            diff = diffs[g]  # this node's w − c
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


def _squares_of_clean(
    update: PackedUpdate,
    current_buffers: Mapping[str, np.ndarray],
    diffs: dict[str, np.ndarray],
) -> float | None:
    """``||update − current||²`` of an update with nothing to report (counts finite and
    >= 0, no structural problem, every group float32 with finite differences), leaving
    its ``w − c`` per group in ``diffs``; None for any other update.  The arithmetic is
    :func:`~fed_iotlm.federation.update_checks.check_packed`'s (one subtraction and one
    dot per group, summed in Python floats), so the norm is the same to the bit."""
    if update.problem is not None:
        return None
    for n in update.counts.values():
        if not (n >= 0 and math.isfinite(n)):
            return None
    squares = 0.0
    for g, flat in update.buffers.items():
        diff = diffs.get(g)
        if diff is None or flat.dtype != np.float32:
            return None
        np.subtract(flat, current_buffers[g], out=diff)
        squares += float(np.dot(diff, diff))
    # a NaN/Inf value (or float32 values too far apart) makes the sum non-finite
    return squares if math.isfinite(squares) else None


def _acc_dtype(diff: np.ndarray) -> type:
    return np.float32 if diff.dtype == np.float32 else np.float64
