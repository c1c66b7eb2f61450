"""Weighted contrastive loss between a node's own views and its partners' embeddings.

InfoNCE over the batch (temperature τ): for sample i, its own-modality token a_i should
be closer to its partner's embedding p_i than to the partners of the other samples.
Each sample's term is weighted by its pair weight w_i, so dubious pseudo-pairs pull
less; the loss is Σ w_i ℓ_i / Σ w_i (0 when no weight is positive).  Partner
embeddings arrive as constants: the gradient trains only this node's encoders.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def weighted_info_nce(
    anchors: torch.Tensor,
    partners: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 0.1,
    *,
    detach_partners: bool = True,
) -> torch.Tensor:
    """anchors [B, D] (trainable), partners [B, D] (constants unless ``detach_partners``
    is False, as for two augmented views in self-supervised rounds), weights [B] >= 0."""
    if temperature <= 0:
        raise ValueError(f"binding.temperature must be > 0, got {temperature}")
    total = weights.sum()
    if anchors.shape[0] < 2 or float(total) <= 0:
        return anchors.sum() * 0.0
    a = F.normalize(anchors, dim=1)
    p = F.normalize(partners.detach() if detach_partners else partners, dim=1)
    logits = a @ p.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    per_sample = 0.5 * (
        F.cross_entropy(logits, target, reduction="none")
        + F.cross_entropy(logits.T, target, reduction="none")
    )
    return (weights * per_sample).sum() / total
