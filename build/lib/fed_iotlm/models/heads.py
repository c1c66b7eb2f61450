"""Task heads and the multitask loss with unlabelled entries masked out."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TaskHead(nn.Module):
    """Fused embedding -> class logits for one task (an MLP: classes combine modality cues)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ReconstructionHead(nn.Module):
    """Token -> the flattened features it came from (an autoencoder's decoder)."""

    def __init__(self, dim: int, feature_shape: tuple[int, ...], hidden: int = 128) -> None:
        super().__init__()
        self.feature_shape = feature_shape
        out = 1
        for s in feature_shape:
            out *= s
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return self.net(token).view(token.shape[0], *self.feature_shape)


def multitask_loss(
    logits: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    weights: dict[str, float] | None = None,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Weighted sum over tasks of the mean cross-entropy on labelled (>= 0) entries.

    Returns the loss and, per task, how many labelled entries contributed; a task with
    no labelled entry in the batch contributes nothing (not a NaN).  With
    ``sample_weight`` (>= 0, e.g. MMBind pair weights) each task's term is the
    weighted mean Σ w_i ℓ_i / Σ w_i over its labelled entries.
    """
    total = next(iter(logits.values())).new_zeros(())
    counts: dict[str, int] = {}
    for task, out in logits.items():
        y = labels[task]
        keep = y >= 0
        counts[task] = int(keep.sum())
        if counts[task] == 0:
            continue
        w = 1.0 if weights is None else float(weights.get(task, 1.0))
        if sample_weight is None:
            total = total + w * F.cross_entropy(out[keep], y[keep])
            continue
        sw = sample_weight[keep]
        if float(sw.sum()) <= 0:
            continue
        per = F.cross_entropy(out[keep], y[keep], reduction="none")
        total = total + w * (sw * per).sum() / sw.sum()
    return total, counts
