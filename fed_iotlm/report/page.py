"""The page as data: sections of text, tables and figures, rendered to Markdown or HTML.

Builders fill these; the renderers never compute anything, so both formats always
show the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric: list[bool] = field(default_factory=list)  # right-align these columns

    def __post_init__(self) -> None:
        if not self.numeric:
            self.numeric = [False] * len(self.columns)


@dataclass
class Figure:
    file: str  # PNG name, next to the page
    alt: str


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)  # paragraphs (Markdown inline allowed)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    collapse_tables: bool = False  # long per-run tables fold away in HTML


@dataclass
class Page:
    title: str
    summary: list[str]  # bullet lines
    sections: list[Section]
    omitted: list[str]  # "Per-site accuracy: no run logged diagnostics."
    footnotes: list[str] = field(default_factory=list)


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``0.933 ± 0.004`` over seeds; a single value bare; nothing as a dash."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt(vals[0], digits)
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"


def mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % interval (Student t over seeds; 0 for one)."""
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return float(v.mean()), 0.0
    half = student_t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(v.mean()), float(half)
