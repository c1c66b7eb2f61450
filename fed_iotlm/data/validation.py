"""The validation share: what every choice a run makes is judged on, so test never is.

A dataset may bring its own ``val.npz``; then it is partitioned across nodes like the
test split.  Otherwise each node holds back a seeded, stratified share of its own
training samples (``partition.val_fraction``), and the global validation reference set
is the union of those shares.  A carved sample never trains: it is removed from the
node's training part before labels are hidden, and keeps its label, as a test sample
does (its labels are not counted in ``partition.label_fraction``).
"""

from __future__ import annotations

import numpy as np


def check_val_fraction(fraction: float) -> float:
    """``partition.val_fraction`` as a float in [0, 0.5], or a clear error."""
    value = float(fraction)
    if not 0.0 <= value <= 0.5:
        raise ValueError(f"partition.val_fraction must be in [0, 0.5], got {fraction!r}")
    return value


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions (into ``labels``) of a seeded, class-stratified ``fraction`` share.

    Systematic sampling over a class-sorted random order: shuffle, stable-sort by label,
    take every ``1/fraction``-th position.  Each class (``-1`` = unlabelled counts as a
    class) gets its proportional share up to rounding, and the total is
    ``floor(fraction · n)`` or one more.  Vectorised; no per-class loop.
    """
    n = int(labels.shape[0])
    if fraction <= 0.0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    steps = np.floor((np.arange(n) + 1) * fraction) - np.floor(np.arange(n) * fraction)
    return np.sort(order[steps > 0]).astype(np.int64)


def carve_validation(
    parts: list[np.ndarray], labels: np.ndarray, fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every node's training indices into (train, val), stratified on ``labels``.

    Returns ``(train_parts, val_parts)``; both index the same split as ``parts`` do.
    Node ``i`` draws from a generator seeded by ``(seed, i)``, so a node's share does
    not depend on how many nodes there are.
    """
    train_parts, val_parts = [], []
    for node, part in enumerate(parts):
        idx = np.asarray(part, dtype=np.int64)
        held = stratified_holdout(labels[idx], fraction, seed * 7_919 + node)
        keep = np.ones(idx.shape[0], dtype=bool)
        keep[held] = False
        train_parts.append(idx[keep])
        val_parts.append(idx[held])
    return train_parts, val_parts
