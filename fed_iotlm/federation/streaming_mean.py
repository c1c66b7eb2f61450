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
    # float32 groups: each node's difference is written into its group's batch, whose
    # accepted rows are summed by one matrix-vector product when it fills
    batches = {
        g: _GroupBatch(ref.size) for g, ref in current_buffers.items() if ref.dtype == np.float32
    }
    others = _Sums()  # anything else (other dtypes, float64 differences): term by term
    weight: dict[str, float] = {}
    holders: dict[str, list[str]] = {}
    layout = None
    for upd in updates:
        squares = _squares_of_clean(upd, current_buffers, batches)
        if squares is not None:
            rejection, norm = norm_verdict(upd.node, squares, config)
            diffs = None  # in the batches' next rows
        else:  # something to name (or float32 values too far apart): the full screen
            diffs = {}
            rejection, norm = check_packed(upd, current_buffers, config, diffs)
        if norm is not None:
            out.norms[upd.node] = norm
        if rejection is not None:
            out.rejected.append(rejection)
            continue  # its rows are overwritten by the next node
        out.accepted.append(upd)
        layout = upd.layout
        counts = upd.counts if weigh is None else weigh(upd)
        for g in upd.buffers:
            n = float(counts.get(g, 0.0))
            if n <= 0:
                continue
            if diffs is None:
                batches[g].keep(n)
            else:
                diff, batch = diffs[g], batches.get(g)
                if batch is not None and diff.dtype == np.float32:
                    np.copyto(batch.next_row(), diff)
                    batch.keep(n)
                else:
                    others.add(g, diff, n)
            weight[g] = weight.get(g, 0.0) + n
            holders.setdefault(g, []).append(upd.node)
    if not out.accepted:
        return out, None
    state = dict(current)
    for g in weight:
        batch = batches.get(g)
        acc = others.combined(g, None if batch is None else batch.total())
        group = layout.groups[g]
        np.divide(acc, weight[g], out=acc)
        mean = np.add(current_buffers[g], acc, dtype=acc.dtype).astype(group.dtype, copy=False)
        state.update(group.unpack(mean))
    return out, GroupAggregate(state, holders, weight)


# a group's batch holds at most this many rows and this many values in all: 8 rows of
# the default model's largest group (54 k values) are 1.7 MB; a group of more than
# half a million values is summed node by node (saxpy), where batching gains nothing
BATCH_ROWS = 8
BATCH_VALUES = 1 << 19


class _GroupBatch:
    """Accepted nodes' float32 differences of one group, summed in batches.

    Adding each node's weighted difference with its own ``saxpy`` reads and writes the
    running sum once per node; a batch of ``k`` rows is summed by one ``weights @ rows``
    (BLAS ``sgemv``): the rows are read once, the sum written once per batch.  A row is
    written by the screen (the node's ``w − c``) and kept only if the node is accepted
    and weighs > 0 in this group; otherwise the next node overwrites it."""

    __slots__ = ("acc", "partial", "row_views", "rows", "used", "weights")

    def __init__(self, size: int) -> None:
        k = max(1, min(BATCH_ROWS, BATCH_VALUES // max(size, 1)))
        self.rows = np.empty((k, size), np.float32)
        self.row_views = list(self.rows)  # made once: a view costs as much as a subtraction call
        self.weights = np.zeros(k, np.float32)
        self.partial = np.empty(size, np.float32) if k > 1 else None
        self.used = 0
        self.acc: np.ndarray | None = None

    def next_row(self) -> np.ndarray:
        return self.row_views[self.used]

    def keep(self, n: float) -> None:
        """The row last written is an accepted node's, weighing ``n``."""
        if self.partial is None:  # one row: add it now, as the per-node path did
            row = self.row_views[0]
            if self.acc is None:
                self.acc = np.multiply(row, n, dtype=np.float32)
            else:
                axpy_in_place(self.acc, row, n)
            return
        self.weights[self.used] = n
        self.used += 1
        if self.used == len(self.weights):
            self._flush()

    def _flush(self) -> None:
        k, self.used = self.used, 0
        if k == 0:
            return
        if self.acc is None:
            self.acc = self.weights[:k].dot(self.rows[:k])
        else:
            self.weights[:k].dot(self.rows[:k], out=self.partial)
            np.add(self.acc, self.partial, out=self.acc)

    def total(self) -> np.ndarray | None:
        """Σ n·(w − c) over the rows kept (None if none was)."""
        self._flush()
        return self.acc


class _Sums:
    """Σ n·(w − c) per group for the differences no batch takes (a group of another
    dtype, or float32 values whose difference needed float64), term by term."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}

    def add(self, g: str, diff: np.ndarray, n: float) -> None:
        acc = self.sums.get(g)
        if acc is None:
            self.sums[g] = np.multiply(diff, n, dtype=_acc_dtype(diff))
        elif acc.dtype == diff.dtype == np.float32:
            axpy_in_place(acc, diff, n)
        else:
            acc += (diff * n).astype(acc.dtype, copy=False)

    def combined(self, g: str, batched: np.ndarray | None) -> np.ndarray:
        """The group's whole sum: this one's terms plus ``batched`` (in the wider dtype)."""
        own = self.sums.get(g)
        if own is None:
            return batched
        if batched is None:
            return own
        return np.add(own, batched, dtype=np.result_type(own, batched))


def _squares_of_clean(
    update: PackedUpdate,
    current_buffers: Mapping[str, np.ndarray],
    batches: Mapping[str, _GroupBatch],
) -> float | None:
    """``||update − current||²`` of an update with nothing to report (counts finite and
    >= 0, no structural problem, every group float32 with finite differences), leaving
    its ``w − c`` per group in the next row of the group's batch; None for any other
    update.  The arithmetic is
    :func:`~fed_iotlm.federation.update_checks.check_packed`'s (one subtraction and one
    dot per group, summed in Python floats), so the norm is the same to the bit."""
    if update.problem is not None:
        return None
    for n in update.counts.values():
        if not (n >= 0 and math.isfinite(n)):
            return None
    squares = 0.0
    for g, flat in update.buffers.items():
        batch = batches.get(g)
        if batch is None or flat.dtype is not _FLOAT32 and flat.dtype != _FLOAT32:
            return None
        diff = batch.row_views[batch.used]
        np.subtract(flat, current_buffers[g], out=diff)
        squares += float(diff.dot(diff))  # ndarray.dot: np.dot less its dispatch wrapper
    # a NaN/Inf value (or float32 values too far apart) makes the sum non-finite
    return squares if math.isfinite(squares) else None


_FLOAT32 = np.dtype(np.float32)


def _acc_dtype(diff: np.ndarray) -> type:
    return np.float32 if diff.dtype == np.float32 else np.float64
