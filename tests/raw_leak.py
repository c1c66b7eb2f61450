"""Does anything a node sent carry one of its raw samples?  One checker for every test.

A sample can leave a node in many disguises: flattened into a longer array, reshaped
or transposed, scaled (or scaled and shifted, or sign-flipped), cut to a slice, spread
over metric keys, int8-quantised.  Comparing arrays whose widths happen to match finds
none of these.  :class:`RawLeakChecker` compares *every* value a node sent, as one
flat sequence per array or record, against *every* raw window of the node:

* each raw sample is flattened in C order (a reshape keeps it) and, with
  ``transposed=True``, in Fortran order too (a transpose puts each channel's series in
  a row);
* each flattening is cut into blocks of ``block`` values every ``stride`` values
  (default ``block``), so any contiguous slice of at least ``block + stride - 1``
  values (63 by default) contains a whole block;
* every window of ``block`` consecutive sent values is compared with every block by
  Pearson correlation, which is blind to scale, offset and sign: a leak is a window
  with ``|r| ≥ threshold``.

Blocks that identify nothing are skipped, and counted: constant stretches (a zero-filled
missing modality) and stretches a straight line explains (``r²`` with a ramp above
``threshold²``: a slow signal over a few dozen samples looks like any counter, such as
the node's own sample ids).  With ``block=32`` two unrelated windows reach
``|r| = 0.95`` with probability about 1e-16, so a hit is a leak, not chance (a
billion comparisons leave a false alarm at about 1e-7).  The cost is about
``2 · block / stride`` multiply-adds per (sent value, raw value) pair: seconds for the
quick federation's replies, so the simulation tests run it on everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

_EPS = 1e-9


@dataclass(frozen=True)
class Leak:
    """Where a raw sample was found: which sent value, which raw source and sample."""

    sent: str
    offset: int
    source: str
    sample: int
    correlation: float

    def __str__(self) -> str:
        return (
            f"{self.sent}[{self.offset}:] matches raw {self.source} sample {self.sample} "
            f"(r = {self.correlation:+.4f})"
        )


def _unit_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows centred and scaled to unit norm; a mask of the rows that are not constant."""
    centred = rows - rows.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    keep = norm[:, 0] > _EPS * max(1.0, float(np.abs(rows).max(initial=0.0)))
    return centred / np.where(norm > 0, norm, 1.0), keep


def numeric_values(record: Mapping[str, object]) -> np.ndarray:
    """Every number of a metric or config record, in key order, as one flat sequence
    (lists are expanded; strings and bytes carry no sample values and are skipped)."""
    out: list[float] = []
    for value in record.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, (bool, int, float, np.integer, np.floating)):
                out.append(float(v))
    return np.asarray(out, dtype=np.float64)


class RawLeakChecker:
    """Raw windows of one node, ready to be searched for in anything it sent."""

    def __init__(
        self,
        sources: Mapping[str, np.ndarray],
        *,
        block: int = 32,
        stride: int | None = None,
        threshold: float = 0.95,
        transposed: bool = False,
        chunk: int = 1024,
    ) -> None:
        if block < 8:
            raise ValueError(f"block={block}: too short for a correlation to mean anything")
        self.block, self.threshold, self.chunk = block, threshold, chunk
        self.stride = int(stride or block)
        if not 0 < self.stride <= block:
            raise ValueError(f"stride={stride}: must be in 1..block={block}")
        ramp, _ = _unit_rows(np.arange(block, dtype=np.float64)[None])
        blocks, owners = [], []
        self.skipped = 0
        for name, x in sources.items():
            x = np.asarray(x, dtype=np.float64)
            for i, sample in enumerate(x):
                for flat in _flattenings(sample, transposed):
                    rows = _blocks(flat, block, self.stride)
                    if rows is None:
                        continue
                    unit, keep = _unit_rows(rows)
                    keep &= np.abs(unit @ ramp[0]) < threshold  # a line identifies nothing
                    self.skipped += int((~keep).sum())
                    blocks.append(unit[keep])
                    owners.extend([(name, i)] * int(keep.sum()))
        if not owners:
            raise ValueError("no raw block to compare against: the sources are empty or flat")
        self.blocks = np.concatenate(blocks).astype(np.float32)
        self.owners = owners
        self.searched = len(owners)

    @property
    def min_slice(self) -> int:
        """The shortest contiguous slice of a sample that is sure to be found."""
        return self.block + self.stride - 1

    def find(self, name: str, values: object) -> Leak | None:
        """The strongest match of any raw block in ``values`` (flattened), if any."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        flat = flat[np.isfinite(flat)]
        if flat.size < self.block:
            return None
        windows = np.lib.stride_tricks.sliding_window_view(flat, self.block)
        best: Leak | None = None
        for start in range(0, len(windows), self.chunk):
            unit, keep = _unit_rows(windows[start : start + self.chunk])
            unit[~keep] = 0.0
            scores = unit.astype(np.float32) @ self.blocks.T
            if max(float(scores.max()), -float(scores.min())) < self.threshold:
                continue  # the common case: one pass over the scores, no copies
            np.abs(scores, out=scores)
            row, col = np.unravel_index(int(np.argmax(scores)), scores.shape)
            r = float(scores[row, col])
            if best is None or r > abs(best.correlation):
                source, sample = self.owners[col]
                sign = float(np.sign(unit[row] @ self.blocks[col].astype(np.float64)))
                best = Leak(name, start + int(row), source, sample, sign * r)
        return best

    def leaks(self, sent: Mapping[str, object]) -> list[Leak]:
        """Every sent value (name -> array, or a record's numbers) that carries a sample."""
        found = (self.find(name, values) for name, values in sent.items())
        return [leak for leak in found if leak is not None]

    def assert_clean(self, sent: Mapping[str, object], what: str = "") -> None:
        """Fail naming every sent value that carries a raw sample of the node."""
        leaks = self.leaks(sent)
        assert not leaks, f"raw data left the node{' in ' + what if what else ''}:\n  " + (
            "\n  ".join(map(str, leaks))
        )


def _flattenings(sample: np.ndarray, transposed: bool) -> Iterable[np.ndarray]:
    yield sample.ravel(order="C")
    if transposed and sample.ndim >= 2:
        yield sample.ravel(order="F")


def _blocks(flat: np.ndarray, block: int, stride: int) -> np.ndarray | None:
    """Blocks of ``block`` values every ``stride`` values (the tail included)."""
    if flat.size < block:
        return None
    starts = list(range(0, flat.size - block + 1, stride))
    if starts[-1] != flat.size - block:
        starts.append(flat.size - block)
    return np.stack([flat[s : s + block] for s in starts])
