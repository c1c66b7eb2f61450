"""Representation similarity between two sets of embeddings: linear CKA and RBF-MMD.

Both are vectorised torch (a few matrix products on [n, d] embeddings), so they cost
nothing next to a training round.

* Linear CKA (Kornblith et al., 2019) compares two representations of the SAME
  samples (rows paired): 1 = identical up to rotation and isotropic scale, 0 =
  unrelated.  Used on one probe set shifted as two different sites.
* MMD with an RBF kernel compares two distributions (rows need not be paired):
  0 = the same distribution.  The bandwidth follows the median heuristic on the
  pooled sample, so the figure is comparable across modalities and models whose
  embeddings have different scales.  The biased (V-statistic) estimate is reported:
  it is >= 0 and exactly 0 for identical sets, which keeps "no shift" at exactly 0.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    return t.to(torch.float64).reshape(t.shape[0], -1)


def linear_cka(x: ArrayLike, y: ArrayLike) -> float:
    """Linear CKA of paired representations ``x`` [n, d1] and ``y`` [n, d2]."""
    a, b = _as_tensor(x), _as_tensor(y)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"linear CKA needs paired rows, got {a.shape[0]} and {b.shape[0]}")
    a, b = a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(b.T @ a) ** 2
    norm = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    if float(norm) == 0.0:  # a constant representation carries no structure to compare
        return float("nan")
    return float(cross / norm)


def median_bandwidth(sq_dists: torch.Tensor) -> float:
    """Median heuristic: sigma^2 = median of the positive pairwise squared distances / 2
    (so the kernel is exp(-d^2 / median d^2)); 1 when every point coincides."""
    pos = sq_dists[sq_dists > 0]
    return float(pos.median()) / 2.0 if pos.numel() else 1.0


def rbf_mmd2(x: ArrayLike, y: ArrayLike, sigma2: float | None = None) -> float:
    """Biased MMD^2 between samples ``x`` [n, d] and ``y`` [m, d] with an RBF kernel
    exp(-||u - v||^2 / (2 sigma^2)); ``sigma2`` defaults to the median heuristic."""
    a, b = _as_tensor(x), _as_tensor(y)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return float("nan")
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).pow(2)
    s2 = median_bandwidth(d2) if sigma2 is None else float(sigma2)
    k = torch.exp(-d2 / (2.0 * s2))
    n = a.shape[0]
    kxx, kyy, kxy = k[:n, :n].mean(), k[n:, n:].mean(), k[:n, n:].mean()
    return float(torch.clamp(kxx + kyy - 2.0 * kxy, min=0.0))
