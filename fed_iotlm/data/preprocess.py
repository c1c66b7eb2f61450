"""Default preprocessing per modality kind.

Two steps, deliberately separated:

* :func:`featurize` is stateless (audio waveform -> log-mel sequence); it can run
  anywhere, once, because it learns nothing from the data.
* :class:`Standardizer` learns per-channel statistics from TRAINING data only.  By
  default (``normalization=federated``) they are the federation's pooled statistics:
  each node sends per-channel sums, sums of squares and counts (:class:`ChannelSums`,
  summed over the nodes that hold a modality like any parameter group, so secure
  aggregation could compute them), and every node, a new site and the global
  validation/test reference sets use the result.  No evaluation set is ever
  standardised with its own statistics unless asked: ``normalization=per_site`` is a
  named test-time adaptation (each node its own training statistics, each site of a
  reference set its own statistics; transductive), off by default.
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
    """Featurize every split of a dataset (stateless, so it may run before partitioning)."""
    specs = ds.meta.modalities
    return MultisensoryDataset(
        ds.meta,
        featurize_split(ds.train, specs),
        featurize_split(ds.test, specs),
        None if ds.val is None else featurize_split(ds.val, specs),
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
        """``split`` standardised; a modality no statistics cover (held by no training
        node) is left on its raw scale rather than refused: its encoder never trained."""
        x = {}
        for m, arr in split.x.items():
            if m not in self.mean:
                x[m] = np.where(_expand(split.mask[m], arr.ndim), arr, 0.0).astype(np.float32)
                continue
            z = (arr - self.mean[m]) / self.std[m]
            x[m] = np.where(_expand(split.mask[m], arr.ndim), z, 0.0).astype(np.float32)
        return replace(split, x=x)


def standardize_own(split: Split) -> Split:
    """Standardise a split with statistics fitted on itself: transductive, so only for
    the named test-time adaptation (:func:`standardize_per_site`) and data with no
    training statistics at all (a question about one sample in ``fed-iotlm ask``)."""
    return Standardizer.fit(split).transform(split)


def standardize_per_site(split: Split, sites: np.ndarray | None) -> Split:
    """Test-time adaptation ``normalization=per_site``: every site's samples are
    standardised with that site's own statistics (the whole split if ``sites`` is None).
    It cancels a site's gain/offset shift by looking at its test data; reported as such."""
    if sites is None:
        return standardize_own(split)
    out = {m: np.zeros_like(v, dtype=np.float32) for m, v in split.x.items()}
    for site in np.unique(sites):
        idx = np.flatnonzero(sites == site)
        part = standardize_own(split.subset(idx))
        for m in out:
            out[m][idx] = part.x[m]
    return replace(split, x=out)


@dataclass
class ChannelSums:
    """Per-channel sum, sum of squares and count of one or more nodes' training data.

    What a node sends in the statistics round: additive, so the server (or secure
    aggregation) only ever needs the sum over the nodes that hold a modality.  float64,
    so sums over many nodes do not lose the variance to cancellation."""

    total: dict[str, np.ndarray]
    squares: dict[str, np.ndarray]
    count: dict[str, float]

    @classmethod
    def of(cls, split: Split) -> ChannelSums:
        total, squares, count = {}, {}, {}
        for m, arr in split.x.items():
            present = arr[split.mask[m]].astype(np.float64)
            if present.shape[0] == 0:
                continue  # a node without this modality sends nothing for it
            axes = _channel_axes(arr.ndim)
            total[m] = present.sum(axis=axes, keepdims=True)
            squares[m] = np.square(present).sum(axis=axes, keepdims=True)
            count[m] = float(present.size / total[m].size)
        return cls(total, squares, count)

    def __add__(self, other: ChannelSums) -> ChannelSums:
        total, squares, count = dict(self.total), dict(self.squares), dict(self.count)
        for m in other.total:
            if m in total:
                total[m] = total[m] + other.total[m]
                squares[m] = squares[m] + other.squares[m]
                count[m] = count[m] + other.count[m]
            else:
                total[m], squares[m], count[m] = other.total[m], other.squares[m], other.count[m]
        return ChannelSums(total, squares, count)

    def standardizer(self, eps: float = 1e-6) -> Standardizer:
        """Mean and std per channel of the pooled data these sums describe."""
        mean, std = {}, {}
        for m, n in self.count.items():
            mu = self.total[m] / n
            var = np.maximum(self.squares[m] / n - np.square(mu), 0.0)
            mean[m] = mu.astype(np.float32)
            std[m] = np.maximum(np.sqrt(var), eps).astype(np.float32)
        return Standardizer(mean, std)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for the wire: ``sum.<m>``, ``sumsq.<m>``, ``count.<m>``."""
        out: dict[str, np.ndarray] = {}
        for m in self.total:
            out[f"sum.{m}"] = self.total[m]
            out[f"sumsq.{m}"] = self.squares[m]
            out[f"count.{m}"] = np.array([self.count[m]], dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ChannelSums:
        """Inverse of :meth:`to_arrays`; a reply missing a key is named in the error."""
        total, squares, count = {}, {}, {}
        for key, value in arrays.items():
            kind, _, m = key.partition(".")
            if kind != "sum":
                continue
            for need in (f"sumsq.{m}", f"count.{m}"):
                if need not in arrays:
                    raise ValueError(f"statistics reply has {key} but no {need}")
            total[m] = np.asarray(value, dtype=np.float64)
            squares[m] = np.asarray(arrays[f"sumsq.{m}"], dtype=np.float64)
            count[m] = float(np.asarray(arrays[f"count.{m}"]).reshape(-1)[0])
        return cls(total, squares, count)


def standardizer_to_arrays(scaler: Standardizer) -> dict[str, np.ndarray]:
    """``mean.<m>``/``std.<m>`` arrays: how the pooled statistics travel to the nodes."""
    out = {f"mean.{m}": v for m, v in scaler.mean.items()}
    out.update({f"std.{m}": v for m, v in scaler.std.items()})
    return out


def standardizer_from_arrays(arrays: dict[str, np.ndarray]) -> Standardizer:
    mean = {k[5:]: np.asarray(v, np.float32) for k, v in arrays.items() if k.startswith("mean.")}
    std = {k[4:]: np.asarray(v, np.float32) for k, v in arrays.items() if k.startswith("std.")}
    if set(mean) != set(std):
        raise ValueError(f"normalisation arrays: means for {sorted(mean)}, stds for {sorted(std)}")
    return Standardizer(mean, std)
