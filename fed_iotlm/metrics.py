"""Classification scores from a confusion matrix: accuracy, macro-F1, balanced accuracy.

Real activity data is skewed (ExtraSensory users sit far more than they run), so
accuracy alone rewards predicting the common class.  Macro-F1 (what FedMultimodal
reports) and balanced accuracy (mean per-class recall, what ExtraSensory's authors
report) weigh every class equally.  All three come from one confusion matrix, which
is additive: batches, nodes or seeds are combined by summing matrices, never by
averaging scores.

Conventions (those of scikit-learn, so figures compare with published ones):
macro-F1 averages over classes that occur in the labels *or* the predictions (a class
never seen and never predicted is left out; one predicted but absent scores 0);
balanced accuracy averages recall over classes that occur in the labels.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class] over labelled samples (``y_true >= 0``)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    keep = y_true >= 0
    t, p = y_true[keep], y_pred[keep]
    out_of_range = (t >= num_classes) | (p < 0) | (p >= num_classes)
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(
            f"class index out of range [0, {num_classes - 1}]: label {t[i]}, prediction {p[i]}"
        )
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accuracy(cm: np.ndarray) -> float:
    """Share of samples on the diagonal (NaN for an empty matrix)."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def f1_macro(cm: np.ndarray) -> float:
    """Mean per-class F1 over classes that are labelled or predicted at least once."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    seen = (support + predicted) > 0
    if not seen.any():
        return float("nan")
    f1 = 2.0 * tp[seen] / (support[seen] + predicted[seen])
    return float(f1.mean())


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean per-class recall over classes with at least one labelled sample."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(cm)[present] / support[present]).mean())


def scores(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and balanced accuracy of one confusion matrix."""
    return {
        "accuracy": accuracy(cm),
        "f1_macro": f1_macro(cm),
        "balanced_accuracy": balanced_accuracy(cm),
    }
