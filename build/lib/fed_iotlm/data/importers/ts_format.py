"""Reader for the sktime/aeon ``.ts`` format of the UEA/UCR archives.

A ``.ts`` file is a header of ``@key value`` lines, then ``@data`` and one case per
line: dimensions separated by ``:``, values by ``,``, ``?`` for a missing value, and
the class label last::

    @problemName BasicMotions
    @univariate false
    @dimensions 6
    @equalLength true
    @seriesLength 100
    @classLabel true Standing Running Walking Badminton
    @data
    -0.74,-0.2,...:0.1,...:...:Standing

aeon's ``load_from_ts_file`` is used when aeon is installed; otherwise (the default
here, aeon is not a dependency) the small parser below reads the same subset: equal-
length, timestamp-free, labelled cases, which is what a fixed-size [N, T, C] array
can hold.  Anything else is refused with the file, line and reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import fail


@dataclass(frozen=True)
class TsData:
    """One ``.ts`` file: values [n, dims, length] (NaN = ``?``), labels, header facts."""

    x: np.ndarray
    labels: tuple[str, ...]
    classes: tuple[str, ...] | None  # from @classLabel, in the file's order
    problem: str | None


def read_ts(path: str | Path, *, use_aeon: bool | None = None) -> TsData:
    """Read ``path``; ``use_aeon`` None = aeon if it is installed."""
    path = Path(path)
    if not path.is_file():
        raise fail(path, "file not found")
    header, first_data_line = _read_header(path)
    if use_aeon is None:
        use_aeon = importlib.util.find_spec("aeon") is not None
    if use_aeon:
        x, labels = _read_with_aeon(path)
    else:
        x, labels = _read_data(path, header, first_data_line)
    classes = header.get("classlabel")
    if classes is not None:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise fail(path, f"labels {unknown} are not in @classLabel {list(classes)}")
    return TsData(x=x, labels=tuple(labels), classes=classes, problem=header.get("problemname"))


def _read_header(path: Path) -> tuple[dict, int]:
    """Header facts we rely on, and the 1-based number of the first data line."""
    header: dict = {}
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith("@"):
                raise fail(path, f"line {number}: data before @data")
            key, _, rest = line[1:].partition(" ")
            key, rest = key.lower(), rest.strip()
            if key == "data":
                if "classlabel" not in header:
                    raise fail(path, "no @classLabel line; a classification import needs labels")
                return header, number + 1
            if key == "timestamps" and rest.lower() == "true":
                raise fail(path, f"line {number}: timestamped series are not supported")
            if key == "targetlabel" and rest.lower().startswith("true"):
                raise fail(path, f"line {number}: regression targets are not supported")
            if key == "classlabel":
                flag, *names = rest.split()
                if flag.lower() != "true":
                    raise fail(path, f"line {number}: @classLabel false; labels are needed")
                header[key] = tuple(names)
            elif key == "dimensions":
                header[key] = _int(path, number, rest)
            elif key == "problemname":
                header[key] = rest
    raise fail(path, "no @data line")


def _int(path: Path, number: int, text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise fail(path, f"line {number}: expected an integer, got {text!r}") from exc


def _read_data(path: Path, header: dict, start: int) -> tuple[np.ndarray, list[str]]:
    """The cases after @data, checked for one dimension count and one length."""
    dims_expected = header.get("dimensions")
    cases: list[np.ndarray] = []
    labels: list[str] = []
    first: tuple[int, int] | None = None  # (line, length) of the first case
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.strip()
            if number < start or not line or line.startswith("#"):
                continue
            *dims, label = line.split(":")
            if not dims:
                raise fail(path, f"line {number}: expected values:...:label, got no ':'")
            if dims_expected is not None and len(dims) != dims_expected:
                raise fail(
                    path,
                    f"line {number}: {len(dims)} dimension(s) but @dimensions says {dims_expected}",
                )
            values = [_values(path, number, i, d) for i, d in enumerate(dims)]
            lengths = {v.size for v in values}
            if len(lengths) > 1:
                raise fail(
                    path,
                    f"line {number}: ragged case, its dimensions have lengths "
                    f"{[v.size for v in values]}",
                )
            length = lengths.pop()
            if first is None:
                first = (number, length)
                dims_expected = len(dims)
            elif length != first[1]:
                raise fail(
                    path,
                    f"line {number}: series length {length} differs from {first[1]} on line "
                    f"{first[0]}; unequal-length series are not supported (resample them "
                    "to one length first)",
                )
            cases.append(np.stack(values))
            labels.append(label.strip())
    if not cases:
        raise fail(path, "no cases after @data")
    return np.stack(cases), labels


def _values(path: Path, number: int, dim: int, text: str) -> np.ndarray:
    try:
        return np.array(text.replace("?", "nan").split(","), dtype=np.float64)
    except ValueError as exc:
        raise fail(path, f"line {number}, dimension {dim}: not comma-separated numbers") from exc


def _read_with_aeon(path: Path) -> tuple[np.ndarray, list[str]]:  # pragma: no cover - optional
    """aeon's reader, held to the same contract (equal length, labels)."""
    from aeon.datasets import load_from_ts_file

    try:
        x, y = load_from_ts_file(str(path))
    except Exception as exc:  # aeon raises IOError/ValueError/TsFileParseException
        raise fail(path, f"aeon could not read it: {exc}") from exc
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        raise fail(path, "unequal-length series are not supported (resample them first)")
    return x.astype(np.float64), [str(v) for v in y]
