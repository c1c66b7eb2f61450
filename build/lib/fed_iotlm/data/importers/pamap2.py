"""PAMAP2 protocol recordings -> exchange format (windows of three IMUs + heart rate).

PAMAP2 (Reiss & Stricker, 2012) ships one whitespace-separated ``subjectXXX.dat`` per
subject, 54 columns at 100 Hz:

====  ===========================================================================
col   content
====  ===========================================================================
0     timestamp (s)
1     activityID (0 = transient between activities)
2     heart rate (bpm, ~9 Hz: NaN on most rows)
3-19  IMU hand: temp, acc ±16g xyz, acc ±6g xyz, gyro xyz, mag xyz, 4 orientation
20-36 IMU chest (same 17 columns)
37-53 IMU ankle (same 17 columns)
====  ===========================================================================

What the import keeps and why:

- ``imu_hand``, ``imu_chest``, ``imu_ankle`` (kind imu, [T, 9]): acc ±16g, gyro, mag.
  The ±6g accelerometer saturates in fast activities, the orientation columns are
  marked invalid by the dataset's own readme, and temperature is not motion.
- ``heart_rate`` (kind timeseries, [T, 1]): forward-filled (then back-filled at the
  start), since the monitor reports ~9 times a second.
- Short IMU gaps (dropped wireless packets, at most ``max_gap`` rows) are linearly
  interpolated; a window still holding a NaN for a sensor has that sensor missing
  (mask False), which is exactly what the exchange format's masks are for.
- Rows with activityID 0 are dropped (and counted); windows never cross a dropped
  stretch or a timestamp gap, and take the majority activity of their rows.
- Classes are all 18 protocol activities in ID order, whether or not they occur, so
  label indices mean the same thing across imports.
- ``site`` and ``subject`` are the subject number (101, ...), for natural partitions.

Train/test split (seeded, documented in the printed summary):

- ``subject`` (default): whole subjects are held out, ``test_subjects`` or a seeded
  ``test_fraction`` of them: no leakage, tests generalisation to new people.  The
  test split then holds different sites than the train split.
- ``random``: within each subject, a seeded ``test_fraction`` of its windows.  Every
  site has test data (what per-node evaluation needs), but overlapping windows put
  shared rows on both sides, so test accuracy is optimistic.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..dataset import DatasetMeta, MultisensoryDataset, Split
from ..modalities import ModalitySpec, TaskSpec
from .common import ImportResult, fail, write_checked

RATE_HZ = 100.0
N_COLUMNS = 54
ACTIVITIES: dict[int, str] = {
    1: "lying",
    2: "sitting",
    3: "standing",
    4: "walking",
    5: "running",
    6: "cycling",
    7: "nordic_walking",
    9: "watching_tv",
    10: "computer_work",
    11: "car_driving",
    12: "ascending_stairs",
    13: "descending_stairs",
    16: "vacuum_cleaning",
    17: "ironing",
    18: "folding_laundry",
    19: "house_cleaning",
    20: "playing_soccer",
    24: "rope_jumping",
}
IMUS: dict[str, int] = {"imu_hand": 3, "imu_chest": 20, "imu_ankle": 37}  # first column
IMU_OFFSETS: tuple[int, ...] = (1, 2, 3, 7, 8, 9, 10, 11, 12)  # acc16, gyro, mag within an IMU
IMU_CHANNELS: tuple[str, ...] = (
    "acc_x",
    "acc_y",
    "acc_z",
    "gyro_x",
    "gyro_y",
    "gyro_z",
    "mag_x",
    "mag_y",
    "mag_z",
)
TASK = "activity"
_SUBJECT_FILE = re.compile(r"subject(\d+)\.dat$", re.IGNORECASE)


@dataclass(frozen=True)
class WindowConfig:
    """How recordings become samples: ``window`` rows, ``overlap`` in [0, 1)."""

    window: int = 256
    overlap: float = 0.5
    max_gap: int = 10  # longest IMU NaN run (rows) that is interpolated
    max_dt: float = 1.0  # a larger timestamp jump splits a recording (s)

    @property
    def stride(self) -> int:
        return max(1, int(round(self.window * (1.0 - self.overlap))))


@dataclass
class SubjectWindows:
    """One subject's windows: values per modality [n, T, C] and labels [n]."""

    subject: int
    x: dict[str, np.ndarray]
    y: np.ndarray
    rows: int
    transient_rows: int
    unwindowed_rows: int
    sensorless_windows: int = 0  # dropped: every sensor had a long gap


def import_pamap2(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    windows: WindowConfig = WindowConfig(),
    split: str = "subject",
    test_fraction: float = 0.25,
    test_subjects: Sequence[int] | None = None,
    seed: int = 0,
    name: str = "pamap2",
) -> ImportResult:
    """Import the ``subjectXXX.dat`` files in ``src`` (or ``src/Protocol``) into ``dst``."""
    if windows.window < 2 or not 0.0 <= windows.overlap < 1.0:
        raise ValueError(f"need window >= 2 and overlap in [0, 1), got {windows}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    files = find_subject_files(Path(src))
    per_subject = [window_subject(subject, path, windows) for subject, path in files]
    per_subject = [s for s in per_subject if len(s.y)]
    if not per_subject:
        raise fail(src, f"no window of {windows.window} rows fits in any recording")
    train, test, split_note = _split(per_subject, split, test_fraction, test_subjects, seed)
    meta = DatasetMeta(
        name=name,
        modalities={
            **{m: ModalitySpec(m, "imu", RATE_HZ, IMU_CHANNELS) for m in IMUS},
            "heart_rate": ModalitySpec("heart_rate", "timeseries", RATE_HZ, ("bpm",)),
        },
        tasks={TASK: TaskSpec(TASK, tuple(ACTIVITIES.values()))},
    )
    ds = MultisensoryDataset(meta, _stack(train), _stack(test))
    return write_checked(ds, dst, _notes(per_subject, windows, split_note))


# ---------------------------------------------------------------------------- reading


def find_subject_files(src: Path) -> list[tuple[int, Path]]:
    """(subject id, path) of every ``subjectXXX.dat`` in ``src`` or ``src/Protocol``."""
    if not src.is_dir():
        raise fail(src, "source directory not found")
    for folder in (src, src / "Protocol"):
        found = []
        for p in sorted(folder.glob("*.dat")) if folder.is_dir() else []:
            match = _SUBJECT_FILE.search(p.name)
            if match:
                found.append((int(match.group(1)), p))
        if found:
            return found
    raise fail(src, "no subjectXXX.dat files here or in Protocol/")


def read_dat(path: Path) -> np.ndarray:
    """The float64 [rows, 54] table of one file; ragged or short rows are errors."""
    try:
        data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise fail(path, f"not a table of numbers with one row per line: {exc}") from exc
    if data.shape[0] == 0:
        raise fail(path, "file holds no rows")
    if data.shape[1] != N_COLUMNS:
        raise fail(
            path,
            f"expected {N_COLUMNS} whitespace-separated columns (timestamp, activityID, "
            f"heart rate, 3 IMUs x 17), got {data.shape[1]}",
        )
    return data


def activity_index(path: Path, ids: np.ndarray) -> np.ndarray:
    """activityID -> class index (0..17), -1 for transient rows (ID 0)."""
    lookup = np.full(max(ACTIVITIES) + 1, -2, dtype=np.int64)
    lookup[0] = -1
    for i, act in enumerate(ACTIVITIES):
        lookup[act] = i
    whole = np.isfinite(ids) & (ids == np.round(ids)) & (ids >= 0) & (ids <= max(ACTIVITIES))
    idx = np.where(whole, lookup[np.where(whole, ids, 0).astype(np.int64)], -2)
    bad = np.flatnonzero(idx == -2)
    if bad.size:
        raise fail(
            path,
            f"row {int(bad[0]) + 1}: unknown activityID {ids[bad[0]]:g} in column 1 "
            f"({bad.size} such row(s)); known: 0 (transient), {sorted(ACTIVITIES)}",
        )
    return idx


def forward_fill(col: np.ndarray) -> np.ndarray:
    """NaNs take the last value before them (the first value at the start)."""
    valid = ~np.isnan(col)
    if not valid.any():
        return col.copy()
    last = np.maximum.accumulate(np.where(valid, np.arange(col.size), 0))
    out = col[last]
    out[: np.argmax(valid)] = col[np.argmax(valid)]
    return out


def fill_short_gaps(col: np.ndarray, max_gap: int) -> np.ndarray:
    """Linear interpolation over NaN runs of at most ``max_gap`` rows; longer runs and
    runs at either end stay NaN (interpolating them would invent motion)."""
    nan = np.isnan(col)
    if not nan.any() or nan.all():
        return col.copy()
    idx = np.arange(col.size)
    out = np.interp(idx, idx[~nan], col[~nan])
    edges = np.diff(np.concatenate([[0], nan.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    keep_nan = (ends - starts > max_gap) | (starts == 0) | (ends == col.size)
    marks = np.zeros(col.size + 1, dtype=np.int64)
    np.add.at(marks, starts[keep_nan], 1)
    np.add.at(marks, ends[keep_nan], -1)
    out[np.cumsum(marks)[:-1] > 0] = np.nan
    return out


# -------------------------------------------------------------------------- windowing


def window_subject(subject: int, path: Path, cfg: WindowConfig) -> SubjectWindows:
    """Read one subject's file and cut it into labelled windows."""
    data = read_dat(path)
    label = activity_index(path, data[:, 1])
    signals = {
        m: np.stack([fill_short_gaps(data[:, c + o], cfg.max_gap) for o in IMU_OFFSETS], axis=1)
        for m, c in IMUS.items()
    }
    signals["heart_rate"] = forward_fill(data[:, 2])[:, None]
    keep = np.flatnonzero(label >= 0)
    starts = _window_starts(keep, data[keep, 0], cfg)
    rows = starts[:, None] + np.arange(cfg.window)[None, :]  # positions within ``keep``
    original = keep[rows] if rows.size else np.zeros((0, cfg.window), dtype=np.int64)
    x = {m: _windows_or_missing(v[original]) for m, v in signals.items()}
    windowed = np.unique(original).size
    some = np.logical_or.reduce([~np.isnan(v).all(axis=(1, 2)) for v in x.values()])
    return SubjectWindows(
        subject=subject,
        x={m: v[some] for m, v in x.items()},
        y=majority(label[original], len(ACTIVITIES))[some],
        rows=data.shape[0],
        transient_rows=int(data.shape[0] - keep.size),
        unwindowed_rows=int(keep.size - windowed),
        sensorless_windows=int((~some).sum()),
    )


def _window_starts(keep: np.ndarray, times: np.ndarray, cfg: WindowConfig) -> np.ndarray:
    """Start positions (into ``keep``) of windows lying inside one contiguous stretch:
    no dropped row and no timestamp jump above ``max_dt`` inside a window."""
    if keep.size == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(keep) != 1) | (np.abs(np.diff(times)) > cfg.max_dt)) + 1
    bounds = np.concatenate([[0], breaks, [keep.size]])
    out = [
        np.arange(lo, hi - cfg.window + 1, cfg.stride)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        if hi - lo >= cfg.window
    ]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def majority(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Most frequent class per row of ``labels`` [n, T] (ties: the lower index)."""
    counts = np.stack([(labels == k).sum(axis=1) for k in range(num_classes)], axis=1)
    return counts.argmax(axis=1).astype(np.int64) if labels.size else np.zeros(0, np.int64)


def _windows_or_missing(w: np.ndarray) -> np.ndarray:
    """float32 windows; one with any NaN left becomes all NaN (the sensor is missing)."""
    w = w.astype(np.float32)
    broken = np.isnan(w).any(axis=(1, 2))
    w[broken] = np.nan
    return w


# ------------------------------------------------------------------------------ split


def _split(
    subjects: list[SubjectWindows],
    how: str,
    fraction: float,
    test_subjects: Sequence[int] | None,
    seed: int,
) -> tuple[list[SubjectWindows], list[SubjectWindows], str]:
    ids = [s.subject for s in subjects]
    if how == "subject":
        if test_subjects:
            unknown = sorted(set(test_subjects) - set(ids))
            if unknown:
                raise ValueError(f"test subjects {unknown} have no windows; subjects: {ids}")
            held = set(test_subjects)
        else:
            if len(ids) < 2:
                raise ValueError(
                    f"split 'subject' needs at least 2 subjects, found {ids}; use --split random"
                )
            k = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
            held = set(np.random.default_rng(seed).permutation(ids)[:k].tolist())
        if held == set(ids):
            raise ValueError("every subject is a test subject; leave some for training")
        train = [s for s in subjects if s.subject not in held]
        test = [s for s in subjects if s.subject in held]
        return train, test, f"split: subject, test subjects {sorted(held)} (seed {seed})"
    if how == "random":
        train, test = [], []
        for s in subjects:
            n = len(s.y)
            order = np.random.default_rng([seed, s.subject]).permutation(n)
            k = int(round(fraction * n))
            test_idx, train_idx = np.sort(order[:k]), np.sort(order[k:])
            train.append(_take(s, train_idx))
            test.append(_take(s, test_idx))
        return train, test, f"split: random, {fraction:.0%} of each subject's windows (seed {seed})"
    raise ValueError(f"unknown split {how!r}; choose 'subject' or 'random'")


def _take(s: SubjectWindows, idx: np.ndarray) -> SubjectWindows:
    x = {m: v[idx] for m, v in s.x.items()}
    return replace(s, x=x, y=s.y[idx])


def _stack(parts: list[SubjectWindows]) -> Split:
    mods = list(IMUS) + ["heart_rate"]
    x = {m: np.concatenate([p.x[m] for p in parts]) for m in mods}
    subject = np.concatenate([np.full(len(p.y), p.subject, dtype=np.int64) for p in parts])
    return Split(
        x=x,
        mask={m: ~np.isnan(v).all(axis=(1, 2)) for m, v in x.items()},
        y={TASK: np.concatenate([p.y for p in parts])},
        site=subject,
        subject=subject.copy(),
    )


def _notes(subjects: list[SubjectWindows], cfg: WindowConfig, split_note: str) -> list[str]:
    rows = sum(s.rows for s in subjects)
    transient = sum(s.transient_rows for s in subjects)
    unwindowed = sum(s.unwindowed_rows for s in subjects)
    n = sum(len(s.y) for s in subjects)
    sensorless = sum(s.sensorless_windows for s in subjects)
    return [
        f"rows read: {rows} from {len(subjects)} subject(s)",
        f"dropped {transient} transient row(s) (activityID 0)",
        f"{unwindowed} row(s) in stretches shorter than a window were not used",
        f"{n} window(s) of {cfg.window} rows, stride {cfg.stride} ({cfg.overlap:.0%} overlap)",
        f"dropped {sensorless} window(s) in which every sensor had a gap",
        split_note,
    ]


# -------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fed-iotlm import pamap2 SRC DST`` options."""
    parser.add_argument("--window", type=int, default=256, help="rows per window (100 Hz)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1)")
    parser.add_argument("--max-gap", type=int, default=10, help="longest IMU gap interpolated")
    parser.add_argument("--split", choices=("subject", "random"), default="subject")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument(
        "--test-subjects",
        type=lambda s: [int(v) for v in s.split(",") if v.strip()],
        default=None,
        metavar="101,105",
        help="hold out these subjects (split subject)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="pamap2")


def run(args: argparse.Namespace) -> ImportResult:
    return import_pamap2(
        args.src,
        args.dst,
        windows=WindowConfig(args.window, args.overlap, args.max_gap),
        split=args.split,
        test_fraction=args.test_fraction,
        test_subjects=args.test_subjects,
        seed=args.seed,
        name=args.name,
    )
