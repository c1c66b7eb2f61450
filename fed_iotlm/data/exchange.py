"""Read and write the exchange format: ``meta.json`` + ``train.npz`` + ``test.npz``
(+ an optional ``val.npz`` with the same keys).

The exchange format is how users bring their own data, so the loader is the one place
where malformed input is caught.  Everything downstream assumes a :class:`Split` is
consistent (one N, finite values, boolean masks, labels in range), so every check
lives here and every error names the file, the key and the problem: the person who
reads the message is the one who produced the file, and they need to know exactly
what to fix.

Missing values have two spellings on disk (a ``mask.<m>`` of False, or a sample whose
values are all NaN) and one in memory (mask False, values 0.0), so tensors built
from a split are always finite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import zipfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import DatasetMeta, MultisensoryDataset, Split
from .modalities import (
    ModalitySpec,
    TaskSpec,
    UnknownKindError,
    check_kind,
    names_read_alike,
    title_problem,
)

META_FILE = "meta.json"
SPLITS: tuple[str, ...] = ("train", "test")
OPTIONAL_SPLITS: tuple[str, ...] = ("val",)  # read when present, written when the dataset has it
DATASET_FILES: frozenset[str] = frozenset(
    {META_FILE, *(f"{s}.npz" for s in SPLITS + OPTIONAL_SPLITS)}
)

# kind -> the layout of x.<m> as the user should picture it, for error messages
X_LAYOUT: dict[str, str] = {
    "imu": "[N, T, C]",
    "timeseries": "[N, T, C]",
    "audio": "[N, L]",
    "image": "[N, C, H, W]",
    "depth": "[N, C, H, W]",
    "thermal": "[N, C, H, W]",
    "tabular": "[N, D]",
    "gps": "[N, D]",
}

# kind -> axis of x.<m> that must match len(channels) when meta lists channels.
# Audio is a mono waveform [N, L]: it has no channel axis, so its channels are not checked.
CHANNEL_AXIS: dict[str, int] = {
    "imu": -1,
    "timeseries": -1,
    "image": 1,
    "depth": 1,
    "thermal": 1,
    "tabular": 1,
    "gps": 1,
}

_MODALITY_FIELDS = frozenset({"kind", "rate_hz", "channels"})
_TASK_FIELDS = frozenset({"type", "classes", "descriptions", "title"})
_OPTIONAL_INT_KEYS: tuple[str, ...] = ("site", "subject")


class DatasetFormatError(ValueError):
    """A dataset directory does not follow the exchange format."""


class UnknownKindFormatError(DatasetFormatError, UnknownKindError):
    """``meta.json`` declares a modality kind the registry does not know.

    Both a format error (the file is wrong) and an unknown-kind error, so callers that
    catch either one see it.
    """


def _fail(path: Path, problem: str, key: str | None = None) -> DatasetFormatError:
    """Build the error for ``path`` (and ``key``); callers ``raise`` it so flow stays visible."""
    where = f"{path}: key {key!r}" if key is not None else f"{path}"
    return DatasetFormatError(f"{where}: {problem}")


# ----------------------------------------------------------------------------- meta.json


def load_meta(directory: str | os.PathLike[str]) -> DatasetMeta:
    """Read and validate ``<directory>/meta.json``.

    Unknown top-level keys (``description``, ``license``, ...) are allowed because they
    document the data without changing how it is read; unknown keys inside a modality or
    task entry are errors, because a typo there (``"chanels"``) would silently disable a
    check.
    """
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise _fail(path, "file not found (every dataset directory needs a meta.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"invalid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise _fail(path, f"expected a JSON object at top level, got {type(raw).__name__}")

    name = _require(path, raw, "name", str, "a string")
    if not name:
        raise _fail(path, "must be a non-empty string", "name")
    modalities_raw = _require(path, raw, "modalities", dict, "an object {name: {...}}")
    tasks_raw = _require(path, raw, "tasks", dict, "an object {name: {...}}")
    if not modalities_raw:
        raise _fail(path, "must declare at least one modality (got an empty object)", "modalities")

    modalities = {m: _parse_modality(path, m, v) for m, v in modalities_raw.items()}
    tasks = {t: _parse_task(path, t, v) for t, v in tasks_raw.items()}
    return DatasetMeta(name=name, modalities=modalities, tasks=tasks)


def _require(
    path: Path, obj: Mapping[str, Any], key: str, typ: type, what: str, prefix: str = ""
) -> Any:
    """``obj[key]`` if present and of type ``typ``, else an error saying what was expected.

    ``prefix`` is the dotted path of ``obj`` inside meta.json, so the error names the full key.
    """
    full = f"{prefix}{key}"
    if key not in obj:
        raise _fail(path, f"missing (expected {what})", full)
    value = obj[key]
    if not isinstance(value, typ):
        raise _fail(path, f"expected {what}, got {type(value).__name__}", full)
    return value


def _check_entry_name(path: Path, section: str, name: str) -> None:
    if not name or name.strip() != name:
        raise _fail(path, "name must be non-empty with no surrounding spaces", f"{section}.{name}")


def _parse_modality(path: Path, name: str, entry: Any) -> ModalitySpec:
    """One ``modalities.<name>`` entry -> :class:`ModalitySpec`, checking every field."""
    key = f"modalities.{name}"
    _check_entry_name(path, "modalities", name)
    if not isinstance(entry, dict):
        raise _fail(path, f"expected an object with a 'kind', got {type(entry).__name__}", key)
    unknown = sorted(set(entry) - _MODALITY_FIELDS)
    if unknown:
        raise _fail(path, f"unknown field(s) {unknown}; allowed: {sorted(_MODALITY_FIELDS)}", key)
    kind = _require(path, entry, "kind", str, "a modality kind string", prefix=f"{key}.")
    try:
        check_kind(kind, f"{path}: key '{key}.kind'")
    except UnknownKindError as exc:
        raise UnknownKindFormatError(str(exc)) from exc

    rate = entry.get("rate_hz")
    if rate is not None and (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise _fail(path, f"expected a positive number, got {rate!r}", f"{key}.rate_hz")

    channels = entry.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels):
        raise _fail(
            path, f"expected a list of non-empty strings, got {channels!r}", f"{key}.channels"
        )
    return ModalitySpec(
        name=name,
        kind=kind,
        rate_hz=None if rate is None else float(rate),
        channels=tuple(channels),
    )


def _parse_task(path: Path, name: str, entry: Any) -> TaskSpec:
    """One ``tasks.<name>`` entry -> :class:`TaskSpec`; only classification exists today."""
    key = f"tasks.{name}"
    _check_entry_name(path, "tasks", name)
    if not isinstance(entry, dict):
        raise _fail(path, f"expected an object with 'classes', got {type(entry).__name__}", key)
    unknown = sorted(set(entry) - _TASK_FIELDS)
    if unknown:
        raise _fail(path, f"unknown field(s) {unknown}; allowed: {sorted(_TASK_FIELDS)}", key)
    task_type = entry.get("type", "classification")
    if task_type != "classification":
        raise _fail(
            path, f"unsupported task type {task_type!r}; only 'classification'", f"{key}.type"
        )
    classes = _require(path, entry, "classes", list, "a list of class names", prefix=f"{key}.")
    if not classes:
        raise _fail(path, "empty list; a classification task needs classes", f"{key}.classes")
    if not all(isinstance(c, str) and c for c in classes):
        raise _fail(
            path, f"expected non-empty string class names, got {classes!r}", f"{key}.classes"
        )
    dups = sorted(c for c, count in Counter(classes).items() if count > 1)
    if dups:
        raise _fail(path, f"duplicate class name(s) {dups}", f"{key}.classes")
    alike = names_read_alike(classes)
    if alike:
        raise _fail(
            path,
            f"class names {alike} read the same in words (case, '_' and '-' ignored), "
            "so the LM stage could not tell its answers apart",
            f"{key}.classes",
        )
    descriptions = _parse_descriptions(path, key, classes, entry.get("descriptions"))
    title = entry.get("title", "")  # optional: what questions call the task
    problem = title_problem(title, classes) if "title" in entry else None
    if problem:
        raise _fail(path, problem, f"{key}.title")
    return TaskSpec(
        name=name, classes=tuple(classes), type=task_type, descriptions=descriptions,
        given_title=title.strip(),
    )  # fmt: skip


def _parse_descriptions(path: Path, key: str, classes: list[str], given: Any) -> tuple[str, ...]:
    """Optional ``tasks.<t>.descriptions``: ``{"<class>": "words", ...}`` for some or all
    classes, aligned to ``classes`` ("" where none is given; () when the key is absent).
    A key that is not a class is an error: a misspelt class would silently lose its words."""
    if given is None:
        return ()
    where = f"{key}.descriptions"
    if not isinstance(given, dict):
        raise _fail(
            path, f"expected an object {{class: description}}, got {type(given).__name__}", where
        )
    unknown = sorted(set(given) - set(classes))
    if unknown:
        raise _fail(path, f"not class name(s) {unknown}; the classes are {classes}", where)
    bad = sorted(c for c, d in given.items() if not isinstance(d, str) or not d.strip())
    if bad:
        raise _fail(path, f"expected a non-empty string for class(es) {bad}", where)
    return tuple(given.get(c, "").strip() for c in classes)


# ------------------------------------------------------------------------------- <split>.npz


def load_split(directory: str | os.PathLike[str], meta: DatasetMeta, split: str) -> Split:
    """Read and validate ``<directory>/<split>.npz`` against ``meta``.

    Every key must be accounted for: an unexpected key is an error rather than being
    dropped, because it is usually a misspelt modality or task whose data would
    otherwise vanish without a trace.
    """
    path = Path(directory) / f"{split}.npz"
    if not path.is_file():
        raise _fail(path, f"split file not found (a dataset needs {', '.join(SPLITS)})")
    arrays = _read_npz(path)
    _check_keys(path, meta, arrays)

    for m, spec in meta.modalities.items():
        _check_x_layout(path, f"x.{m}", spec, arrays[f"x.{m}"])
    n = _check_same_n(path, meta, arrays)

    x: dict[str, np.ndarray] = {}
    mask: dict[str, np.ndarray] = {}
    for m in meta.modalities:
        given = arrays.get(f"mask.{m}")
        given_mask = None if given is None else _as_mask(path, f"mask.{m}", given)
        x[m], mask[m] = _clean_modality(path, m, arrays[f"x.{m}"], given_mask)

    y = {t: _as_labels(path, f"y.{t}", arrays[f"y.{t}"], spec) for t, spec in meta.tasks.items()}
    ids = {k: _as_int_vector(path, k, arrays[k]) for k in _OPTIONAL_INT_KEYS if k in arrays}
    out = Split(x=x, mask=mask, y=y, site=ids.get("site"), subject=ids.get("subject"))
    _check_every_sample_present(path, out, n)
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, with pickled (object) arrays refused."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _fail(path, f"not a readable .npz file: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        npz_type = type(npz).__name__
        raise _fail(path, f"expected an .npz archive of named arrays, got a single {npz_type}")
    out: dict[str, np.ndarray] = {}
    with npz:
        for key in npz.files:
            try:
                out[key] = npz[key]
            except ValueError as exc:  # object arrays need pickle, which we never allow
                raise _fail(
                    path,
                    f"object dtype is not allowed (store numbers, not Python objects): {exc}",
                    key,
                ) from exc
    return out


def _check_keys(path: Path, meta: DatasetMeta, arrays: Mapping[str, np.ndarray]) -> None:
    """Every required key is there and no key is left unexplained."""
    required = [f"x.{m}" for m in meta.modalities] + [f"y.{t}" for t in meta.tasks]
    allowed = set(required) | {f"mask.{m}" for m in meta.modalities} | set(_OPTIONAL_INT_KEYS)
    for key in arrays:
        if key not in allowed:
            raise _fail(
                path,
                "unexpected key; allowed keys are x.<modality>, mask.<modality>, y.<task> for "
                f"the modalities {list(meta.modalities)} and tasks {list(meta.tasks)} declared "
                f"in {META_FILE}, plus {', '.join(_OPTIONAL_INT_KEYS)}",
                key,
            )
    for key in required:
        if key not in arrays:
            raise _fail(path, f"missing (declared in {META_FILE})", key)


def _check_x_layout(path: Path, key: str, spec: ModalitySpec, arr: np.ndarray) -> None:
    """Dtype, rank and channel count of ``x.<m>``, checked before any value is read."""
    if arr.dtype.kind not in "fiu":
        raise _fail(
            path, f"expected a numeric (float or integer) dtype, got dtype {arr.dtype}", key
        )
    rank = spec.raw_rank + 1
    if arr.ndim != rank:
        raise _fail(
            path,
            f"expected rank {rank} {X_LAYOUT[spec.kind]} for kind {spec.kind!r}, "
            f"got shape {arr.shape}",
            key,
        )
    if 0 in arr.shape[1:]:
        raise _fail(path, f"sample dimensions must be non-empty, got shape {arr.shape}", key)
    axis = CHANNEL_AXIS.get(spec.kind)
    if spec.channels and axis is not None and arr.shape[axis] != len(spec.channels):
        raise _fail(
            path,
            f"channel axis of {X_LAYOUT[spec.kind]} has size {arr.shape[axis]} but "
            f"{META_FILE} lists {len(spec.channels)} channels {list(spec.channels)} "
            f"(shape {arr.shape})",
            key,
        )


def _check_same_n(path: Path, meta: DatasetMeta, arrays: Mapping[str, np.ndarray]) -> int:
    """One N for every array; the first modality's N is the reference."""
    ref_key = f"x.{next(iter(meta.modalities))}"
    n = int(arrays[ref_key].shape[0])
    for key, arr in arrays.items():
        if arr.ndim == 0:
            raise _fail(path, "expected an array with a sample axis [N, ...], got a scalar", key)
        if arr.shape[0] != n:
            raise _fail(path, f"has N={arr.shape[0]} samples but {ref_key!r} has N={n}", key)
    return n


def _as_mask(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """``mask.<m>`` as bool [N]; 0/1 integers are accepted since many tools write those."""
    if arr.ndim != 1:
        raise _fail(path, f"expected shape [N], got shape {arr.shape}", key)
    if arr.dtype.kind == "b":
        return arr.astype(bool, copy=False)
    if arr.dtype.kind in "iu":
        bad = np.flatnonzero((arr != 0) & (arr != 1))
        if bad.size:
            i = int(bad[0])
            raise _fail(path, f"integer mask must hold only 0/1, got {arr[i]} at sample {i}", key)
        return arr.astype(bool)
    raise _fail(path, f"expected dtype bool (or 0/1 integers), got dtype {arr.dtype}", key)


def _clean_modality(
    path: Path, m: str, raw: np.ndarray, given_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """float32 values with missing samples zeroed, and the final presence mask.

    A sample is present iff its given mask (default True) is True and its values are not
    all NaN.  A present sample must then be fully finite: a stray NaN inside real data is
    a bug in the user's pipeline, and guessing a fill value would hide it.
    """
    key = f"x.{m}"
    n = raw.shape[0]
    with np.errstate(over="ignore"):  # float64 beyond float32 range -> Inf, reported below
        x = raw.astype(np.float32, copy=False)
    flat = x.reshape(n, int(np.prod(x.shape[1:])))
    all_nan = np.isnan(flat).all(axis=1)
    if given_mask is None:
        present = ~all_nan
    else:
        contradicts = np.flatnonzero(given_mask & all_nan)
        if contradicts.size:
            raise _fail(
                path,
                f"sample {int(contradicts[0])} is all NaN but mask.{m} says it is present "
                f"({contradicts.size} such sample(s))",
                key,
            )
        present = given_mask & ~all_nan
    bad = np.flatnonzero(present & ~np.isfinite(flat).all(axis=1))
    if bad.size:
        raise _fail(
            path,
            f"NaN or Inf inside present sample {int(bad[0])} ({bad.size} such sample(s)); "
            "mark a missing sample with mask False or make all its values NaN "
            "(float64 values beyond float32 range also become Inf)",
            key,
        )
    if not present.all():
        if not x.flags.writeable:
            x = x.copy()
        x[~present] = 0.0
    return x, present


def _as_labels(path: Path, key: str, arr: np.ndarray, spec: TaskSpec) -> np.ndarray:
    """``y.<t>`` as int64 [N] in [-1, num_classes - 1] (-1 = unlabelled)."""
    if arr.dtype.kind not in "iu":
        raise _fail(path, f"expected an integer dtype, got dtype {arr.dtype}", key)
    if arr.ndim != 1:
        raise _fail(path, f"expected shape [N], got shape {arr.shape}", key)
    bad = np.flatnonzero((arr < -1) | (arr >= spec.num_classes))
    if bad.size:
        i = int(bad[0])
        raise _fail(
            path,
            f"label {arr[i]} at sample {i} is out of range [-1, {spec.num_classes - 1}] "
            f"({spec.num_classes} classes; -1 = unlabelled; {bad.size} such sample(s))",
            key,
        )
    return arr.astype(np.int64)


def _as_int_vector(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """``site`` / ``subject`` as int64 [N]."""
    if arr.dtype.kind not in "iu":
        raise _fail(path, f"expected an integer dtype, got dtype {arr.dtype}", key)
    if arr.ndim != 1:
        raise _fail(path, f"expected shape [N], got shape {arr.shape}", key)
    return arr.astype(np.int64)


def _check_every_sample_present(path: Path, split: Split, n: int) -> None:
    """A sample with no modality at all carries no information, so it is refused."""
    if n == 0:
        return
    empty = np.flatnonzero(~split.present_any())
    if empty.size:
        raise _fail(
            path,
            f"{empty.size} sample(s) have no present modality (all masked or all NaN), "
            f"first at sample {int(empty[0])}",
        )


# ----------------------------------------------------------------------------------- dataset


def load_dataset(directory: str | os.PathLike[str]) -> MultisensoryDataset:
    """Load and validate a whole dataset directory (meta, train, test and, when the
    directory has one, val)."""
    root = Path(directory)
    if not root.is_dir():
        raise _fail(root, "dataset directory not found")
    meta = load_meta(root)
    return MultisensoryDataset(
        meta=meta,
        train=load_split(root, meta, "train"),
        test=load_split(root, meta, "test"),
        val=load_split(root, meta, "val") if (root / "val.npz").is_file() else None,
    )


def save_dataset(ds: MultisensoryDataset, directory: str | os.PathLike[str]) -> Path:
    """Write ``ds`` in the exchange format and return the directory.

    The files go into a temporary directory beside the target, which is then renamed
    into place, so a crash or error mid-way never leaves a half-written dataset that a
    later ``load_dataset`` would half-accept.  An existing target is replaced only if it
    holds nothing but dataset files (so unrelated user files are never deleted); it is
    moved aside first and restored if the final rename fails.  Missing samples are
    written as NaN with ``mask.<m>`` False, so loading gives back exactly ``ds``.
    """
    target = Path(directory).absolute()
    _check_replaceable(target)
    arrays = {s: _split_arrays(ds.meta, split, s) for s, split in ds.splits().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would survive the rename
    try:
        (tmp / META_FILE).write_text(
            json.dumps(ds.meta.to_json(), indent=2) + "\n", encoding="utf-8"
        )
        for s in arrays:
            with open(tmp / f"{s}.npz", "wb") as fh:
                np.savez(fh, **arrays[s])
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_replaceable(target: Path) -> None:
    """Refuse to overwrite anything that is not (or not only) a dataset directory."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise ValueError(f"{target}: exists and is not a directory; refusing to replace it")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in DATASET_FILES)
    if foreign:
        raise ValueError(
            f"{target}: holds files that are not part of a dataset {foreign}; "
            "refusing to replace it"
        )


def _sibling(target: Path, tag: str) -> Path:
    """A fresh hidden name beside ``target``: same filesystem, so renames are atomic."""
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex}"


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, moving an existing ``target`` aside first.

    POSIX cannot atomically exchange two directories, so there is a short window with no
    ``target``; at no point is there a partially written one.
    """
    if not target.exists():
        os.rename(tmp, target)
        return
    backup = _sibling(target, "old")
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _split_arrays(meta: DatasetMeta, split: Split, name: str) -> dict[str, np.ndarray]:
    """The npz arrays for one split; fails before anything is written if ``split`` and
    ``meta`` disagree or the split holds data the format cannot carry."""
    for m in meta.modalities:
        if m not in split.x or m not in split.mask:
            raise ValueError(f"{name} split: modality {m!r} from meta has no values or mask")
    for t in meta.tasks:
        if t not in split.y:
            raise ValueError(f"{name} split: task {t!r} from meta has no labels")
    undeclared = sorted((set(split.x) - set(meta.modalities)) | (set(split.y) - set(meta.tasks)))
    if undeclared or split.extra:
        raise ValueError(
            f"{name} split: {undeclared + sorted(split.extra)} are not declared in meta / not "
            "representable in the exchange format; refusing to drop them silently"
        )
    out: dict[str, np.ndarray] = {}
    for m in meta.modalities:
        present = np.asarray(split.mask[m], dtype=bool)
        x = np.array(split.x[m], dtype=np.float32, copy=True)
        x[~present] = np.nan
        out[f"x.{m}"] = x
        out[f"mask.{m}"] = present
    for t in meta.tasks:
        out[f"y.{t}"] = np.asarray(split.y[t], dtype=np.int64)
    for key in _OPTIONAL_INT_KEYS:
        value = getattr(split, key)
        if value is not None:
            out[key] = np.asarray(value, dtype=np.int64)
    return out
