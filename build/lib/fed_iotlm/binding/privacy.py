"""What a node may do to its embeddings before they leave it: noise, then int8.

Gaussian noise (σ per coordinate, after L2 normalisation) blurs individual samples;
int8 quantisation with one scale per row cuts the upload 4× and is applied last so the
server receives integers only.  Both are off by default.
"""

from __future__ import annotations

import numpy as np


def add_noise(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Add N(0, σ²) to every coordinate (σ = 0 returns x unchanged)."""
    if sigma < 0:
        raise ValueError(f"binding.noise_sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x
    rng = np.random.default_rng(seed)
    return (x + rng.normal(0.0, sigma, size=x.shape)).astype(np.float32)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: x ≈ q · scale[:, None]; returns (q int8 [N, d], scale [N])."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=1) / 127.0 if x.size else np.zeros(len(x), np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[:, None].astype(np.float32)
