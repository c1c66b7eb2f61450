"""Pair weight from pair similarity: one documented, non-negative, monotone function.

MMBind's public code uses a different formula per dataset (1 + ln(s)/2, 3(s − 0.5), s),
two of which go negative for dissimilar pairs — a negative weight would *reward*
pulling a wrong pair apart in a contrastive loss.  We use

    w(s) = ((clip(s, floor, 1) − floor) / (1 − floor)) ** power

which is 0 at or below the similarity floor, 1 for identical embeddings, non-negative
everywhere and non-decreasing in s (strictly increasing on (floor, 1] for power > 0).
``power`` sharpens (> 1) or flattens (< 1) the preference for close pairs.
"""

from __future__ import annotations

import numpy as np


def pair_weight(similarity: np.ndarray, floor: float = 0.0, power: float = 1.0) -> np.ndarray:
    """Weight in [0, 1] for cosine similarities in [-1, 1] (NaN/-inf count as no pair)."""
    if not -1.0 <= floor < 1.0:
        raise ValueError(f"binding.floor must be in [-1, 1), got {floor}")
    if power <= 0:
        raise ValueError(f"binding.weight_power must be > 0, got {power}")
    s = np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=-1.0, neginf=-1.0)
    w = (np.clip(s, floor, 1.0) - floor) / (1.0 - floor)
    return (w**power).astype(np.float32)
