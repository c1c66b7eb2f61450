"""``fed-iotlm report EXPERIMENT``: one page (Markdown and/or HTML, PNG plots beside it)
from the runs of an MLflow experiment.

Sections: a summary (runs, methods, best run), accuracy per round, final accuracy per
group of seeds and per run, accuracy against swept numeric params (shift curves),
accuracy per modality, per node and per site, communication, privacy and robustness.
A section without data is left out with a one-line note.  The store is only read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``report``."""
    parser = subparsers.add_parser(
        "report",
        help="tables and plots of an MLflow experiment's runs as one Markdown/HTML page",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("experiment", help="MLflow experiment name, e.g. mmbind-study")
    parser.add_argument(
        "--tracking-uri",
        default="sqlite:///mlflow.db",
        help="MLflow tracking URI (default: sqlite:///mlflow.db, the runs' default store)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="directory (default: outputs/report/EXPERIMENT)"
    )
    parser.add_argument("--format", choices=("md", "html", "both"), default="both")
    parser.add_argument(
        "--all-runs",
        action="store_true",
        help="include runs that are not FINISHED (running, failed, killed)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build; an unknown experiment or a missing store is a one-line error, exit status 2."""
    from fed_iotlm.report import ReportError, build_report

    out = args.out or Path("outputs") / "report" / args.experiment
    try:
        pages = build_report(
            args.experiment, args.tracking_uri, out, args.format,
            include_unfinished=args.all_runs,
        )  # fmt: skip
    except (ReportError, OSError) as exc:
        print(f"fed-iotlm report: error: {exc}", file=sys.stderr)
        return 2
    for path in pages:
        print(path)
    return 0
