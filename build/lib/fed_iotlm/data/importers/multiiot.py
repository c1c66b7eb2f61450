"""MultiIoT release layout -> exchange format.

The MultiIoT benchmark ships each dataset (SAMoSA: IMU + audio, TouchPose:
capacitance + depth, ...) as one folder per modality holding ``train_data.npy`` and
``test_data.npy``, with label arrays ``{train,test}_label.npy`` (some releases spell
them ``_labels.npy``) either at the root or inside the modality folders::

    <root>/<modality>/train_data.npy   [N, ...]
    <root>/<modality>/test_data.npy
    <root>/train_label.npy             [N] (or one-hot [N, K]; or in a modality folder)
    <root>/test_label.npy

A modality's kind comes from its folder name (``imu``, ``audio``, ``depth``, aliases
such as ``acc`` or ``capacitance``) or from ``--kind name=kind``.  Arrays one rank short
of their kind gain a channel axis (depth [N, H, W] -> [N, 1, H, W]); sequences are read
as [N, T, C] unless ``--channels-first name`` says they are [N, C, T].  Labels are
renumbered 0..K-1 over train and test together; the classes are named by the original
values.
"""

from __future__ import annotations

import argparse
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..dataset import DatasetMeta, MultisensoryDataset, Split
from ..exchange import SPLITS
from ..modalities import RAW_SAMPLE_RANK, ModalitySpec, TaskSpec
from .common import (
    ImportResult,
    check_partial_nan,
    dense_labels,
    fail,
    kind_for,
    parse_assignments,
    write_checked,
)

LABEL_NAMES: tuple[str, ...] = ("{split}_label.npy", "{split}_labels.npy")


def import_multiiot(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    kinds: Mapping[str, str] | None = None,
    channels_first: Iterable[str] = (),
    task: str = "label",
    name: str | None = None,
) -> ImportResult:
    """Import the MultiIoT folder ``src`` into the exchange-format directory ``dst``."""
    root = Path(src)
    if not root.is_dir():
        raise fail(root, "source directory not found")
    kinds = dict(kinds or {})
    modalities = _modality_dirs(root)
    unknown = sorted((set(kinds) | set(channels_first)) - set(modalities))
    if unknown:
        raise fail(root, f"options name modalities {unknown} that have no folder here")
    labels_raw, label_files = {}, {}
    for split in SPLITS:
        label_files[split] = _find_labels(root, modalities, split)
        labels_raw[split] = _read_labels(label_files[split])
    labels, classes = dense_labels(labels_raw, {s: str(p) for s, p in label_files.items()})

    specs: dict[str, ModalitySpec] = {}
    x: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for m in modalities:
        kind = kind_for(m, kinds, str(root / m))
        specs[m] = ModalitySpec(m, kind)
        for split in SPLITS:
            path = root / m / f"{split}_data.npy"
            arr = _fit_layout(path, _load_npy(path), kind, m in set(channels_first))
            if arr.shape[0] != labels[split].shape[0]:
                raise fail(
                    path,
                    f"has N={arr.shape[0]} samples but {label_files[split]} has "
                    f"N={labels[split].shape[0]} labels",
                )
            check_partial_nan(path, arr, f"modality {m!r}")
            x[split][m] = arr
    splits = {s: _split(x[s], labels[s], task) for s in SPLITS}
    meta = DatasetMeta(
        name=name or root.resolve().name,
        modalities=specs,
        tasks={task: TaskSpec(task, classes)},
    )
    notes = [f"labels from {label_files['train']} and {label_files['test']}"]
    return write_checked(MultisensoryDataset(meta, splits["train"], splits["test"]), dst, notes)


def _modality_dirs(root: Path) -> list[str]:
    """Sub-folders holding a ``*_data.npy``; both splits must be there."""
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        present = [s for s in SPLITS if (sub / f"{s}_data.npy").is_file()]
        if not present:
            continue
        for s in SPLITS:
            if s not in present:
                raise fail(
                    sub / f"{s}_data.npy",
                    f"file not found (modality {sub.name!r} has "
                    f"{present[0]}_data.npy; every modality needs train and test)",
                )
        out.append(sub.name)
    if not out:
        raise fail(root, "no modality folder with train_data.npy/test_data.npy found")
    return out


def _find_labels(root: Path, modalities: list[str], split: str) -> Path:
    """The one label file of ``split``: at the root, else in the modality folders
    (where several folders hold one, they must be equal)."""
    names = [n.format(split=split) for n in LABEL_NAMES]
    for folder in [root] + [root / m for m in modalities]:
        found = [folder / n for n in names if (folder / n).is_file()]
        if len(found) > 1:
            raise fail(folder, f"holds both {names[0]} and {names[1]}; keep one")
        if found:
            _check_copies_agree(found[0], [root / m for m in modalities], names)
            return found[0]
    raise fail(
        root,
        f"no {split} labels: expected {' or '.join(names)} at the root or in a modality "
        f"folder ({', '.join(modalities)})",
    )


def _check_copies_agree(first: Path, folders: list[Path], names: list[str]) -> None:
    ref = _read_labels(first)
    for folder in folders:
        for n in names:
            other = folder / n
            if other.is_file() and other != first:
                arr = _read_labels(other)
                if arr.shape != ref.shape or not np.array_equal(arr, ref):
                    raise fail(other, f"labels differ from {first}; which one is right?")


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise fail(path, "file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise fail(path, f"not a readable .npy array of numbers: {exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise fail(path, "expected a single array (.npy), got an archive")
    if arr.dtype.kind not in "fiub":
        raise fail(path, f"expected a numeric array, got dtype {arr.dtype}")
    return arr


def _read_labels(path: Path) -> np.ndarray:
    """Labels [N]; [N, 1] is squeezed and one-hot [N, K] becomes its argmax."""
    arr = _load_npy(path)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 2:
        one_hot = np.isin(arr, (0, 1)).all() and (arr.sum(axis=1) == 1).all()
        if not one_hot:
            raise fail(path, f"labels of shape {arr.shape} are neither [N] nor one-hot [N, K]")
        arr = arr.argmax(axis=1)
    if arr.ndim != 1:
        raise fail(path, f"expected labels of shape [N], got shape {arr.shape}")
    return arr


def _fit_layout(path: Path, arr: np.ndarray, kind: str, channels_first: bool) -> np.ndarray:
    """``arr`` in the kind's raw layout; a missing channel axis is added, nothing else
    is guessed."""
    rank = RAW_SAMPLE_RANK[kind] + 1
    if channels_first:
        if rank != 3 or arr.ndim != 3:
            raise fail(
                path,
                f"--channels-first applies to sequences stored [N, C, T]; this is kind "
                f"{kind!r} with shape {arr.shape}",
            )
        arr = arr.transpose(0, 2, 1)
    if kind == "audio" and arr.ndim == 3 and 1 in arr.shape[1:]:
        arr = arr.reshape(arr.shape[0], -1)  # [N, L, 1] or [N, 1, L] mono
    elif arr.ndim == rank - 1 and rank in (3, 4):  # [N, T] -> [N, T, 1]; [N, H, W] -> [N, 1, H, W]
        arr = np.expand_dims(arr, axis=1 if rank == 4 else 2)
    if arr.ndim != rank:
        raise fail(
            path,
            f"shape {arr.shape} does not fit kind {kind!r}, which needs rank {rank} "
            f"(sequences [N, T, C], audio [N, L], grids [N, C, H, W], vectors [N, D]); "
            "set the kind with --kind NAME=KIND",
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def _split(x: dict[str, np.ndarray], y: np.ndarray, task: str) -> Split:
    return Split(
        x=x,
        mask={m: ~np.isnan(v.reshape(v.shape[0], -1)).all(axis=1) for m, v in x.items()},
        y={task: y},
    )


# ------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fed-iotlm import multiiot SRC DST`` options."""
    parser.add_argument(
        "--kind",
        action="append",
        metavar="MODALITY=KIND",
        help="kind of a modality folder whose name is not a kind (repeatable)",
    )
    parser.add_argument(
        "--channels-first",
        action="append",
        default=[],
        metavar="MODALITY",
        help="this sequence modality is stored [N, C, T] (repeatable)",
    )
    parser.add_argument("--task", default="label", help="name of the label task")
    parser.add_argument("--name", default=None, help="dataset name (default: SRC's folder name)")


def run(args: argparse.Namespace) -> ImportResult:
    return import_multiiot(
        args.src,
        args.dst,
        kinds=parse_assignments(args.kind, "--kind"),
        channels_first=args.channels_first,
        task=args.task,
        name=args.name,
    )
