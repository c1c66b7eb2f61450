"""Shift transforms for 2-D grids [n, C, H, W]: image, depth and thermal frames.

A camera at another site sees through other optics and other light: a brighter or
offset response (exposure, a depth offset, emissivity), a softer focus, and a fixed
object in part of its view.  Site parameters are drawn from ``rng`` before any
per-sample draw; see :mod:`fed_iotlm.data.shift_sensor` for the conventions.
"""

from __future__ import annotations

import numpy as np


def brightness(
    x: np.ndarray, rng: np.random.Generator, severity: float, *, layout: str
) -> np.ndarray:
    """Exposure / calibration: one gain in [2^-s, 2^s] and one offset of up to s x the
    site's value std, shared by every pixel and channel."""
    gain = 2.0 ** rng.uniform(-severity, severity)
    std = float(x.astype(np.float64).std()) or 1.0
    offset = rng.uniform(-severity, severity) * std
    return (x * gain + offset).astype(x.dtype)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps over +-3 sigma."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return k / k.sum()


def _convolve_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Same-size convolution along ``axis`` with edge padding, as a sum of shifted views
    (vectorised over every other axis)."""
    r = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="edge")
    size = x.shape[axis]
    out = np.zeros(x.shape, dtype=np.float64)
    for j, w in enumerate(kernel):
        out += w * np.take(padded, np.arange(j, j + size), axis=axis)
    return out


def blur(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    sigma_px: float | None = None,
) -> np.ndarray:
    """Defocus: a Gaussian blur of ``sigma_px`` pixels (default 2 x severity), separable
    over H and W, per channel."""
    sigma = 2.0 * severity if sigma_px is None else float(sigma_px)
    if sigma <= 1e-3:
        return x.copy()
    k = gaussian_kernel(sigma)
    out = _convolve_axis(_convolve_axis(x.astype(np.float64), k, 2), k, 3)
    return out.astype(x.dtype)


def occlusion(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    fill: str | float = "mean",
) -> np.ndarray:
    """A fixed object in the site's view: one rectangle covering ``severity`` of the
    frame (random aspect and position, the same for every sample of the site), filled
    with each sample's channel mean (``fill: mean``) or a constant."""
    h, w = x.shape[2:]
    area = float(np.clip(severity, 0.0, 1.0))
    aspect = float(np.exp(rng.uniform(-0.5, 0.5)))
    oh = int(np.clip(round(h * np.sqrt(area * aspect)), 0, h))
    ow = int(np.clip(round(w * np.sqrt(area / aspect)), 0, w))
    top = int(rng.integers(0, h - oh + 1))
    left = int(rng.integers(0, w - ow + 1))
    out = x.copy()
    if oh == 0 or ow == 0:
        return out
    if fill == "mean":
        value = x.mean(axis=(2, 3), keepdims=True)
    elif isinstance(fill, int | float) and not isinstance(fill, bool):
        value = np.asarray(fill, dtype=x.dtype)
    else:
        raise ValueError(f"fill must be 'mean' or a number, got {fill!r}")
    out[:, :, top : top + oh, left : left + ow] = value
    return out
