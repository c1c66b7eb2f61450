"""UCI HAPT raw recordings -> exchange format (UCI-HAR windows, accelerometer + gyroscope).

UCI "Smartphone-Based Recognition of Human Activities and Postural Transitions" ships,
in ``RawData/``, the 50 Hz recordings behind UCI-HAR: ``acc_expEE_userUU.txt`` (g) and
``gyro_expEE_userUU.txt`` (rad/s), three space-separated columns, one row per sample,
and ``labels.txt`` with rows ``experiment user activity start end`` (sample rows
``start..end`` inclusive, counted from 0; activities 1-12).

What the import makes of it, and why:

- **UCI-HAR windowing**: 128 samples (2.56 s) with 50 % overlap (stride 64), cut per
  experiment.  A window takes the activity of the labelled segment that covers all of
  it; a window that no single segment covers is unlabelled (-1), kept (it still shows
  the sensors, for self-supervised use) unless ``drop_unlabelled``.
- ``activity`` task: the 6 basic activities (walking, walking upstairs, walking
  downstairs, sitting, standing, laying) as in UCI-HAR, windows of postural
  transitions unlabelled; ``all_activities`` gives all 12 classes.
- ``acc`` and ``gyro`` (kind imu, [128, 3]) are two modalities; ``site`` and
  ``subject`` are the volunteer.
- **Split** ``volunteer`` (default): UCI-HAR's own test volunteers
  (2, 4, 9, 10, 12, 13, 18, 20, 24) are test; ``within``: every volunteer is in
  train, val and test, for federations in which every node needs test data.  Inside
  a volunteer, whole labelled *segments* go to one side (val, or val and test), each
  to the side furthest below its share, so no window of one side overlaps a window of
  another; an unlabelled window that overlaps a val or test segment is dropped.
  ``val.npz`` is written beside ``train.npz`` and ``test.npz``.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dataset import DatasetMeta, MultisensoryDataset, Split
from ..modalities import ModalitySpec, TaskSpec
from .common import ImportResult, fail, write_checked
from .splits import SIDES, by_group, check_fractions

RATE_HZ = 50.0
WINDOW = 128
STRIDE = 64
ACTIVITIES: tuple[str, ...] = (
    "walking",
    "walking_upstairs",
    "walking_downstairs",
    "sitting",
    "standing",
    "laying",
    "stand_to_sit",
    "sit_to_stand",
    "sit_to_lie",
    "lie_to_sit",
    "stand_to_lie",
    "lie_to_stand",
)
BASIC = 6  # activities 1..6 are UCI-HAR's classes
UCI_HAR_TEST_VOLUNTEERS: tuple[int, ...] = (2, 4, 9, 10, 12, 13, 18, 20, 24)
SENSORS: dict[str, tuple[str, ...]] = {
    "acc": ("acc_x", "acc_y", "acc_z"),
    "gyro": ("gyro_x", "gyro_y", "gyro_z"),
}
TASK = "activity"
_RECORDING = re.compile(r"^(?P<sensor>acc|gyro)_exp(?P<exp>\d+)_user(?P<user>\d+)\.txt$")


@dataclass(frozen=True)
class Segment:
    """One row of labels.txt: ``activity`` (1-12) over rows ``start..end`` of an experiment."""

    experiment: int
    user: int
    activity: int
    start: int
    end: int
    line: int


@dataclass
class Windows:
    """Every window of every experiment: values, label, volunteer, covering segment."""

    x: dict[str, np.ndarray]  # [n, 128, 3]
    activity: np.ndarray  # 1..12, 0 = no single segment covers the window
    user: np.ndarray
    segment: np.ndarray  # index into the segment list, -1 = none
    overlaps: list[np.ndarray]  # per window: the segments whose rows it touches


def import_hapt(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    split: str = "volunteer",
    all_activities: bool = False,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    drop_unlabelled: bool = False,
    seed: int = 0,
    name: str = "hapt",
) -> ImportResult:
    """Import ``src`` (the HAPT folder or its ``RawData/``) into ``dst``."""
    if split not in ("volunteer", "within"):
        raise ValueError(f"unknown split {split!r}; choose 'volunteer' or 'within'")
    fractions = check_fractions(val_fraction, test_fraction if split == "within" else 0.0)
    root = find_raw_data(Path(src))
    recordings = find_recordings(root)
    segments = read_labels(root / "labels.txt", recordings)
    windows = cut_windows(recordings, segments)
    side = assign_sides(windows, segments, split, fractions, seed)
    classes = ACTIVITIES if all_activities else ACTIVITIES[:BASIC]
    label = np.where(
        (windows.activity >= 1) & (windows.activity <= len(classes)), windows.activity - 1, -1
    )
    if drop_unlabelled:
        side = np.where(label >= 0, side, -1)
    parts = {s: _take(windows, label, np.flatnonzero(side == k)) for k, s in enumerate(SIDES)}
    meta = DatasetMeta(
        name=name,
        modalities={m: ModalitySpec(m, "imu", RATE_HZ, ch) for m, ch in SENSORS.items()},
        tasks={TASK: TaskSpec(TASK, classes)},
    )
    ds = MultisensoryDataset(meta, parts["train"], parts["test"])
    notes = _notes(windows, label, side, parts, split, seed, len(classes))
    return write_checked(ds, dst, notes, val=parts["val"])


# ---------------------------------------------------------------------------- reading


def find_raw_data(src: Path) -> Path:
    """``src`` itself or ``src/RawData``, whichever holds labels.txt."""
    if not src.is_dir():
        raise fail(src, "source directory not found")
    for folder in (src, src / "RawData"):
        if (folder / "labels.txt").is_file():
            return folder
    raise fail(src, "labels.txt not found here or in RawData/")


def find_recordings(root: Path) -> dict[tuple[int, int], dict[str, Path]]:
    """(experiment, user) -> {"acc": path, "gyro": path}; both files must exist."""
    found: dict[tuple[int, int], dict[str, Path]] = {}
    for p in sorted(root.iterdir()):
        match = _RECORDING.match(p.name)
        if match:
            key = (int(match.group("exp")), int(match.group("user")))
            found.setdefault(key, {})[match.group("sensor")] = p
    if not found:
        raise fail(root, "no acc_expEE_userUU.txt / gyro_expEE_userUU.txt files")
    for (exp, user), files in found.items():
        for sensor in SENSORS:
            if sensor not in files:
                other = next(iter(files.values()))
                missing = root / f"{sensor}_exp{exp:02d}_user{user:02d}.txt"
                raise fail(missing, f"file not found (its partner {other.name} exists)")
    return found


def read_labels(path: Path, recordings: dict[tuple[int, int], dict[str, Path]]) -> list[Segment]:
    """Every row of labels.txt, checked: five whole numbers, a known activity and a
    recording that exists; rows within one experiment must not overlap."""
    segments: list[Segment] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5 or not all(f.isdigit() for f in fields):
            raise fail(
                path,
                f"line {line_no}: expected 5 whole numbers 'experiment user activity start end', "
                f"got {line.strip()!r}",
            )
        exp, user, act, start, end = (int(f) for f in fields)
        if not 1 <= act <= len(ACTIVITIES):
            raise fail(path, f"line {line_no}: activity {act} is out of range 1..{len(ACTIVITIES)}")
        if start > end:
            raise fail(path, f"line {line_no}: start {start} is after end {end}")
        if (exp, user) not in recordings:
            raise fail(
                path,
                f"line {line_no}: experiment {exp} of user {user} has no recording "
                f"(acc_exp{exp:02d}_user{user:02d}.txt not found)",
            )
        segments.append(Segment(exp, user, act, start, end, line_no))
    if not segments:
        raise fail(path, "holds no labelled segment")
    by_exp = sorted(segments, key=lambda s: (s.experiment, s.start))
    for a, b in zip(by_exp[:-1], by_exp[1:], strict=True):
        if a.experiment == b.experiment and b.start <= a.end:
            raise fail(path, f"line {b.line}: segment overlaps the one on line {a.line}")
    return segments


def read_recording(path: Path) -> np.ndarray:
    """The float32 [rows, 3] samples of one file; a malformed row is an error."""
    try:
        data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise fail(path, f"malformed row (expected 3 numbers per line): {exc}") from exc
    if data.shape[1] != 3:
        raise fail(path, f"expected 3 space-separated columns (x y z), got {data.shape[1]}")
    if not np.isfinite(data).all():
        row = int(np.flatnonzero(~np.isfinite(data).all(axis=1))[0])
        raise fail(path, f"line {row + 1}: value is not a finite number")
    return data.astype(np.float32)


# -------------------------------------------------------------------------- windowing


def cut_windows(
    recordings: dict[tuple[int, int], dict[str, Path]], segments: list[Segment]
) -> Windows:
    """UCI-HAR windows of every experiment with the segment that covers each."""
    xs: dict[str, list[np.ndarray]] = {m: [] for m in SENSORS}
    activity, user, segment, overlaps = [], [], [], []
    for (exp, uid), files in sorted(recordings.items()):
        data = {m: read_recording(files[m]) for m in SENSORS}
        rows = data["acc"].shape[0]
        if data["gyro"].shape[0] != rows:
            raise fail(
                files["gyro"],
                f"{data['gyro'].shape[0]} rows but {files['acc'].name} has {rows}; "
                "the two sensors must be sampled together",
            )
        seg_of_row = np.full(rows, -1, dtype=np.int64)
        for i, s in enumerate(segments):
            if s.experiment == exp and s.user == uid:
                if s.end >= rows:
                    raise fail(
                        files["acc"].parent / "labels.txt",
                        f"line {s.line}: segment ends at row {s.end} but "
                        f"{files['acc'].name} has {rows} rows",
                    )
                seg_of_row[s.start : s.end + 1] = i
        starts = np.arange(0, rows - WINDOW + 1, STRIDE)
        if starts.size == 0:
            continue
        idx = starts[:, None] + np.arange(WINDOW)[None, :]
        for m in SENSORS:
            xs[m].append(data[m][idx])
        first, last = seg_of_row[starts], seg_of_row[starts + WINDOW - 1]
        covered = (first == last) & (first >= 0)
        seg = np.where(covered, first, -1)
        segment.append(seg)
        activity.append(np.array([segments[i].activity if i >= 0 else 0 for i in seg]))
        user.append(np.full(starts.size, uid, dtype=np.int64))
        overlaps.extend(np.unique(r[r >= 0]) for r in seg_of_row[idx])
    if not segment:
        raise fail(next(iter(recordings.values()))["acc"].parent, "no recording is long enough")
    return Windows(
        x={m: np.concatenate(v) for m, v in xs.items()},
        activity=np.concatenate(activity).astype(np.int64),
        user=np.concatenate(user),
        segment=np.concatenate(segment),
        overlaps=overlaps,
    )


# ------------------------------------------------------------------------------ split


def assign_sides(
    w: Windows, segments: list[Segment], split: str, fractions: tuple, seed: int
) -> np.ndarray:
    """Side of each window (0 train, 1 val, 2 test, -1 dropped)."""
    seg_side = np.zeros(len(segments), dtype=np.int64)
    sizes = np.bincount(w.segment[w.segment >= 0], minlength=len(segments))
    for uid in sorted({s.user for s in segments}):
        mine = np.array([i for i, s in enumerate(segments) if s.user == uid])
        if split == "volunteer" and uid in UCI_HAR_TEST_VOLUNTEERS:
            seg_side[mine] = 2
        else:
            seg_side[mine] = by_group(sizes[mine], fractions, [seed, uid])
    side = np.where(w.segment >= 0, seg_side[np.maximum(w.segment, 0)], 0)
    test_user = np.isin(w.user, UCI_HAR_TEST_VOLUNTEERS)
    for i in np.flatnonzero(w.segment < 0):  # unlabelled windows
        if split == "volunteer" and test_user[i]:
            side[i] = 2
        elif (seg_side[w.overlaps[i]] != 0).any():
            side[i] = -1  # touches rows of a val or test segment
    return side


def _take(w: Windows, label: np.ndarray, idx: np.ndarray) -> Split:
    return Split(
        x={m: v[idx] for m, v in w.x.items()},
        mask={m: np.ones(idx.size, dtype=bool) for m in w.x},
        y={TASK: label[idx].astype(np.int64)},
        site=w.user[idx],
        subject=w.user[idx].copy(),
    )


def _notes(
    w: Windows,
    label: np.ndarray,
    side: np.ndarray,
    parts: dict[str, Split],
    split: str,
    seed: int,
    num_classes: int,
) -> list[str]:
    notes = [
        f"{w.activity.size} window(s) of {WINDOW} samples, stride {STRIDE}, "
        f"from {np.unique(w.user).size} volunteer(s)",
        f"{int((w.segment < 0).sum())} window(s) covered by no single segment (unlabelled)",
        f"{int((w.activity > num_classes).sum())} window(s) of a transition "
        "(unlabelled for the 6 basic activities)"
        if num_classes == BASIC
        else "all 12 activities are classes",
        f"dropped {int((side < 0).sum())} window(s) (unlabelled, or overlapping another side)",
    ]
    if split == "volunteer":
        notes.append(f"split: volunteer, test volunteers {list(UCI_HAR_TEST_VOLUNTEERS)} (UCI-HAR)")
    else:
        notes.append("split: within, every volunteer in train, val and test")
    notes.append(f"val/test: whole labelled segments per volunteer (seed {seed})")
    for s, p in parts.items():
        counts = np.bincount(p.y[TASK][p.y[TASK] >= 0], minlength=num_classes).tolist()
        notes.append(f"{s} windows per class: {counts}")
    return notes


# -------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fed-iotlm import hapt SRC DST`` options."""
    parser.add_argument("--split", choices=("volunteer", "within"), default="volunteer")
    parser.add_argument(
        "--all-activities",
        action="store_true",
        help="12 classes (postural transitions too) instead of the 6 basic activities",
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="of each volunteer")
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="of each volunteer (split within)"
    )
    parser.add_argument("--drop-unlabelled", action="store_true", help="keep only labelled windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="hapt")


def run(args: argparse.Namespace) -> ImportResult:
    return import_hapt(
        args.src,
        args.dst,
        split=args.split,
        all_activities=args.all_activities,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        drop_unlabelled=args.drop_unlabelled,
        seed=args.seed,
        name=args.name,
    )
