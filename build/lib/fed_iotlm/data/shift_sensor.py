"""Shift transforms for time series and generic sensors (one site's present samples).

Each function models one way a site's hardware or placement differs from another's:
a rotated IMU, a miscalibrated gain, a noisier sensor, a slower clock, a broken
channel.  They are pure: they take the samples of ONE site (already restricted to
present samples by :func:`fed_iotlm.data.shift.apply_shifts`), a generator seeded for
that site, and a ``severity``, and return new arrays.  Parameters that describe the
*site* (a rotation, a gain, a dead channel) are drawn from ``rng`` first, before any
per-sample draw, so a site gets the same hardware whatever samples it is called on.

Raw layouts (the exchange format, ``[n]`` axis first):
``sequence`` [n, T, C], ``waveform`` [n, L], ``grid`` [n, C, H, W], ``vector`` [n, D].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LAYOUT_CHANNEL_AXIS: dict[str, int] = {"sequence": 2, "grid": 1, "vector": 1}


# ----------------------------------------------------------------------------- helpers


def as_sequence(x: np.ndarray, layout: str) -> np.ndarray:
    """A view [n, T, C] of a sequence or waveform, so time-axis code is written once."""
    return x[:, :, None] if layout == "waveform" else x


def from_sequence(y: np.ndarray, layout: str) -> np.ndarray:
    """Undo :func:`as_sequence`."""
    return y[:, :, 0] if layout == "waveform" else y


def interp_time(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``x`` [n, T, C] at fractional time positions.

    ``pos`` is [P] (shared by every sample) or [n, P] (per sample); positions outside
    [0, T-1] are clamped, like :func:`numpy.interp`.  Vectorised over samples, which
    ``np.interp`` (1-D only) is not.
    """
    t = x.shape[1]
    pos = np.clip(np.asarray(pos, dtype=np.float64), 0.0, t - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, t - 1)
    frac = (pos - lo).astype(x.dtype)
    if pos.ndim == 1:
        return x[:, lo] * (1 - frac)[None, :, None] + x[:, hi] * frac[None, :, None]
    a = np.take_along_axis(x, lo[:, :, None], axis=1)
    b = np.take_along_axis(x, hi[:, :, None], axis=1)
    return a * (1 - frac)[:, :, None] + b * frac[:, :, None]


def sample_rms(x: np.ndarray) -> np.ndarray:
    """Root-mean-square of each sample over all its values, [n]."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    return np.sqrt(np.mean(flat**2, axis=1))


def noise_scale(x: np.ndarray, severity: float, snr_db: float | None) -> np.ndarray:
    """Per-sample noise RMS [n]: ``snr_db`` if given, else ``severity`` x the signal RMS
    (so severity 0.1 is 20 dB SNR and 1.0 is 0 dB)."""
    rms = sample_rms(x)
    if snr_db is not None:
        return rms * 10.0 ** (-float(snr_db) / 20.0)
    return rms * float(severity)


def _channel_std(x: np.ndarray, layout: str) -> np.ndarray:
    """Per-channel std of the site's samples, broadcastable to ``x``; 1 where it is 0,
    so offsets are in the data's own units without dividing by zero."""
    axis = LAYOUT_CHANNEL_AXIS.get(layout)
    axes = tuple(a for a in range(x.ndim) if a != axis)
    std = x.astype(np.float64).std(axis=axes, keepdims=True)
    return np.where(std > 0, std, 1.0)


def random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A 3x3 rotation about a uniformly random axis by an angle in [0, ``max_angle``]
    (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(0.0, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


# -------------------------------------------------------------------------- transforms


def rotation(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    triplets: Sequence[Sequence[int]] | None = None,
    max_angle_deg: float | None = None,
) -> np.ndarray:
    """Sensor placement: one random 3-D rotation applied to every xyz channel triplet.

    The same rotation turns every triplet (accelerometer, gyroscope, magnetometer of
    one rigid IMU move together).  The angle is at most ``severity`` x 180 degrees, or
    ``max_angle_deg``.  Triplets default to consecutive channels (0,1,2), (3,4,5), ...,
    which needs C to be a multiple of 3; other layouts name them with ``triplets``.
    Rotation preserves the norm of each triplet at each time step.
    """
    c = x.shape[2]
    if triplets is None:
        if c % 3:
            raise ValueError(
                f"has {c} channels, not a multiple of 3; name the xyz channel triplets "
                "with triplets: [[i, j, k], ...]"
            )
        triplets = [list(range(i, i + 3)) for i in range(0, c, 3)]
    for trip in triplets:
        if len(trip) != 3 or not all(0 <= int(i) < c for i in trip):
            raise ValueError(f"triplet {list(trip)} must be 3 channel indices in [0, {c - 1}]")
    max_angle = np.deg2rad(max_angle_deg) if max_angle_deg is not None else severity * np.pi
    rot = random_rotation(rng, float(max_angle)).astype(x.dtype)
    out = x.copy()
    for trip in triplets:
        idx = [int(i) for i in trip]
        out[:, :, idx] = x[:, :, idx] @ rot.T
    return out


def gain_bias(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    drift: float = 0.0,
) -> np.ndarray:
    """Calibration: per-channel gain in [2^-s, 2^s], offset up to s x the channel's std,
    and (sequences, ``drift`` > 0) a linear offset ramp over the window of up to
    ``drift`` x s x std.  Audio gets the gain only: a microphone's offset is filtered
    out by any real front end, its sensitivity is not."""
    axis = LAYOUT_CHANNEL_AXIS.get(layout)
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = x.shape[axis]
    gain = 2.0 ** rng.uniform(-severity, severity, size=shape)
    if layout == "waveform":
        return (x * gain).astype(x.dtype)
    std = _channel_std(x, layout)
    bias = rng.uniform(-severity, severity, size=shape) * std
    out = x * gain + bias
    if drift and layout == "sequence":
        ramp = np.linspace(0.0, 1.0, x.shape[1])[None, :, None]
        slope = rng.uniform(-1.0, 1.0, size=shape) * drift * severity * std
        out = out + ramp * slope
    return out.astype(x.dtype)


def noise(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    snr_db: float | None = None,
) -> np.ndarray:
    """A noisier sensor: white Gaussian noise at a per-sample SNR.

    Noise RMS = ``severity`` x the sample's RMS (SNR = -20 log10(severity) dB), or the
    fixed ``snr_db``.  Signal power is the mean square of the whole sample, offsets
    included, which is the usual definition.
    """
    scale = noise_scale(x, severity, snr_db)
    eps = rng.standard_normal(x.shape)
    return (x + eps * scale.reshape((-1,) + (1,) * (x.ndim - 1))).astype(x.dtype)


def resample(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    rate_factor: float | None = None,
) -> np.ndarray:
    """Sampling-rate mismatch: the site's sensor samples at ``rate_factor`` x the
    nominal rate (default 1 - severity x U(0.5, 1)), the samples are held (no
    anti-alias filter, as in cheap sensors) and linearly interpolated back to the
    nominal length.  High frequencies are lost or aliased; the length is unchanged."""
    seq = as_sequence(x, layout)
    t = seq.shape[1]
    if rate_factor is None:
        rate_factor = 1.0 - severity * rng.uniform(0.5, 1.0)
    if rate_factor <= 0:
        raise ValueError(f"rate_factor must be positive, got {rate_factor}")
    m = int(np.clip(round(t * rate_factor), 2, max(t, 2)))
    if m >= t:
        return x.copy()
    held = seq[:, np.round(np.linspace(0, t - 1, m)).astype(np.int64)]
    back = interp_time(held, np.arange(t) * (m - 1) / max(t - 1, 1))
    return from_sequence(back, layout).astype(x.dtype)


def time_warp(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    knots: int = 4,
) -> np.ndarray:
    """Timing variation: each sample is re-timed along a smooth random monotone path.

    Speeds at ``knots`` + 2 evenly spaced points are exp(N(0, severity)); their
    interpolated cumulative sum, rescaled to the window, gives the new time positions
    (Um et al., 2017).  Endpoints stay fixed, so the window keeps its span."""
    seq = as_sequence(x, layout)
    n, t = seq.shape[:2]
    if t < 2:
        return x.copy()
    speed = np.exp(rng.normal(0.0, severity, size=(n, knots + 2, 1)))
    speed_t = interp_time(speed, np.arange(t) * (knots + 1) / (t - 1))[:, :, 0]
    path = np.cumsum(speed_t, axis=1)
    path = (path - path[:, :1]) / (path[:, -1:] - path[:, :1]) * (t - 1)
    return from_sequence(interp_time(seq, path), layout).astype(x.dtype)


DROPOUT_MODES: tuple[str, ...] = ("span", "channel", "modality")


def dropout(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    mode: str = "span",
    spans: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Sensor degradation: zero parts of the signal; returns (values, fully dropped [n]).

    - ``span``: per sample, ``spans`` time spans covering ``severity`` of the window
      (sequences and audio).
    - ``channel``: per site, each channel is dead with probability ``severity``.
    - ``modality``: each sample loses the whole modality with probability ``severity``.

    A sample whose every value was dropped is reported in the second array, so the
    caller sets its mask False: a missing modality is a False mask, never a present
    sample of zeros.
    """
    n = x.shape[0]
    out = x.copy()
    if mode == "modality":
        dropped = rng.random(n) < severity
        out[dropped] = 0.0
        return out, dropped
    if mode == "channel":
        axis = LAYOUT_CHANNEL_AXIS.get(layout)
        if axis is None:
            raise ValueError(f"mode 'channel' needs a channel axis; layout {layout!r} has none")
        dead = rng.random(x.shape[axis]) < severity
        index = [slice(None)] * x.ndim
        index[axis] = dead
        out[tuple(index)] = 0.0
        return out, np.full(n, bool(dead.all()))
    if mode == "span":
        if layout not in ("sequence", "waveform"):
            raise ValueError(f"mode 'span' needs a time axis; layout {layout!r} has none")
        seq = as_sequence(out, layout)
        t = seq.shape[1]
        total = int(round(min(severity, 1.0) * t))
        if total == 0:
            return out, np.zeros(n, dtype=bool)
        length = int(np.ceil(total / max(int(spans), 1)))
        starts = rng.integers(0, t - length + 1, size=(n, max(int(spans), 1)))
        steps = np.arange(t)
        hit = (
            (steps[None, None, :] >= starts[:, :, None])
            & (steps[None, None, :] < starts[:, :, None] + length)
        ).any(axis=1)  # [n, T]
        seq[hit] = 0.0
        return out, hit.all(axis=1)
    raise ValueError(f"unknown dropout mode {mode!r}; choose one of {list(DROPOUT_MODES)}")
