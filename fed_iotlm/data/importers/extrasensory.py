"""ExtraSensory per-user CSVs -> exchange format (one modality per sensor block, user = site).

ExtraSensory (Vaizman, Ellis & Lanckriet, 2017) ships one ``<UUID>.features_labels.csv.gz``
per user, one row per minute: ``timestamp``, feature columns named ``<block>:<feature>``,
51 ``label:<NAME>`` columns (1, 0, or empty = not reported) and ``label_source``.

What the import makes of it, and why:

- **One modality per sensor block** (kind ``tabular``, one value per feature):
  ``raw_acc``, ``proc_gyro``, ``raw_magnet``, ``watch_acceleration``, ``watch_heading``,
  ``location``, ``location_quick_features``, ``audio_naive``, ``audio_properties``,
  ``discrete`` (phone state) and ``lf_measurements`` (light, pressure, ...).  A block
  whose values are all empty for a minute is that sensor missing for that minute
  (mask False): the watch, the gyroscope or location really were absent.
- A block that is present but has some empty features (a phone without a humidity
  sensor, a location fix without altitude) keeps its minute: each empty feature takes
  that feature's mean over the *training* minutes of all users, which is what
  standardising and then zero-filling does (the dataset authors' own treatment).  The
  number of filled values is printed per block.
- **Tasks** built from the labels as users of the dataset do; a minute is labelled for
  a task only when exactly one of its labels is 1 (none or several: unlabelled, -1):
  ``main_activity`` (lying, sitting, standing, walking, running, bicycling from
  LYING_DOWN, SITTING, OR_standing, FIX_walking, FIX_running, BICYCLING),
  ``indoors`` (indoors, outdoors from OR_indoors, OR_outside) and ``phone_position``
  (in_pocket, in_hand, in_bag, on_table from PHONE_IN_*); each with a ``title``, what
  questions call it (``indoors``: "indoor or outdoor setting").
- ``site`` and ``subject`` are the user's index in sorted-UUID order (printed).
- **Split per user, in time order**: the first minutes are train, then val, then test
  (``val.npz`` is written beside ``train.npz`` and ``test.npz``); a val or test minute
  less than ``gap_minutes`` after the last minute of the block before it is dropped,
  so no test minute is adjacent to a training minute.  Every user is in every split,
  as a natural one-node-per-user federation needs.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dataset import DatasetMeta, MultisensoryDataset, Split
from ..modalities import ModalitySpec, TaskSpec
from .common import ImportResult, fail, write_checked
from .splits import SIDES, check_fractions, chronological

BLOCKS: tuple[str, ...] = (
    "raw_acc",
    "proc_gyro",
    "raw_magnet",
    "watch_acceleration",
    "watch_heading",
    "location",
    "location_quick_features",
    "audio_naive",
    "audio_properties",
    "discrete",
    "lf_measurements",
)
# task -> (class name, label column) in class order
TASKS: dict[str, tuple[tuple[str, str], ...]] = {
    "main_activity": (
        ("lying", "LYING_DOWN"),
        ("sitting", "SITTING"),
        ("standing", "OR_standing"),
        ("walking", "FIX_walking"),
        ("running", "FIX_running"),
        ("bicycling", "BICYCLING"),
    ),
    "indoors": (("indoors", "OR_indoors"), ("outdoors", "OR_outside")),
    "phone_position": (
        ("in_pocket", "PHONE_IN_POCKET"),
        ("in_hand", "PHONE_IN_HAND"),
        ("in_bag", "PHONE_IN_BAG"),
        ("on_table", "PHONE_ON_TABLE"),
    ),
}
# what questions call each task (meta.json tasks.<t>.title): ``indoors`` is also a class
# name, so its name in words would ask "What is the indoors?", and a title naming a class
# would make every answer read as that class; the other two say their names in words
TITLES: dict[str, str] = {
    "main_activity": "main activity",
    "indoors": "indoor or outdoor setting",
    "phone_position": "phone position",
}
USER_FILE = re.compile(r"^(?P<uuid>[0-9A-Fa-f-]+)\.features_labels\.csv(\.gz)?$")
_EMPTY_FIELD = re.compile(r"(?:^|(?<=,))(?=,|$)", re.MULTILINE)


@dataclass(frozen=True)
class Columns:
    """Where things are in a user file's header."""

    header: tuple[str, ...]
    blocks: dict[str, np.ndarray]  # block -> column indices
    labels: dict[str, int]  # label name (without "label:") -> column index

    def features(self, block: str) -> tuple[str, ...]:
        return tuple(self.header[i].split(":", 1)[1] for i in self.blocks[block])


@dataclass
class UserMinutes:
    """One user's minutes: block values (NaN kept), task labels, timestamps."""

    index: int
    uuid: str
    times: np.ndarray
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]


def import_extrasensory(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    gap_minutes: float = 30.0,
    drop_unlabelled: bool = False,
    name: str = "extrasensory",
) -> ImportResult:
    """Import every ``<UUID>.features_labels.csv[.gz]`` in ``src`` into ``dst``."""
    fractions = check_fractions(val_fraction, test_fraction)
    if gap_minutes < 0:
        raise ValueError(f"gap_minutes must be >= 0, got {gap_minutes}")
    files = find_user_files(Path(src))
    columns: Columns | None = None
    users: list[UserMinutes] = []
    for index, (uuid, path) in enumerate(files):
        table, cols = read_user_file(path, columns)
        columns = columns or cols
        users.append(user_minutes(index, uuid, path, table, cols))
    assert columns is not None

    sides = [chronological(u.times, fractions, 60.0 * gap_minutes) for u in users]
    stacked = {s: _stack(users, sides, k, drop_unlabelled) for k, s in enumerate(SIDES)}
    parts = {s: split for s, (split, _) in stacked.items()}
    sensorless = sum(n for _, n in stacked.values())
    filled = fill_partial_blocks(parts)
    meta = DatasetMeta(
        name=name,
        modalities={b: ModalitySpec(b, "tabular", None, columns.features(b)) for b in BLOCKS},
        tasks={
            t: TaskSpec(t, tuple(c for c, _ in pairs), given_title=TITLES[t])
            for t, pairs in TASKS.items()
        },
    )
    ds = MultisensoryDataset(meta, parts["train"], parts["test"])
    notes = _notes(users, sides, parts, filled, sensorless, gap_minutes, drop_unlabelled)
    return write_checked(ds, dst, notes, val=parts["val"])


# ---------------------------------------------------------------------------- reading


def find_user_files(src: Path) -> list[tuple[str, Path]]:
    """(UUID, path) of every user file in ``src``, sorted by UUID."""
    if not src.is_dir():
        raise fail(src, "source directory not found")
    found = sorted(
        (m.group("uuid"), p)
        for p in src.iterdir()
        if p.is_file() and (m := USER_FILE.match(p.name)) is not None
    )
    if not found:
        raise fail(src, "no <UUID>.features_labels.csv.gz files here")
    uuids = [u for u, _ in found]
    twice = sorted({u for u in uuids if uuids.count(u) > 1})
    if twice:
        raise fail(src, f"user(s) {twice} have both a .csv and a .csv.gz file; keep one")
    return found


def parse_header(path: Path, header: list[str]) -> Columns:
    """Check a header against the release layout and locate the blocks and labels."""
    if not header or header[0] != "timestamp":
        raise fail(path, f"header must start with 'timestamp', got {header[:1]}")
    if header[-1] != "label_source":
        raise fail(path, f"header must end with 'label_source', got {header[-1:]}")
    blocks: dict[str, list[int]] = {b: [] for b in BLOCKS}
    labels: dict[str, int] = {}
    for i, col in enumerate(header[1:-1], start=1):
        prefix, sep, rest = col.partition(":")
        if not sep or not rest:
            raise fail(path, f"column {i + 1} {col!r} is not named <block>:<feature>")
        if prefix == "label":
            labels[rest] = i
        elif prefix in blocks:
            blocks[prefix].append(i)
        else:
            raise fail(
                path, f"column {i + 1} {col!r}: unknown sensor block {prefix!r}; known: {BLOCKS}"
            )
    empty = [b for b, cols in blocks.items() if not cols]
    if empty:
        raise fail(path, f"no columns for sensor block(s) {empty}")
    wanted = {col for pairs in TASKS.values() for _, col in pairs}
    absent = sorted(wanted - set(labels))
    if absent:
        raise fail(path, f"label column(s) {['label:' + a for a in absent]} not found")
    return Columns(tuple(header), {b: np.array(c) for b, c in blocks.items()}, labels)


def read_user_file(path: Path, expected: Columns | None) -> tuple[np.ndarray, Columns]:
    """The float64 table of one user file (empty fields as NaN) and its columns.

    Every row must have the header's number of fields, each a number or empty; every
    user file must have the first file's header, so modality i means the same sensor
    features on every node.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise fail(path, f"cannot read the file: {exc}") from exc
    head, _, body = text.partition("\n")
    cols = parse_header(path, head.strip().split(","))
    if expected is not None and cols.header != expected.header:
        raise fail(path, "header differs from the first user file's; every user needs the same")
    if not body.strip():
        raise fail(path, "file holds a header but no minutes")
    try:
        table = np.loadtxt(
            io.StringIO(_EMPTY_FIELD.sub("nan", body.rstrip("\r\n"))),
            delimiter=",",
            dtype=np.float64,
            ndmin=2,
        )
    except ValueError as exc:
        raise fail(path, f"malformed row: {_one_based(exc)}") from exc
    if table.shape[1] != len(cols.header):
        raise fail(path, f"rows have {table.shape[1]} fields, the header {len(cols.header)}")
    return table, cols


def _one_based(exc: ValueError) -> str:
    """numpy's message counts data rows from 1; say so relative to the file (header = line 1)."""
    msg = str(exc)
    match = re.search(r"row (\d+)", msg)
    return f"{msg} (file line {int(match.group(1)) + 1})" if match else msg


def user_minutes(
    index: int, uuid: str, path: Path, table: np.ndarray, cols: Columns
) -> UserMinutes:
    """Blocks, labels and timestamps of one user, with the values checked."""
    times = table[:, 0]
    bad = np.flatnonzero(~np.isfinite(times))
    if bad.size:
        raise fail(path, f"line {int(bad[0]) + 2}: timestamp is empty or not finite")
    back = np.flatnonzero(np.diff(times) <= 0)
    if back.size:
        raise fail(
            path,
            f"line {int(back[0]) + 3}: timestamp {times[back[0] + 1]:.0f} does not follow "
            f"{times[back[0]]:.0f} (minutes must be in increasing time order)",
        )
    y = {t: task_labels(path, table, cols, pairs) for t, pairs in TASKS.items()}
    x = {b: table[:, c].astype(np.float32) for b, c in cols.blocks.items()}
    for b, v in x.items():
        inf = np.flatnonzero(np.isinf(v).any(axis=1))
        if inf.size:
            raise fail(path, f"line {int(inf[0]) + 2}: infinite value in block {b!r}")
    return UserMinutes(index, uuid, times, x, y)


def task_labels(
    path: Path, table: np.ndarray, cols: Columns, pairs: tuple[tuple[str, str], ...]
) -> np.ndarray:
    """Class index where exactly one of the task's labels is 1, else -1."""
    onehot = table[:, [cols.labels[col] for _, col in pairs]]
    bad = ~np.isnan(onehot) & (onehot != 0) & (onehot != 1)
    if bad.any():
        row, k = (int(v[0]) for v in np.nonzero(bad))
        raise fail(
            path,
            f"line {row + 2}: label:{pairs[k][1]} is {onehot[row, k]:g}; "
            "a label is 1, 0 or empty (not reported)",
        )
    on = onehot == 1
    return np.where(on.sum(axis=1) == 1, on.argmax(axis=1), -1).astype(np.int64)


# ------------------------------------------------------------------------------ split


def _stack(
    users: list[UserMinutes], sides: list[np.ndarray], side: int, drop_unlabelled: bool
) -> tuple[Split, int]:
    """The minutes of every user on ``side`` as one split (NaN still in the values),
    and how many of them were dropped for having no sensor block at all."""
    keep = []
    for u, s in zip(users, sides, strict=True):
        rows = s == side
        if drop_unlabelled:
            rows &= np.logical_or.reduce([y >= 0 for y in u.y.values()])
        keep.append(np.flatnonzero(rows))
    pairs = list(zip(users, keep, strict=True))
    x = {b: np.concatenate([u.x[b][k] for u, k in pairs]) for b in BLOCKS}
    y = {t: np.concatenate([u.y[t][k] for u, k in pairs]) for t in TASKS}
    user = np.concatenate([np.full(k.size, u.index, np.int64) for u, k in pairs])
    mask = {b: ~np.isnan(v).all(axis=1) for b, v in x.items()}
    present = np.logical_or.reduce(list(mask.values()))
    split = Split(
        x={b: v[present] for b, v in x.items()},
        mask={b: m[present] for b, m in mask.items()},
        y={t: v[present] for t, v in y.items()},
        site=user[present],
        subject=user[present].copy(),
    )
    return split, int((~present).sum())


def fill_partial_blocks(parts: dict[str, Split]) -> dict[str, int]:
    """Fill empty features of present blocks with the training mean; count per block."""
    filled: dict[str, int] = {}
    for b in BLOCKS:
        train = parts["train"].x[b][parts["train"].mask[b]]
        with warnings.catch_warnings():  # an all-empty feature: mean of nothing -> 0
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(train, axis=0) if train.size else np.zeros(train.shape[1])
        mean = np.where(np.isfinite(mean), mean, 0.0).astype(np.float32)
        count = 0
        for split in parts.values():
            v, present = split.x[b], split.mask[b]
            holes = np.isnan(v) & present[:, None]
            count += int(holes.sum())
            v[holes] = np.broadcast_to(mean, v.shape)[holes]
        filled[b] = count
    return filled


# -------------------------------------------------------------------------------- notes


def _notes(
    users: list[UserMinutes],
    sides: list[np.ndarray],
    parts: dict[str, Split],
    filled: dict[str, int],
    sensorless: int,
    gap_minutes: float,
    drop_unlabelled: bool,
) -> list[str]:
    total = sum(u.times.size for u in users)
    dropped_gap = sum(int((s == -1).sum()) for s in sides)
    kept = sum(len(p) for p in parts.values())
    notes = [
        f"minutes read: {total} from {len(users)} user(s)",
        f"split per user in time order; dropped {dropped_gap} minute(s) within "
        f"{gap_minutes:g} min after the previous block",
    ]
    if drop_unlabelled:
        unlabelled = total - dropped_gap - kept - sensorless
        notes.append(f"dropped {unlabelled} minute(s) labelled for no task (--drop-unlabelled)")
    notes.append(f"dropped {sensorless} minute(s) in which every sensor block was empty")
    for b, count in filled.items():
        if count:
            notes.append(f"block {b}: {count} empty value(s) in present minutes -> train mean")
    for t in TASKS:
        counts = ", ".join(
            f"{s} {np.bincount(p.y[t][p.y[t] >= 0], minlength=len(TASKS[t])).tolist()}"
            for s, p in parts.items()
        )
        notes.append(f"task {t} labelled per class: {counts}")
    notes.append("users (index: UUID): " + ", ".join(f"{u.index}: {u.uuid}" for u in users))
    return notes


# -------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fed-iotlm import extrasensory SRC DST`` options."""
    parser.add_argument("--val-fraction", type=float, default=0.2, help="of each user's minutes")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="of each user's minutes")
    parser.add_argument(
        "--gap-minutes", type=float, default=30.0, help="minutes dropped between blocks"
    )
    parser.add_argument(
        "--drop-unlabelled",
        action="store_true",
        help="keep only minutes labelled for at least one task",
    )
    parser.add_argument("--name", default="extrasensory")


def run(args: argparse.Namespace) -> ImportResult:
    return import_extrasensory(
        args.src,
        args.dst,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        gap_minutes=args.gap_minutes,
        drop_unlabelled=args.drop_unlabelled,
        name=args.name,
    )
