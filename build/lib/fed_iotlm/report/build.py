"""Runs of one experiment -> sections -> report.md / report.html + PNGs in one directory."""

from __future__ import annotations

from pathlib import Path

from . import render
from .groups import Study
from .page import Page, Section
from .runs import ReportError, load_runs
from .sections import BUILDERS, summary

FORMATS = {"md": ("md",), "html": ("html",), "both": ("md", "html")}


def build_report(
    experiment: str,
    tracking_uri: str,
    out: Path,
    fmt: str = "both",
    *,
    include_unfinished: bool = False,
) -> list[Path]:
    """Write the report for ``experiment`` into ``out``; return the page(s) written."""
    if fmt not in FORMATS:
        raise ReportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    runs, skipped = load_runs(tracking_uri, experiment, include_unfinished=include_unfinished)
    study = Study.of(experiment, tracking_uri, runs, skipped)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    omitted: list[str] = []
    for builder in BUILDERS:
        result = builder(study, out)
        (sections if isinstance(result, Section) else omitted).append(result)
    page = Page(
        title=f"Report: MLflow experiment {experiment}",
        summary=summary(study),
        sections=sections,
        omitted=omitted,
        footnotes=study.namer.legend(),
    )
    return render.write(page, out, FORMATS[fmt])
