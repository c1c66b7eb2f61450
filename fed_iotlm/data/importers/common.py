"""What every importer shares: the source-error type, the checked writer, option parsing.

An importer turns someone else's release layout into the exchange format.  Two rules
hold for all of them: a problem in the *source* is reported against the source file
(the person reading the message has that file open, not our output), and the output
is written atomically and then read back through the validated loader, so an import
that succeeds is one that ``data=npz data.path=DST`` will accept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..dataset import MultisensoryDataset, Split
from ..exchange import load_dataset, save_dataset
from ..modalities import KINDS, RAW_SAMPLE_RANK, check_kind


class SourceFormatError(ValueError):
    """A source file does not follow the layout its importer reads."""


def fail(path: str | os.PathLike[str], problem: str) -> SourceFormatError:
    """The error for ``path``; callers ``raise`` it so the flow stays visible."""
    return SourceFormatError(f"{path}: {problem}")


@dataclass
class ImportResult:
    """An import's outcome: where it went, the dataset as the loader reads it back,
    and notes worth printing (dropped rows, chosen split, ...)."""

    path: Path
    dataset: MultisensoryDataset
    notes: list[str] = field(default_factory=list)
    val: Split | None = None  # the ``val.npz`` written beside train/test, read back

    def splits(self) -> list[tuple[str, Split]]:
        """(name, split) of every split written, in train, val, test order."""
        ds = self.dataset
        middle = [] if self.val is None else [("val", self.val)]
        return [("train", ds.train), *middle, ("test", ds.test)]

    def summary(self) -> str:
        """Human-readable lines for the command line."""
        ds = self.dataset
        lines = [f"imported {ds.meta.name!r} -> {self.path}"]
        lines.append("  samples: " + ", ".join(f"{n} {len(s)}" for n, s in self.splits()))
        for m, spec in ds.meta.modalities.items():
            shape = tuple(ds.train.x[m].shape[1:])
            missing = int(sum((~s.mask[m]).sum() for _, s in self.splits()))
            extra = f", {missing} missing" if missing else ""
            lines.append(f"  modality {m}: kind {spec.kind}, sample shape {shape}{extra}")
        for t, spec in ds.meta.tasks.items():
            lines.append(f"  task {t}: {spec.num_classes} classes")
        for name, split in self.splits():
            if split.site is not None:
                lines.append(f"  {name} sites: {sorted(int(s) for s in np.unique(split.site))}")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def write_checked(
    ds: MultisensoryDataset,
    dst: str | os.PathLike[str],
    notes: Iterable[str] = (),
    val: Split | None = None,
) -> ImportResult:
    """Write ``ds`` atomically in the exchange format and load it back validated.

    With ``val``, a ``val.npz`` (same keys as ``train.npz``) is written beside the other
    files by the same atomic writer, so the three splits appear together or not at all:
    a release that defines its own validation data keeps it, and no run has to carve
    one out of training data.
    """
    path = save_dataset(ds if val is None else replace(ds, val=val), dst)
    loaded = load_dataset(path)
    return ImportResult(path=path, dataset=loaded, notes=list(notes), val=loaded.val)


def parse_assignments(values: Iterable[str] | None, option: str) -> dict[str, str]:
    """``["a=b", "c=d"]`` -> ``{"a": "b", "c": "d"}``, for repeatable ``--opt k=v`` flags."""
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{option} expects NAME=VALUE, got {item!r}")
        if key.strip() in out:
            raise ValueError(f"{option} gives {key.strip()!r} twice")
        out[key.strip()] = value.strip()
    return out


# modality names that say their kind without being a kind's name
KIND_ALIASES: dict[str, str] = {
    "acc": "imu",
    "accel": "imu",
    "accelerometer": "imu",
    "gyro": "imu",
    "gyroscope": "imu",
    "mag": "imu",
    "magnetometer": "imu",
    "mic": "audio",
    "microphone": "audio",
    "sound": "audio",
    "rgb": "image",
    "camera": "image",
    "video": "image",
    "capacitance": "image",
    "ir": "thermal",
}


def kind_for(name: str, overrides: Mapping[str, str], where: str) -> str:
    """The kind of modality ``name``: ``--kind`` first, then a known kind or alias in the
    name (``imu``, ``imu_hand``, ``acc``); otherwise an error asking for ``--kind``."""
    if name in overrides:
        return check_kind(overrides[name], f"--kind {name}")
    base = name.lower()
    for candidate in (base, base.split("_")[0], base.split("-")[0]):
        if candidate in RAW_SAMPLE_RANK:
            return candidate
        if candidate in KIND_ALIASES:
            return KIND_ALIASES[candidate]
    raise fail(
        where,
        f"cannot tell the kind of modality {name!r} from its name; give it with "
        f"--kind {name}=KIND (one of {', '.join(KINDS)})",
    )


def dense_labels(
    raw: Mapping[str, np.ndarray], where: Mapping[str, str]
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Integer labels of several splits -> 0..K-1 over their union, plus class names.

    Releases number classes from 0 or 1 or with gaps; the exchange format wants 0..K-1,
    so the sorted distinct values become the classes (named by their original value).
    """
    for split, y in raw.items():
        if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
            raise fail(where[split], "labels must be whole numbers (got non-integer values)")
        if y.dtype.kind not in "fiu":
            raise fail(where[split], f"labels must be integers, got dtype {y.dtype}")
    values = np.unique(np.concatenate([y.astype(np.int64) for y in raw.values()]))
    out = {s: np.searchsorted(values, y.astype(np.int64)).astype(np.int64) for s, y in raw.items()}
    return out, tuple(str(int(v)) for v in values)


def check_partial_nan(path: str | os.PathLike[str], x: np.ndarray, what: str) -> None:
    """Refuse a sample with some but not all values NaN: the exchange format reads an
    all-NaN sample as missing, but a partly-NaN one is a broken recording."""
    flat = x.reshape(x.shape[0], -1)
    nan = np.isnan(flat)
    partial = np.flatnonzero(nan.any(axis=1) & ~nan.all(axis=1))
    if partial.size:
        raise fail(
            path,
            f"{what}: sample {int(partial[0])} is partly NaN ({partial.size} such sample(s)); "
            "a missing sample must be all NaN",
        )
