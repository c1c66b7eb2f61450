"""One small encoder per feature layout, each mapping a modality to the shared width.

Kinds share a layout (imu, timeseries and audio log-mel are all sequences), so three
families cover every kind in the registry.  Each encoder also owns a learned
*modality token*: it is added to its output so the fusion can tell modalities apart,
and it lives in the encoder's parameter group, so it is aggregated only over the nodes
that hold that modality.
"""

from __future__ import annotations

import torch
from torch import nn

from fed_iotlm.data.modalities import ModalitySpec


class SequenceEncoder(nn.Module):
    """[B, T, C] -> [B, D]: temporal convolutions, then mean+max pooling over time."""

    def __init__(self, channels: int, dim: int, hidden: int = 48) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(channels, hidden, 5, padding=2),
            nn.GELU(),
            nn.Conv1d(hidden, hidden, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv1d(hidden, hidden, 3, padding=1),
            nn.GELU(),
        )
        self.proj = nn.Linear(2 * hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x.transpose(1, 2))  # [B, hidden, T']
        return self.proj(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))


class GridEncoder(nn.Module):
    """[B, C, H, W] -> [B, D]: a small CNN that keeps a coarse 2x2 spatial layout."""

    def __init__(self, channels: int, dim: int, hidden: int = 24) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.proj = nn.Linear(4 * hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.net(x).flatten(1))


class VectorEncoder(nn.Module):
    """[B, D_in] -> [B, D]: a two-layer MLP for tabular and GPS features."""

    def __init__(self, features: int, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ModalityEncoder(nn.Module):
    """A layout encoder plus the modality token and a LayerNorm on the shared width."""

    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.token = nn.Parameter(torch.randn(dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.backbone(x)) + self.token


def build_encoder(spec: ModalitySpec, feature_shape: tuple[int, ...], dim: int) -> ModalityEncoder:
    """Encoder for one modality given the shape of ONE preprocessed sample."""
    if spec.layout == "sequence":
        backbone: nn.Module = SequenceEncoder(feature_shape[-1], dim)
    elif spec.layout == "grid":
        backbone = GridEncoder(feature_shape[0], dim)
    else:
        backbone = VectorEncoder(feature_shape[0], dim)
    return ModalityEncoder(backbone, dim)
