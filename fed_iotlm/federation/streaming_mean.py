"""Screen and average packed updates in one pass: the server's mean-rule round.

Screening needs each update's difference to the current model (the NaN/Inf check and
the update norm); the mean needs each accepted update once more.  Reading a node's
update twice, once to screen it and again after every node was screened, reads 100
nodes' updates from memory twice.  Here each update is read from memory once: its
difference ``w − c`` is written into a small row buffer that stays in the CPU's cache,
and the norm and the count-weighted sum are taken from that row:

    w_g = c_g + Σ_i n_{i,g} · (w_{i,g} − c_g) / Σ_i n_{i,g}

which is the count-weighted mean of :func:`~fed_iotlm.federation.aggregation.aggregate_groups`
(Σ n·c / Σ n = c), summed over small differences rather than whole weights.

Nodes are taken ``BATCH_ROWS`` at a time and, within a batch, group by group: one
group's rows (at most ``BATCH_VALUES`` values, one buffer shared by every group, so it
stays cache-resident) are filled by one subtraction per node, their squared norms come
from one stacked ``matmul`` (numpy's BLAS ``sdot``: the same value, bit for bit, as
:func:`~fed_iotlm.federation.update_checks.check_packed` computes) and their weighted
sum from one ``np.matmul(weights, rows)`` (BLAS ``sgemv``; ``ndarray.dot`` copied the
padded rows of small groups first) into the batch's partial sum.  The partial sum is
provisional: it is added to the running sum only when every node of the batch turns
out accepted, the usual case; a batch with a rejected node is summed again from its
accepted nodes alone.  A group too large for two rows (over ``BATCH_VALUES / 2``
values) keeps a row of its own and the batch shrinks to one node, so that group is
added straight from its row after the verdict, with no partial sum.

Rows start on 64-byte lines: numpy's float32 subtraction into a buffer that does not
ran at half speed on this project's machine (whole-vector stores straddling two lines).

The usual node (finite counts, no structural problem, float32 groups, finite values) is
screened this way and nothing else; anything else goes through
:func:`~fed_iotlm.federation.update_checks.check_packed`, which finds and names the
problem.  Both compute the same differences and norms, so the verdicts and the mean do
not depend on which path a node took.  Memory stays O(model): the shared rows, one
partial sum per group and the running sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from .aggregation import GroupAggregate, axpy_in_place
from .packing import ALIGN, PackedUpdate, aligned_empty
from .update_checks import CheckConfig, Screened, check_packed, norm_verdict

# nodes screened together; a group's rows hold at most this many nodes and
# BATCH_VALUES values (8 rows of the default model's largest group, 54 k values, are
# 1.7 MB: cache-resident); a group of more than half of that has a row of its own
BATCH_ROWS = 8
BATCH_VALUES = 1 << 19

Weigh = Callable[[PackedUpdate], Mapping[str, float]]


def screen_and_mean(
    current: Mapping[str, np.ndarray],
    current_buffers: Mapping[str, np.ndarray],
    updates: Iterable[PackedUpdate],
    config: CheckConfig,
    weigh: Weigh | None = None,
) -> tuple[Screened, GroupAggregate | None]:
    """The screen's verdicts and the count-weighted mean per group over the accepted
    updates (None if none was accepted); ``weigh`` gives the counts an accepted update
    weighs with (default: its own, ``update.counts``; DP: 1 per group it sent)."""
    round_ = _Round(current_buffers, config, weigh)
    batch: list[PackedUpdate] = []
    for upd in updates:
        batch.append(upd)
        if len(batch) == round_.rows.batch_nodes:
            round_.take(batch)
            batch = []
    if batch:
        round_.take(batch)
    out = round_.screened
    if not out.accepted:
        return out, None
    state = dict(current)
    layout = out.accepted[-1].layout
    for g, total in round_.weight.items():
        acc = round_.sums.combined(g, round_.acc.get(g))
        group = layout.groups[g]
        np.divide(acc, total, out=acc)
        mean = np.add(current_buffers[g], acc, dtype=acc.dtype).astype(group.dtype, copy=False)
        state.update(group.unpack(mean))
    return out, GroupAggregate(state, round_.holders, round_.weight)


class _Round:
    """One round's screen and sums, fed a batch of updates at a time."""

    def __init__(
        self, current_buffers: Mapping[str, np.ndarray], config: CheckConfig, weigh: Weigh | None
    ) -> None:
        self.current = current_buffers
        self.config = config
        self.weigh = weigh
        self.screened = Screened()
        self.weight: dict[str, float] = {}
        self.holders: dict[str, list[str]] = {}
        self.acc: dict[str, np.ndarray] = {}  # Σ n·(w − c) of the batched float32 rows
        self.sums = _Sums()  # anything else (other dtypes, float64 differences)
        self.rows = _Rows(current_buffers)

    def take(self, batch: list[PackedUpdate]) -> None:
        """Screen ``batch`` (in order) and add its accepted updates to the sums."""
        rows = self.rows
        fast = [j for j, u in enumerate(batch) if _clean(u, rows.float32)]
        counts = {j: self._counts(batch[j]) for j in fast}
        squares = rows.fill(batch, counts) if fast else {}
        from_rows = []  # fast nodes accepted on their rows' norm
        for j, upd in enumerate(batch):
            per_group = squares.get(j)
            diffs = None
            if per_group is not None:
                total = 0.0
                for g in upd.buffers:  # the node's group order: check_packed's sum
                    total += per_group[g]
                if not math.isfinite(total):  # a NaN/Inf or values too far apart: name it
                    per_group = None
            if per_group is None:
                diffs = {}
                rejection, norm = check_packed(upd, self.current, self.config, diffs)
            else:
                rejection, norm = norm_verdict(upd.node, total, self.config)
            if norm is not None:
                self.screened.norms[upd.node] = norm
            if rejection is not None:
                self.screened.rejected.append(rejection)
                continue
            self.screened.accepted.append(upd)
            if per_group is not None:
                from_rows.append(j)
            weights = counts[j] if j in counts else self._counts(upd)
            for g in upd.buffers:
                n = float(weights.get(g, 0.0))
                if n <= 0:
                    continue
                if diffs is not None:
                    self.sums.add(g, diffs[g], n)
                self.weight[g] = self.weight.get(g, 0.0) + n
                self.holders.setdefault(g, []).append(upd.node)
        if len(from_rows) == len(fast):  # the usual case: the partial sums stand
            rows.fold_into(self.acc)
        else:  # a fast node was rejected or checked again: sum the others node by node
            for j in from_rows:
                rows.add_node(batch[j], counts[j], self.acc)

    def _counts(self, upd: PackedUpdate) -> Mapping[str, float]:
        return upd.counts if self.weigh is None else self.weigh(upd)


class _Rows:
    """The cache-resident row buffer shared by every float32 group, and each group's
    provisional partial sum over the batch being screened."""

    def __init__(self, current_buffers: Mapping[str, np.ndarray]) -> None:
        self.current = {
            g: c if c.ctypes.data % ALIGN == 0 else aligned_copy(c)
            for g, c in current_buffers.items()
            if c.dtype == _FLOAT32
        }
        self.float32 = frozenset(self.current)
        sizes = {g: c.size for g, c in self.current.items()}
        self.k = {g: max(1, min(BATCH_ROWS, BATCH_VALUES // max(s, 1))) for g, s in sizes.items()}
        # a group too large for two rows has a row of its own and is added node by node
        # (a provisional partial sum would cost it one more pass per batch); the batch
        # is then one node, so that the row still holds that node's w − c at its verdict
        self.direct = frozenset(g for g, k in self.k.items() if k == 1)
        self.batch_nodes = 1 if self.direct else BATCH_ROWS
        # every row starts on a cache line: numpy's SIMD loops store whole vectors, and
        # a store that straddles two lines made the subtraction twice as slow
        stride = {g: -(-s // _LINE) * _LINE for g, s in sizes.items()}
        shared = aligned_empty(
            max((self.k[g] * stride[g] for g in sizes if g not in self.direct), default=0)
        )
        # views made once: a view costs about as much as a small subtraction call
        self.matrix = {
            g: (aligned_empty(s) if g in self.direct else shared)[: self.k[g] * stride[g]].reshape(
                self.k[g], -1
            )[:, :s]
            for g, s in sizes.items()
        }
        self.row_views = {g: list(m) for g, m in self.matrix.items()}
        self.partial = {g: aligned_empty(s) for g, s in sizes.items() if g not in self.direct}
        self.spare = aligned_empty(max((p.size for p in self.partial.values()), default=0))
        self.filled: list[str] = []  # groups whose partial sum (or own row) holds this batch
        self.direct_weight: dict[str, float] = {}

    def fill(
        self, batch: list[PackedUpdate], counts: Mapping[int, Mapping[str, float]]
    ) -> dict[int, dict[str, float]]:
        """Write the ``w − c`` per group of every node in ``counts`` (the batch's fast
        ones, with the counts they weigh with) into the rows, group by group; return
        ``{node index: {group: ||w − c||²}}`` and leave each group's ``Σ n·(w − c)``
        over them (n ≤ 0 weighs 0) in its partial sum."""
        fast = list(counts)
        squares: dict[int, dict[str, float]] = {j: {} for j in fast}
        self.filled = []
        for g, c in self.current.items():
            members = [j for j in fast if g in batch[j].buffers]
            if not members:
                continue
            self.filled.append(g)
            k, views, matrix = self.k[g], self.row_views[g], self.matrix[g]
            partial = self.partial.get(g)
            for start in range(0, len(members), k):
                chunk = members[start : start + k]
                for i, j in enumerate(chunk):
                    np.subtract(batch[j].buffers[g], c, out=views[i])
                rows = matrix[: len(chunk)]
                # stacked 1×m · m×1 products: BLAS sdot per row, as ndarray.dot gives it
                sq = np.matmul(rows[:, None, :], rows[:, :, None]).ravel().tolist()
                for i, j in enumerate(chunk):
                    squares[j][g] = sq[i]
                weights = np.array(
                    [max(float(counts[j].get(g, 0.0)), 0.0) for j in chunk], _FLOAT32
                )
                if partial is None:  # its own row, one node: added at the fold
                    self.direct_weight[g] = float(weights[0])
                elif start == 0:
                    np.matmul(weights, rows, out=partial)
                else:
                    spare = self.spare[: partial.size]
                    np.matmul(weights, rows, out=spare)
                    np.add(partial, spare, out=partial)
        return squares

    def fold_into(self, acc: dict[str, np.ndarray]) -> None:
        """Add the batch's partial sums to the running sums ``acc``."""
        for g in self.filled:
            total = acc.get(g)
            partial = self.partial.get(g)
            if partial is None:  # a group of its own rows: n·(w − c) of the batch's node
                n, row = self.direct_weight[g], self.row_views[g][0]
                if total is None:
                    acc[g] = np.multiply(row, n, out=aligned_empty(row.size))
                elif n:
                    axpy_in_place(total, row, n)
            elif total is None:
                acc[g] = aligned_copy(partial)
            else:
                np.add(total, partial, out=total)
        self.filled = []

    def add_node(self, upd: PackedUpdate, counts: Mapping[str, float], acc: dict) -> None:
        """``acc += n·(w − c)`` per group of one node, computed again (a batch whose
        partial sums hold a rejected node's row)."""
        for g, flat in upd.buffers.items():
            n = float(counts.get(g, 0.0))
            if n <= 0:
                continue
            diff = self.row_views[g][0]
            np.subtract(flat, self.current[g], out=diff)
            total = acc.get(g)
            if total is None:
                acc[g] = np.multiply(diff, n, dtype=_FLOAT32)
            else:
                axpy_in_place(total, diff, n)


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


def _clean(update: PackedUpdate, float32: frozenset[str]) -> bool:
    """Counts finite and >= 0, no structural problem, every group float32 (its values
    are checked by the norm: a NaN/Inf makes it non-finite)."""
    if update.problem is not None:
        return False
    for n in update.counts.values():
        if not (n >= 0 and math.isfinite(n)):
            return False
    for g, flat in update.buffers.items():
        if g not in float32 or flat.dtype != _FLOAT32:
            return False
    return True


_FLOAT32 = np.dtype(np.float32)
_LINE = ALIGN // _FLOAT32.itemsize


def aligned_copy(values: np.ndarray) -> np.ndarray:
    """A flat float32 copy of ``values`` starting on a cache line."""
    out = aligned_empty(values.size)
    np.copyto(out, values.reshape(-1))
    return out


def _acc_dtype(diff: np.ndarray) -> type:
    return np.float32 if diff.dtype == np.float32 else np.float64
