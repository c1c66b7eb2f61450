"""Task heads and the multitask loss with unlabelled entries masked out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


class ProjectionHead(nn.Module):
    """Token -> a small space for contrastive SSL (SimCLR's projection head): the loss
    shapes this space, so the token itself keeps what the task heads need."""

    def __init__(self, dim: int, out: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return self.net(token)


def multitask_loss(
    logits: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    weights: dict[str, float] | None = None,
    class_weights: Mapping[str, Sequence[float]] | None = None,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Weighted sum over tasks of the mean cross-entropy on labelled (>= 0) entries.

    Returns the loss and, per task, how many labelled entries contributed; a task with
    no labelled entry in the batch contributes nothing (not a NaN).  With
    ``sample_weight`` (>= 0, e.g. MMBind pair weights) each task's term is the
    weighted mean Σ w_i ℓ_i / Σ w_i over its labelled entries.  With ``class_weights``
    (per task, one weight per class: ``train.class_weighting=balanced``) entry i also
    weighs ``cw[y_i]``: Σ cw[y_i] ℓ_i / Σ cw[y_i] (times ``w_i`` in both sums), PyTorch's
    weighted mean; a batch whose labelled entries all weigh 0 contributes nothing.
    Without them the computation is the unweighted one, unchanged.
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
        if class_weights is not None and task in class_weights:
            term = _class_weighted(out[keep], y[keep], class_weights[task], sample_weight, keep)
            if term is not None:
                total = total + w * term
            continue
        if sample_weight is None:
            total = total + w * F.cross_entropy(out[keep], y[keep])
            continue
        sw = sample_weight[keep]
        if float(sw.sum()) <= 0:
            continue
        per = F.cross_entropy(out[keep], y[keep], reduction="none")
        total = total + w * (sw * per).sum() / sw.sum()
    return total, counts


def _class_weighted(
    out: torch.Tensor,
    y: torch.Tensor,
    cw: Sequence[float],
    sample_weight: torch.Tensor | None,
    keep: torch.Tensor,
) -> torch.Tensor | None:
    """Σ v_i cw[y_i] ℓ_i / Σ v_i cw[y_i] over labelled entries (v_i = sample weight or 1);
    None when the denominator is 0 (nothing of weight in this batch)."""
    weight = torch.as_tensor(cw, dtype=torch.float32, device=out.device)
    if weight.shape[0] != out.shape[1]:
        raise ValueError(
            f"class weights: {weight.shape[0]} weights for a task of {out.shape[1]} classes"
        )
    per = F.cross_entropy(out, y, weight=weight, reduction="none")  # cw[y_i] · ℓ_i
    each = weight[y]
    if sample_weight is not None:
        sw = sample_weight[keep].to(per.dtype)
        per, each = sw * per, sw * each
    denom = each.sum()
    if float(denom) <= 0:
        return None
    return per.sum() / denom
