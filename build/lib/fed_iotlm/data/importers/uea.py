"""UEA/UCR multivariate ``.ts`` archives -> exchange format.

A UEA problem ships as ``<Name>_TRAIN.ts`` and ``<Name>_TEST.ts``; SRC is the folder
holding one such pair, or the ``_TRAIN.ts`` file itself.  Its dimensions are channels
of one recording; ``--channels acc=0,1,2 --channels gyro=3,4,5`` groups them into
modalities (BasicMotions: accelerometer and gyroscope), each [N, T, C].  Without
``--channels`` every dimension goes into one modality ``series``.  A group's kind
follows its name (``acc`` -> imu, see :func:`.common.kind_for`) or ``--kind``, else
``timeseries``; dimensions in no group are left out and listed in the summary.
Classes keep the order of the file's ``@classLabel`` line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..dataset import DatasetMeta, MultisensoryDataset, Split
from ..modalities import ModalitySpec, TaskSpec
from .common import (
    ImportResult,
    SourceFormatError,
    check_partial_nan,
    fail,
    kind_for,
    parse_assignments,
    write_checked,
)
from .ts_format import TsData, read_ts

SEQUENCE_KINDS: tuple[str, ...] = ("imu", "timeseries")


def import_uea(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    channels: Mapping[str, list[int]] | None = None,
    kinds: Mapping[str, str] | None = None,
    task: str = "label",
    name: str | None = None,
) -> ImportResult:
    """Import the UEA problem at ``src`` into the exchange-format directory ``dst``."""
    train_path, test_path = find_pair(Path(src))
    train, test = read_ts(train_path), read_ts(test_path)
    dims = train.x.shape[1]
    if test.x.shape[1:] != train.x.shape[1:]:
        raise fail(
            test_path,
            f"cases are [dims, length] = {list(test.x.shape[1:])} but {train_path.name} has "
            f"{list(train.x.shape[1:])}",
        )
    groups = dict(channels) if channels else {"series": list(range(dims))}
    _check_groups(train_path, groups, dims)
    kinds = dict(kinds or {})
    unknown = sorted(set(kinds) - set(groups))
    if unknown:
        raise ValueError(f"--kind names {unknown}, which are not modalities {sorted(groups)}")
    specs = {m: ModalitySpec(m, _kind(m, kinds)) for m in groups}
    classes = train.classes or tuple(sorted(set(train.labels) | set(test.labels)))
    splits = [
        _split(path, data, groups, classes, task)
        for path, data in ((train_path, train), (test_path, test))
    ]
    meta = DatasetMeta(
        name=name or train.problem or train_path.name[: -len("_TRAIN.ts")],
        modalities=specs,
        tasks={task: TaskSpec(task, classes)},
    )
    unused = sorted(set(range(dims)) - {c for g in groups.values() for c in g})
    notes = [f"read {train_path.name} and {test_path.name}"]
    if unused:
        notes.append(f"dimensions {unused} are in no --channels group and were left out")
    return write_checked(MultisensoryDataset(meta, *splits), dst, notes)


def find_pair(src: Path) -> tuple[Path, Path]:
    """(``*_TRAIN.ts``, ``*_TEST.ts``) from a folder with exactly one pair, or from the
    train file's path."""
    if src.is_file():
        if not src.name.upper().endswith("_TRAIN.TS"):
            raise fail(src, "expected a <Name>_TRAIN.ts file or a folder holding one")
        train = src
    elif src.is_dir():
        found = sorted(p for p in src.iterdir() if p.name.upper().endswith("_TRAIN.TS"))
        if len(found) != 1:
            names = [p.name for p in found]
            raise fail(src, f"expected exactly one <Name>_TRAIN.ts here, found {names}")
        train = found[0]
    else:
        raise fail(src, "not found")
    stem = train.name[: -len("_TRAIN.ts")]
    test = train.with_name(f"{stem}_TEST{train.suffix}")
    if not test.is_file():
        raise fail(test, f"file not found (the test half of {train.name})")
    return train, test


def parse_channels(values: list[str] | None) -> dict[str, list[int]]:
    """``["acc=0,1,2", "gyro=3,4,5"]`` -> ``{"acc": [0, 1, 2], "gyro": [3, 4, 5]}``."""
    out: dict[str, list[int]] = {}
    for m, spec in parse_assignments(values, "--channels").items():
        try:
            out[m] = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError as exc:
            raise ValueError(f"--channels {m}={spec}: expected comma-separated integers") from exc
    return out


def _check_groups(path: Path, groups: Mapping[str, list[int]], dims: int) -> None:
    seen: dict[int, str] = {}
    for m, idx in groups.items():
        if not idx:
            raise ValueError(f"--channels {m}: no dimension given")
        for i in idx:
            if not 0 <= i < dims:
                raise fail(path, f"--channels {m}: dimension {i} out of range (file has {dims})")
            if i in seen:
                raise ValueError(f"dimension {i} is in both {seen[i]!r} and {m!r}")
            seen[i] = m


def _kind(m: str, kinds: Mapping[str, str]) -> str:
    try:
        kind = kind_for(m, kinds, f"modality {m!r}")
    except SourceFormatError:
        return "timeseries"  # UEA dimensions are generic series unless named otherwise
    if kind not in SEQUENCE_KINDS:
        raise ValueError(
            f"modality {m!r}: kind {kind!r} does not fit [N, T, C] series; use one of "
            f"{list(SEQUENCE_KINDS)}"
        )
    return kind


def _split(
    path: Path, data: TsData, groups: Mapping[str, list[int]], classes: tuple[str, ...], task: str
) -> Split:
    x = {}
    for m, idx in groups.items():
        arr = np.ascontiguousarray(data.x[:, idx, :].transpose(0, 2, 1), dtype=np.float32)
        check_partial_nan(path, arr, f"modality {m!r} (dimensions {idx})")
        x[m] = arr
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in data.labels], dtype=np.int64)
    return Split(
        x=x,
        mask={m: ~np.isnan(v).all(axis=(1, 2)) for m, v in x.items()},
        y={task: y},
    )


# -------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fed-iotlm import uea SRC DST`` options."""
    parser.add_argument(
        "--channels",
        action="append",
        metavar="MODALITY=I,J,K",
        help="put these dimensions (0-based) into one modality (repeatable)",
    )
    parser.add_argument(
        "--kind",
        action="append",
        metavar="MODALITY=KIND",
        help="kind of a modality (imu or timeseries; default from its name)",
    )
    parser.add_argument("--task", default="label", help="name of the label task")
    parser.add_argument("--name", default=None, help="dataset name (default: @problemName)")


def run(args: argparse.Namespace) -> ImportResult:
    return import_uea(
        args.src,
        args.dst,
        channels=parse_channels(args.channels),
        kinds=parse_assignments(args.kind, "--kind"),
        task=args.task,
        name=args.name,
    )
