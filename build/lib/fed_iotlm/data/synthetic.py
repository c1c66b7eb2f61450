"""A seeded synthetic multisensory dataset in which fusion matters.

Two tasks, as IoT-LM is multitask:

* ``activity`` (8 classes): the class index is three latent bits (b0, b1, b2).
* ``location`` (4 classes): two latent bits (l0, l1).

Each modality carries only some bits, so no single modality can solve a task:

=========  ======  ================================  ============
modality   kind    activity bits                      location bits
=========  ======  ================================  ============
imu        imu     b0 (cadence), b1 (dominant axis)  --
audio      audio   b1 (low tone), b2 (high tone)     l0 (noise colour)
depth      depth   b0 (blob side), b2 (blob size)    l1 (floor slope)
thermal    thermal b0 (body heat)                    l0, l1 (room heat map)
=========  ======  ================================  ============

Any two of imu/audio/depth recover all three activity bits; imu alone reaches at best
4 of 8 classes.  ``imu_cues`` > 0 makes IMU *descriptive but imperfect* — it then also
carries weak, noisy cues of b2 and of both location bits — which is MMBind's premise for
a binding modality (``configs/experiment/mmbind_study.yaml``).  Samples belong to ``num_sites`` sites; ``site_shift`` in [0, 1] scales
per-site sensor rotation, gains, offsets and noise (domain shift between sites).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import DatasetMeta, MultisensoryDataset, Split
from .modalities import ModalitySpec, TaskSpec

ACTIVITY_CLASSES = (
    "sitting",
    "standing",
    "walking",
    "running",
    "cycling",
    "stairs",
    "cooking",
    "cleaning",
)
LOCATION_CLASSES = ("kitchen", "office", "corridor", "gym")

IMU_RATE_HZ = 32.0
AUDIO_RATE_HZ = 8000.0


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; all defaults give the demo dataset."""

    num_train: int = 4000
    num_test: int = 1000
    num_sites: int = 8
    site_shift: float = 0.3
    noise: float = 1.0
    imu_len: int = 64
    audio_len: int = 2048
    depth_size: int = 16
    thermal_size: int = 12
    imu_cues: float = 0.0  # > 0: IMU also carries weak cues of b2 and of location
    seed: int = 0


def _site_params(cfg: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-site nuisance parameters; ``site_shift`` = 0 makes every site identical."""
    s, k = cfg.site_shift, cfg.num_sites
    angles = rng.uniform(-np.pi / 2, np.pi / 2, size=(k, 3)) * s
    return {
        "rotation": np.stack([_rotation(a) for a in angles]).astype(np.float32),
        "imu_gain": np.exp(rng.normal(0, 0.3 * s, size=k)),
        "audio_gain": np.exp(rng.normal(0, 0.5 * s, size=k)),
        "audio_bg": 1.0 + s * rng.uniform(0, 1.5, size=k),
        "depth_offset": rng.normal(0, 0.8 * s, size=k),
        "thermal_gain": np.exp(rng.normal(0, 0.3 * s, size=k)),
        "noise": 1.0 + s * rng.uniform(0, 1.0, size=k),
    }


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _imu(
    bits: np.ndarray, loc: np.ndarray, site: np.ndarray, p: dict, cfg: SyntheticConfig, rng
) -> np.ndarray:
    """Accelerometer + gyroscope [N, T, 6]: cadence encodes b0, dominant axis encodes b1;
    with ``imu_cues`` > 0 also weak cues of b2 and of the location bits."""
    n, t = bits.shape[0], np.arange(cfg.imu_len) / IMU_RATE_HZ
    freq = np.where(bits[:, 0] == 1, 2.6, 1.2) + rng.normal(0, 0.15, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    wave = np.sin(2 * np.pi * freq[:, None] * t[None, :] + phase[:, None])  # [N, T]
    amp = rng.uniform(0.7, 1.3, n)[:, None]
    axis_x = (bits[:, 1] == 1)[:, None]
    acc = np.zeros((n, cfg.imu_len, 3))
    acc[:, :, 0] = np.where(axis_x, 1.0, 0.25) * amp * wave
    acc[:, :, 1] = 0.3 * amp * np.roll(wave, 3, axis=1)
    acc[:, :, 2] = 1.0 + np.where(axis_x, 0.25, 1.0) * amp * wave
    gyro = np.zeros_like(acc)
    gyro[:, :, 0] = (
        np.where(axis_x, 0.2, 0.8) * amp * np.cos(2 * np.pi * freq[:, None] * t[None, :])
    )
    gyro[:, :, 2] = (
        np.where(axis_x, 0.8, 0.2) * amp * np.cos(2 * np.pi * freq[:, None] * t[None, :])
    )
    if cfg.imu_cues > 0:  # weak extra cues: slow sway (b2) and floor-dependent tilt (l0, l1)
        sway = np.sin(2 * np.pi * 0.4 * t[None, :] + phase[:, None])
        acc[:, :, 1] += (
            cfg.imu_cues * np.where(bits[:, 2] == 1, 0.8, -0.8)[:, None] * (0.5 + 0.5 * sway)
        )
        acc[:, :, 0] += cfg.imu_cues * 0.6 * np.where(loc[:, 0] == 1, 1.0, -1.0)[:, None]
        gyro[:, :, 1] += cfg.imu_cues * 0.6 * np.where(loc[:, 1] == 1, 1.0, -1.0)[:, None]
    rot = p["rotation"][site]  # [N, 3, 3] sensor placement
    acc = np.einsum("nij,ntj->nti", rot, acc) * p["imu_gain"][site][:, None, None]
    gyro = np.einsum("nij,ntj->nti", rot, gyro)
    x = np.concatenate([acc, gyro], axis=2)
    noise = 0.9 * cfg.noise * p["noise"][site][:, None, None]
    return x + rng.normal(0, 1, x.shape) * noise


def _audio(bits: np.ndarray, loc: np.ndarray, site: np.ndarray, p: dict, cfg, rng) -> np.ndarray:
    """Waveform [N, L]: low tone encodes b1, high tone encodes b2, noise colour encodes l0."""
    n, t = bits.shape[0], np.arange(cfg.audio_len) / AUDIO_RATE_HZ
    f_low = np.where(bits[:, 1] == 1, 700.0, 350.0) * rng.uniform(0.95, 1.05, n)
    f_high = np.where(bits[:, 2] == 1, 2600.0, 1700.0) * rng.uniform(0.95, 1.05, n)
    a_low, a_high = rng.uniform(0.5, 1.0, n), rng.uniform(0.3, 0.8, n)
    tones = a_low[:, None] * np.sin(2 * np.pi * f_low[:, None] * t) + a_high[:, None] * np.sin(
        2 * np.pi * f_high[:, None] * t + rng.uniform(0, 6.3, n)[:, None]
    )
    white = rng.normal(0, 1, (n, cfg.audio_len))
    brown = np.cumsum(white, axis=1)
    brown = (brown - brown.mean(axis=1, keepdims=True)) / (brown.std(axis=1, keepdims=True) + 1e-6)
    background = np.where((loc[:, 0] == 1)[:, None], brown, white)
    level = 2.0 * cfg.noise * p["audio_bg"][site][:, None]
    wave = (tones + level * background) * p["audio_gain"][site][:, None]
    return wave


def _blobs(size: int, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    grid = np.arange(size)
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    return np.exp(-(dx**2 + dy**2) / (2 * radius[:, None, None] ** 2))


def _depth(bits: np.ndarray, loc: np.ndarray, site: np.ndarray, p: dict, cfg, rng) -> np.ndarray:
    """Depth map [N, 1, S, S]: blob side encodes b0, blob size encodes b2, floor slope l1."""
    n, s = bits.shape[0], cfg.depth_size
    cx = np.where(bits[:, 0] == 1, 0.72, 0.28) * s + rng.normal(0, 0.08 * s, n)
    cy = rng.uniform(0.35, 0.65, n) * s
    radius = np.where(bits[:, 2] == 1, 0.22, 0.1) * s * rng.uniform(0.85, 1.15, n)
    person = -1.5 * _blobs(s, cx, cy, radius)
    ramp = np.linspace(-1, 1, s)
    slope = np.where((loc[:, 1] == 1)[:, None, None], ramp[None, :, None], ramp[None, None, :])
    depth = 3.0 + 0.8 * slope + person + p["depth_offset"][site][:, None, None]
    noise = 0.7 * cfg.noise * p["noise"][site][:, None, None]
    depth = depth + rng.normal(0, 1, depth.shape) * noise
    return depth[:, None, :, :]


def _thermal(bits: np.ndarray, loc: np.ndarray, site: np.ndarray, p: dict, cfg, rng) -> np.ndarray:
    """Thermal frame [N, 1, S, S]: warm wall side encodes l0/l1, body heat encodes b0."""
    n, s = bits.shape[0], cfg.thermal_size
    ramp = np.linspace(-1, 1, s)
    vertical = np.where((loc[:, 0] == 1)[:, None, None], 1, -1) * ramp[None, :, None]
    horizontal = np.where((loc[:, 1] == 1)[:, None, None], 1, -1) * ramp[None, None, :]
    room = 20.0 + 0.3 * vertical + 0.3 * horizontal
    cx, cy = rng.uniform(0.3, 0.7, n) * s, rng.uniform(0.3, 0.7, n) * s
    heat = np.where(bits[:, 0] == 1, 2.2, 1.0) * rng.uniform(0.8, 1.2, n)
    body = heat[:, None, None] * _blobs(s, cx, cy, np.full(n, 0.15 * s))
    frame = (room + body) * p["thermal_gain"][site][:, None, None]
    noise = 1.0 * cfg.noise * p["noise"][site][:, None, None]
    frame = frame + rng.normal(0, 1, frame.shape) * noise
    return frame[:, None, :, :]


def _split(n: int, cfg: SyntheticConfig, params: dict, rng: np.random.Generator) -> Split:
    activity = rng.integers(0, len(ACTIVITY_CLASSES), n)
    location = rng.integers(0, len(LOCATION_CLASSES), n)
    site = rng.integers(0, cfg.num_sites, n)
    bits = np.stack([(activity >> i) & 1 for i in range(3)], axis=1)
    loc = np.stack([(location >> i) & 1 for i in range(2)], axis=1)
    x = {
        "imu": _imu(bits, loc, site, params, cfg, rng),
        "audio": _audio(bits, loc, site, params, cfg, rng),
        "depth": _depth(bits, loc, site, params, cfg, rng),
        "thermal": _thermal(bits, loc, site, params, cfg, rng),
    }
    x = {m: v.astype(np.float32) for m, v in x.items()}
    return Split(
        x=x,
        mask={m: np.ones(n, dtype=bool) for m in x},
        y={"activity": activity.astype(np.int64), "location": location.astype(np.int64)},
        site=site.astype(np.int64),
        subject=rng.integers(0, 4 * cfg.num_sites, n).astype(np.int64),
    )


def synthetic_meta() -> DatasetMeta:
    """The synthetic dataset's meta (what its meta.json would say)."""
    return DatasetMeta(
        name="synthetic-multisensory",
        modalities={
            "imu": ModalitySpec("imu", "imu", IMU_RATE_HZ, ("ax", "ay", "az", "gx", "gy", "gz")),
            "audio": ModalitySpec("audio", "audio", AUDIO_RATE_HZ, ("mic",)),
            "depth": ModalitySpec("depth", "depth", None, ("depth",)),
            "thermal": ModalitySpec("thermal", "thermal", None, ("temp",)),
        },
        tasks={
            "activity": TaskSpec("activity", ACTIVITY_CLASSES),
            "location": TaskSpec("location", LOCATION_CLASSES),
        },
    )


def make_synthetic(cfg: SyntheticConfig = SyntheticConfig()) -> MultisensoryDataset:
    """Generate the dataset; the same config always yields the same arrays."""
    rng = np.random.default_rng(cfg.seed)
    params = _site_params(cfg, rng)
    train = _split(cfg.num_train, cfg, params, rng)
    test = _split(cfg.num_test, cfg, params, rng)
    return MultisensoryDataset(synthetic_meta(), train, test)
