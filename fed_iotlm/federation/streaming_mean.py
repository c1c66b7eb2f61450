"""Screen and average packed updates in one pass: the server's mean-rule round.

Screening needs each update's difference to the current model (the NaN/Inf check and
the update norm); the mean needs each accepted update once more.  Reading a node's
update twice, once to screen it and again after every node was screened, reads 100
nodes' updates from memory twice.  Here each update is read from memory once: its
difference ``w − c`` is written into a row that stays in the CPU's cache, the norm
is taken from the row, and an accepted node's row is added to the running sum at
once, ``acc += n·(w − c)``:

    w_g = c_g + Σ_i n_{i,g} · (w_{i,g} − c_g) / Σ_i n_{i,g}

which is the count-weighted mean of :func:`~fed_iotlm.federation.aggregation.aggregate_groups`
(Σ n·c / Σ n = c), summed over small differences rather than whole weights.

The row is one buffer for the whole model: every float32 group at its own 64-byte
line, in the server's group order, and the running sum has the same layout.  A node's
groups that lie next to each other in that order form a *run*: the norm takes one
BLAS ``sdot`` per run (``||w − c||²`` is the Python sum of the runs' dots), and the
sum one ``saxpy`` per run of equal counts, so a node that sent every group with one
count costs seven subtractions (one per reply buffer), one dot and one axpy.  On the
default model (7 groups, 100 nodes) that was 11.5 ms against 13.2 for one dot and
one axpy per group, and 17 ms for the batches of 8 rows per group this module used at
``8e1af24`` (8 rows of the largest group, 1.7 MB, do not fit the 512 KB L2 of this
project's machine; writing the differences there cost more than the batched BLAS
calls saved).  docs/performance.md has the measurements.

A node whose update is not plainly well-formed (a structural problem, a bad count, a
group that is not float32), or whose norm is not finite (a NaN/Inf, or finite values
too far apart for float32), goes through
:func:`~fed_iotlm.federation.update_checks.check_packed`, which finds and names the
problem or takes the difference again in float64.  Memory stays O(model): the row,
the running sum and one float64 sum per group that needed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from .aggregation import GroupAggregate, axpy_in_place, single_threaded_blas
from .packing import ALIGN, PackedUpdate, aligned_empty
from .update_checks import CheckConfig, Screened, check_packed, norm_verdict

Weigh = Callable[[PackedUpdate], Mapping[str, float]]
# a node's groups as runs of neighbours in the row: (groups, row view, running-sum view)
Runs = list[tuple[tuple[str, ...], np.ndarray, np.ndarray]]


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
    # an overflowing norm is not an error here: it sends the node to check_packed
    with single_threaded_blas(), np.errstate(over="ignore", invalid="ignore"):
        for upd in updates:
            round_.take(upd)
    screened = round_.screened
    if not screened.accepted:
        return screened, None
    state = dict(current)
    layout = screened.accepted[-1].layout
    for g, total in round_.weight.items():
        acc = round_.sum_of(g)
        group = layout.groups[g]
        np.divide(acc, total, out=acc)
        mean = np.add(current_buffers[g], acc, dtype=acc.dtype).astype(group.dtype, copy=False)
        state.update(group.unpack(mean))
    return screened, GroupAggregate(state, round_.holders, round_.weight)


class _Round:
    """One round's screen and sums, fed one update at a time."""

    def __init__(
        self, current_buffers: Mapping[str, np.ndarray], config: CheckConfig, weigh: Weigh | None
    ) -> None:
        self.current = current_buffers
        self.config = config
        self.weigh = weigh
        self.screened = Screened()
        self.weight: dict[str, float] = {}
        self.holders: dict[str, list[str]] = {}
        self.rows = _ModelRows(current_buffers)
        self.wide: dict[str, np.ndarray] = {}  # float64 sums: other dtypes, wide differences

    def take(self, upd: PackedUpdate) -> None:
        """Screen ``upd`` and, if accepted, add it to the sums."""
        rows = self.rows
        runs = rows.runs(tuple(upd.buffers)) if upd.problem is None else None
        squares = rows.fill(upd, runs) if runs is not None and _counts_ok(upd.counts) else None
        if squares is not None and math.isfinite(squares):
            rejection, norm = norm_verdict(upd.node, squares, self.config)
            diffs = None
        else:  # name the problem, or take the difference again in float64
            diffs = {}
            rejection, norm = check_packed(upd, self.current, self.config, diffs)
        if norm is not None:
            self.screened.norms[upd.node] = norm
        if rejection is not None:
            self.screened.rejected.append(rejection)
            return
        self.screened.accepted.append(upd)
        counts = upd.counts if self.weigh is None else self.weigh(upd)
        if diffs is None:
            rows.accumulate(runs, counts)
        weight, holders = self.weight, self.holders
        for g in upd.buffers:
            n = float(counts.get(g, 0.0))
            if n > 0:  # an accepted node's counts are finite and >= 0
                if diffs is not None:
                    self._add_checked(g, diffs[g], n)
                weight[g] = weight.get(g, 0.0) + n
                holders.setdefault(g, []).append(upd.node)

    def _add_checked(self, g: str, diff: np.ndarray, n: float) -> None:
        """``n·diff`` of a node that went through check_packed, into the sums."""
        if diff.dtype == np.float32 and g in self.rows.acc:
            axpy_in_place(self.rows.acc[g], diff, n)
            return
        acc = self.wide.get(g)
        if acc is None:
            self.wide[g] = diff.astype(np.float64) * n
        else:
            acc += diff * n

    def sum_of(self, g: str) -> np.ndarray:
        """The group's whole Σ n·(w − c), in float64 if any term needed it (a float32
        group's running sum is 0 where no term went into it)."""
        own, batched = self.wide.get(g), self.rows.acc.get(g)
        if own is None or batched is None:
            return batched if own is None else own
        return own + batched


class _ModelRows:
    """The row ``w − c`` of every float32 group, and the running sum ``Σ n·(w − c)``,
    each one cache-line-aligned buffer for the whole model."""

    def __init__(self, current_buffers: Mapping[str, np.ndarray]) -> None:
        self.current = {g: c for g, c in current_buffers.items() if c.dtype == _FLOAT32}
        offsets, end = {}, 0
        for g, c in self.current.items():  # every group starts on a cache line
            offsets[g] = end
            end += -(-c.size // _LINE) * _LINE
        self.offsets = offsets
        self.position = {g: i for i, g in enumerate(self.current)}
        # zeros: the padding between groups is part of a run's dot and sum, and stays 0
        self.row_buffer, self.acc_buffer = aligned_empty(end), aligned_empty(end)
        self.row_buffer[:] = 0
        self.acc_buffer[:] = 0
        self.row = {g: self._view(self.row_buffer, g) for g in self.current}
        self.acc = {g: self._view(self.acc_buffer, g) for g in self.current}
        self._runs: dict[tuple[str, ...], Runs | None] = {}

    def _view(self, buffer: np.ndarray, g: str) -> np.ndarray:
        start = self.offsets[g]
        return buffer[start : start + self.current[g].size]

    def fill(self, upd: PackedUpdate, runs: Runs) -> float:
        """Write the node's ``w − c`` into the row; return ``||w − c||²``, one dot per
        run (not finite if a value is NaN/Inf or the square overflows)."""
        row, current = self.row, self.current
        for g, flat in upd.buffers.items():
            np.subtract(flat, current[g], out=row[g])
        squares = 0.0
        for _, values, _ in runs:
            squares += float(values.dot(values))
        return squares

    def accumulate(self, runs: Runs, counts: Mapping[str, float]) -> None:
        """``acc += n·(w − c)`` from the row: one saxpy per run of groups with one
        count, one per group otherwise (a count of 0 adds nothing)."""
        for groups, values, acc in runs:
            n = float(counts.get(groups[0], 0.0))
            if len(groups) == 1 or all(float(counts.get(g, 0.0)) == n for g in groups):
                if n > 0:
                    axpy_in_place(acc, values, n)
                continue
            for g in groups:
                n = float(counts.get(g, 0.0))
                if n > 0:
                    axpy_in_place(self.acc[g], self.row[g], n)

    def runs(self, sent: tuple[str, ...]) -> Runs | None:
        """The sent groups as runs of neighbours in the row, each with its row and sum
        views (once per distinct set of sent groups); None if one is not a float32
        group of the model (such a node goes through check_packed)."""
        if sent in self._runs:
            return self._runs[sent]
        found: Runs | None = None
        if all(g in self.position for g in sent):
            groups: list[list[str]] = []
            for g in sorted(sent, key=self.position.__getitem__):
                if groups and self.position[g] == self.position[groups[-1][-1]] + 1:
                    groups[-1].append(g)
                else:
                    groups.append([g])
            found = []
            for run in groups:
                span = slice(
                    self.offsets[run[0]], self.offsets[run[-1]] + self.current[run[-1]].size
                )
                found.append((tuple(run), self.row_buffer[span], self.acc_buffer[span]))
        self._runs[sent] = found
        return found


def _counts_ok(counts: Mapping[str, float]) -> bool:
    """Every count finite and >= 0 (a NaN makes the sum NaN, a negative the minimum
    negative); otherwise check_packed names the bad one."""
    values = counts.values()
    return not values or (min(values) >= 0 and math.isfinite(sum(values)))


_FLOAT32 = np.dtype(np.float32)
_LINE = ALIGN // _FLOAT32.itemsize
