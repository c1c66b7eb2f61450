"""Default preprocessing per modality kind.

Two steps, deliberately separated:

* :func:`featurize` is stateless (audio waveform -> log-mel sequence); it can run
  anywhere, once, because it learns nothing from the data.
* :class:`Standardizer` learns per-channel statistics.  Each node fits it on *its own*
  training data only, so no statistic of another node's data ever reaches it.  An
  evaluation set is treated the same way as a new site: it standardises with its own
  statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .dataset import MultisensoryDataset, Split
from .modalities import ModalitySpec

DEFAULT_AUDIO_RATE_HZ = 16_000.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, rate_hz: float) -> np.ndarray:
    """Triangular mel filters [n_fft // 2 + 1, n_mels] (HTK mel scale, no normalisation)."""
    n_freqs = n_fft // 2 + 1
    freqs = np.linspace(0.0, rate_hz / 2.0, n_freqs)
    mel_points = np.linspace(
        _hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(rate_hz / 2)), n_mels + 2
    )
    hz_points = _mel_to_hz(mel_points)
    lower, centre, upper = hz_points[:-2], hz_points[1:-1], hz_points[2:]
    up = (freqs[:, None] - lower[None, :]) / np.maximum(centre - lower, 1e-9)[None, :]
    down = (upper[None, :] - freqs[:, None]) / np.maximum(upper - centre, 1e-9)[None, :]
    return np.clip(np.minimum(up, down), 0.0, None).astype(np.float32)


@dataclass(frozen=True)
class LogMelConfig:
    """STFT/mel settings; ``n_fft`` defaults to ~32 ms of signal, a power of two."""

    n_mels: int = 32
    n_fft: int | None = None
    hop_fraction: float = 0.5

    def resolve_n_fft(self, rate_hz: float, length: int) -> int:
        if self.n_fft is not None:
            return self.n_fft
        target = max(64, int(rate_hz * 0.032))
        n_fft = 2 ** int(round(math.log2(target)))
        return int(min(n_fft, 2 ** int(math.log2(max(length, 2)))))


def log_mel(
    waveforms: np.ndarray, rate_hz: float, cfg: LogMelConfig = LogMelConfig()
) -> np.ndarray:
    """Batch log-mel spectrogram [N, L] -> [N, frames, n_mels] with ``torch.stft``."""
    n_fft = cfg.resolve_n_fft(rate_hz, waveforms.shape[1])
    hop = max(1, int(n_fft * cfg.hop_fraction))
    wave = torch.from_numpy(np.ascontiguousarray(waveforms, dtype=np.float32))
    spec = torch.stft(
        wave,
        n_fft=n_fft,
        hop_length=hop,
        window=torch.hann_window(n_fft),
        center=True,
        return_complex=True,
    )  # [N, freqs, frames]
    power = spec.abs().pow(2.0)
    fb = torch.from_numpy(mel_filterbank(n_fft, cfg.n_mels, rate_hz))
    mel = torch.einsum("nft,fm->ntm", power, fb)
    return torch.log(mel + 1e-6).numpy().astype(np.float32)


def featurize(spec: ModalitySpec, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Stateless per-kind features; missing samples stay exactly zero."""
    if spec.kind == "audio":
        feats = log_mel(x, spec.rate_hz or DEFAULT_AUDIO_RATE_HZ)
    else:
        feats = x.astype(np.float32, copy=False)
    feats = np.where(_expand(mask, feats.ndim), feats, 0.0).astype(np.float32)
    return feats


def featurize_split(split: Split, specs: dict[str, ModalitySpec]) -> Split:
    """Featurize every modality of a split."""
    x = {m: featurize(specs[m], arr, split.mask[m]) for m, arr in split.x.items()}
    return replace(split, x=x)


def featurize_dataset(ds: MultisensoryDataset) -> MultisensoryDataset:
    """Featurize both splits of a dataset (stateless, so it may run before partitioning)."""
    specs = ds.meta.modalities
    return MultisensoryDataset(
        ds.meta, featurize_split(ds.train, specs), featurize_split(ds.test, specs)
    )


def _expand(mask: np.ndarray, ndim: int) -> np.ndarray:
    return mask.reshape(mask.shape + (1,) * (ndim - 1))


def _channel_axes(ndim: int) -> tuple[int, ...]:
    """Axes reduced for per-channel statistics: sequence [N,T,C] -> (0,1), grid
    [N,C,H,W] -> (0,2,3), vector [N,D] -> (0,)."""
    if ndim == 3:
        return (0, 1)
    if ndim == 4:
        return (0, 2, 3)
    return (0,)


@dataclass
class Standardizer:
    """Per-channel mean/std per modality, fitted on present samples of ONE node's data."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]

    @classmethod
    def fit(cls, split: Split, eps: float = 1e-6) -> Standardizer:
        mean: dict[str, np.ndarray] = {}
        std: dict[str, np.ndarray] = {}
        for m, arr in split.x.items():
            present = arr[split.mask[m]]
            axes = _channel_axes(arr.ndim)
            keep = tuple(1 if a in axes else s for a, s in enumerate(arr.shape))
            if present.shape[0] == 0:
                mean[m] = np.zeros(keep, dtype=np.float32)
                std[m] = np.ones(keep, dtype=np.float32)
                continue
            mean[m] = present.mean(axis=axes, keepdims=True).astype(np.float32)
            std[m] = np.maximum(present.std(axis=axes, keepdims=True), eps).astype(np.float32)
        return cls(mean, std)

    def transform(self, split: Split) -> Split:
        x = {}
        for m, arr in split.x.items():
            z = (arr - self.mean[m]) / self.std[m]
            x[m] = np.where(_expand(split.mask[m], arr.ndim), z, 0.0).astype(np.float32)
        return replace(split, x=x)


def standardize_own(split: Split) -> Split:
    """Standardise a split with statistics fitted on itself (a node's or a site's rule)."""
    return Standardizer.fit(split).transform(split)
