"""Class-balanced cross-entropy weights (``train.class_weighting``).

Why: on skewed labels (ExtraSensory's main activity is mostly sitting and lying) an
unweighted cross-entropy optimises accuracy, which the majority classes dominate, while
the figure reported for such data is balanced accuracy.  ``balanced`` gives class ``c``
of a task the weight ``n / (K · n_c)`` over the task's labelled training samples (``n``
of them, ``K`` classes, ``n_c`` of class ``c``; label -1 is unlabelled and not counted):
every class then carries the same total weight, as ExtraSensory's authors weight classes
inversely to their frequency.  A class with no labelled sample gets weight 0 and a
warning naming the task and the class (no division by zero; the class cannot occur in
the training batches those counts describe).

Where the counts come from is the caller's choice and is recorded with the weights:
the federation's statistics round sums every node's counts (global counts: every node
optimises the same objective), the centralized baseline counts its pooled training
data, the local-only baseline each node's own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from fed_iotlm.config_schema import block

log = logging.getLogger(__name__)

MODES = ("none", "balanced")


def class_weighting_mode(cfg: Mapping) -> str:
    """``train.class_weighting`` from the config, checked (absent: ``none``)."""
    mode = str(block(dict(cfg), "train")["class_weighting"])
    if mode not in MODES:
        raise ValueError(f"train.class_weighting={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def class_counts(
    y: Mapping[str, np.ndarray], num_classes: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Per task, how many labelled (>= 0) samples of ``y`` fall in each of its classes.

    A label at or beyond the task's class count is an error naming the task: counting it
    silently would shift every weight of that task."""
    out: dict[str, np.ndarray] = {}
    for task, k in num_classes.items():
        labels = np.asarray(y[task]) if task in y else np.zeros(0, dtype=np.int64)
        labelled = labels[labels >= 0].astype(np.int64)
        if labelled.size and int(labelled.max()) >= int(k):
            raise ValueError(
                f"task {task!r}: label {int(labelled.max())} is outside its {k} classes"
            )
        out[task] = np.bincount(labelled, minlength=int(k)).astype(np.int64)
    return out


def add_counts(
    total: Mapping[str, np.ndarray], more: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``total + more`` per task; both must agree on each shared task's class count."""
    out = {t: np.asarray(v, dtype=np.int64).copy() for t, v in total.items()}
    for task, counts in more.items():
        counts = np.asarray(counts, dtype=np.int64)
        if task in out and out[task].shape != counts.shape:
            raise ValueError(
                f"task {task!r}: class counts of {counts.shape[0]} classes added to "
                f"{out[task].shape[0]} (nodes disagree on the task's classes)"
            )
        out[task] = out[task] + counts if task in out else counts.copy()
    return out


def balanced_weights(
    counts: Mapping[str, np.ndarray], where: str = "training data"
) -> dict[str, np.ndarray]:
    """Per task, ``n / (K · n_c)`` for each class ``c`` (0 for a class with no sample,
    with a warning naming task, class and ``where`` the counts came from)."""
    out: dict[str, np.ndarray] = {}
    for task, c in counts.items():
        c = np.asarray(c, dtype=np.float64)
        k, n = c.shape[0], float(c.sum())
        w = np.zeros(k, dtype=np.float64)
        seen = c > 0
        w[seen] = n / (k * c[seen])
        for cls in np.flatnonzero(~seen):
            log.warning(
                "train.class_weighting=balanced: task %r class %d has no labelled sample in "
                "the %s: its weight is 0", task, int(cls), where,
            )  # fmt: skip
        out[task] = w
    return out


def weights_block(
    counts_from: str,
    counts: Mapping[str, np.ndarray],
    weights: Mapping[str, np.ndarray],
) -> dict:
    """What results.json records: the mode, where the counts came from, both per task."""
    return {
        "mode": "balanced",
        "counts_from": counts_from,
        "counts": {t: [int(v) for v in c] for t, c in counts.items()},
        "weights": {t: [float(v) for v in w] for t, w in weights.items()},
    }


def as_train_weights(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[float, ...]]:
    """The weights as :class:`~fed_iotlm.models.training.TrainConfig` carries them."""
    return {t: tuple(float(v) for v in w) for t, w in weights.items()}
