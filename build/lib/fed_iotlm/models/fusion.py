"""Fusion of any subset of modality tokens with a presence mask.

Missing modalities are *masked out of attention*, not zero-filled: a sample with only
IMU is fused from the IMU token alone, exactly as it would be at a node that never had
audio.  ``use_mask=False`` gives the naive baseline that treats zero-filled inputs as
present.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedAttentionFusion(nn.Module):
    """Self-attention over present modality tokens, then a learned query pools them."""

    def __init__(self, dim: int, heads: int = 4, layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.mixer = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True
            )
            for _ in range(layers)
        )
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pool = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """tokens [B, M, D], present [B, M] bool -> fused [B, D].

        Rows with no present modality return zeros rather than NaN (attention over an
        empty set is undefined), so a batch may contain them safely.
        """
        empty = ~present.any(dim=1)
        safe = present | empty[:, None]  # attend to something in empty rows, zeroed below
        pad = ~safe
        h = tokens
        for layer in self.mixer:
            h = layer(h, src_key_padding_mask=pad)
        q = self.query.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.pool(q, h, h, key_padding_mask=pad, need_weights=False)
        fused = self.out(pooled.squeeze(1))
        return fused.masked_fill(empty[:, None], 0.0)
