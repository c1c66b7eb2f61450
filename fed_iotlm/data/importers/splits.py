"""Train/val/test assignments that keep neighbouring samples on one side.

Real recordings are autocorrelated: two minutes (or two overlapping windows) next to
each other are near-copies, so a random split puts the same moment on both sides and
flatters every method.  The two rules here keep each side's samples apart:

- :func:`chronological`: one person's samples in time order, cut into a train, a val
  and a test block, with every sample closer than ``gap`` to the previous block dropped.
- :func:`by_group`: whole groups (an activity segment, say) go to one side; groups are
  taken in a seeded random order and each goes to the side furthest below its share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SIDES: tuple[str, ...] = ("train", "val", "test")
DROPPED = -1


def check_fractions(val: float, test: float) -> tuple[float, float, float]:
    """(train, val, test) shares from the val and test shares; train must keep some."""
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise ValueError(
            f"val and test fractions must be in [0, 1) with a sum below 1, got {val} and {test}"
        )
    return (1.0 - val - test, val, test)


def chronological(times: np.ndarray, fractions: Sequence[float], gap: float) -> np.ndarray:
    """Side (0 train, 1 val, 2 test, -1 dropped) of each sample of one person.

    ``times`` must be non-decreasing.  The first ``fractions[0]`` of the samples are
    train, the next ``fractions[1]`` val, the rest test; a sample of a later block that
    lies less than ``gap`` after the last sample of the block before it is dropped, so
    no test sample is adjacent to a training (or validation) sample.
    """
    n = times.size
    side = np.zeros(n, dtype=np.int64)
    if n == 0:
        return side
    if np.any(np.diff(times) < 0):
        raise ValueError("times must be sorted")
    cuts = np.round(np.cumsum(fractions)[:-1] * n).astype(np.int64)
    for k, cut in enumerate(cuts, start=1):
        side[cut:] = k
    for k, cut in enumerate(cuts, start=1):
        if 0 < cut < n:
            last_before = times[cut - 1]
            too_close = (side == k) & (times - last_before < gap)
            side[too_close] = DROPPED
    return side


def by_group(
    sizes: np.ndarray, fractions: Sequence[float], seed: int | Sequence[int]
) -> np.ndarray:
    """Side (0 train, 1 val, 2 test) of each group, groups weighted by ``sizes``.

    Groups are visited in a seeded random order; each goes to the side whose share of
    the samples assigned so far lags its target most (train wins ties), so the sides
    approach their fractions as closely as whole groups allow.
    """
    target = np.asarray(fractions, dtype=np.float64)
    assigned = np.zeros(target.size)
    side = np.zeros(sizes.size, dtype=np.int64)
    for g in np.random.default_rng(seed).permutation(sizes.size):
        lag = target * (assigned.sum() + sizes[g]) - assigned
        lag[target == 0] = -np.inf
        side[g] = int(np.argmax(lag))
        assigned[side[g]] += sizes[g]
    return side
