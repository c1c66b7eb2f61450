"""Shift transforms for audio waveforms [n, L] (one site's present samples).

Two things make one room's microphone sound unlike another's: the background it hears
(a colour of noise that is the site's own) and the response of the microphone and its
housing (a fixed equaliser).  Both are drawn per site from ``rng`` before any
per-sample draw; see :mod:`fed_iotlm.data.shift_sensor` for the conventions.
"""

from __future__ import annotations

import numpy as np

from .shift_sensor import noise_scale


def coloured_noise(rng: np.random.Generator, n: int, length: int, exponent: float) -> np.ndarray:
    """[n, length] noise with power spectrum ~ 1/f^``exponent`` (0 white, 1 pink, 2 brown),
    unit RMS per row, no DC."""
    spec = np.fft.rfft(rng.standard_normal((n, length)), axis=1)
    freqs = np.fft.rfftfreq(length)
    shape = np.zeros_like(freqs)
    shape[1:] = freqs[1:] ** (-exponent / 2.0)
    wave = np.fft.irfft(spec * shape[None, :], n=length, axis=1)
    rms = np.sqrt(np.mean(wave**2, axis=1, keepdims=True))
    return wave / np.where(rms > 0, rms, 1.0)


def background(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    snr_db: float | None = None,
    colour: float | None = None,
) -> np.ndarray:
    """The site's background noise: coloured noise (site exponent ``colour``, default
    U(0, 2): from white hiss to brown rumble) at noise RMS = ``severity`` x the
    sample's RMS, or at ``snr_db``."""
    exponent = float(rng.uniform(0.0, 2.0)) if colour is None else float(colour)
    n, length = x.shape
    scale = noise_scale(x, severity, snr_db)
    bg = coloured_noise(rng, n, length, exponent)
    return (x + bg * scale[:, None]).astype(x.dtype)


def eq_filter(
    rng: np.random.Generator, severity: float, taps: int, bands: int, max_gain_db: float
) -> np.ndarray:
    """A random linear-phase FIR equaliser (``taps`` odd): band gains U(-g, g) dB with
    g = ``max_gain_db`` x severity at log-spaced centres, interpolated in log frequency,
    made into an impulse response by frequency sampling and a Hann window.  Severity 0
    gives a centred unit impulse, i.e. no change."""
    if taps < 3 or taps % 2 == 0:
        raise ValueError(f"taps must be an odd number >= 3, got {taps}")
    gains_db = rng.uniform(-1.0, 1.0, size=bands) * max_gain_db * severity
    centres = np.geomspace(0.01, 0.5, bands)  # cycles per sample; 0.5 = Nyquist
    grid = np.fft.rfftfreq(taps)
    log_grid = np.log(np.maximum(grid, centres[0]))
    magnitude = 10.0 ** (np.interp(log_grid, np.log(centres), gains_db) / 20.0)
    h = np.roll(np.fft.irfft(magnitude, n=taps), taps // 2)
    return h * np.hanning(taps + 2)[1:-1]


def channel_response(
    x: np.ndarray,
    rng: np.random.Generator,
    severity: float,
    *,
    layout: str,
    taps: int = 63,
    bands: int = 6,
    max_gain_db: float = 12.0,
) -> np.ndarray:
    """The site's microphone response: one random FIR equaliser (:func:`eq_filter`)
    applied to every sample by FFT convolution, aligned so the signal is not delayed."""
    n, length = x.shape
    h = eq_filter(rng, severity, int(taps), int(bands), float(max_gain_db))
    nfft = 1 << int(np.ceil(np.log2(length + taps - 1)))
    spec = np.fft.rfft(x.astype(np.float64), n=nfft, axis=1) * np.fft.rfft(h, n=nfft)[None, :]
    full = np.fft.irfft(spec, n=nfft, axis=1)
    start = taps // 2
    return full[:, start : start + length].astype(x.dtype)
