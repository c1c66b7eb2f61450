"""``fed-iotlm report EXPERIMENT``: one page (Markdown and/or HTML, PNG plots beside it)
from the runs of an MLflow experiment.

Sections: a summary (runs, methods, best run), accuracy per round, final accuracy per
group of seeds and per run, accuracy against swept numeric params (shift curves),
accuracy per modality, per node and per site, communication, privacy and robustness.
A section without data is left out with a one-line note.  The store is only read.

``--study NAME`` prints instead the table(s) that study's page shows (docs/byzantine.md,
docs/shift.md, docs/results.md, docs/budget.md, a real-data study's ``--doc``), built
from the experiment's FINISHED runs by the same code the study's page writer calls; a
table refuses runs of two code versions, naming them.
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
    parser.add_argument(
        "--study",
        choices=STUDIES,
        default=None,
        help="print that study's page table(s) as Markdown instead of writing the report",
    )
    parser.set_defaults(func=run)


# --study NAME -> the module whose ``tables(runs, experiment)`` builds that study's tables
STUDIES = {
    "byzantine": "simulations.byzantine_study",
    "shift": "simulations.shift_study",
    "mmbind": "simulations.study_report",
    "budget": "simulations.budget_study",
    "realdata": "simulations.realdata_study",
}


def study_tables(experiment: str, tracking_uri: str, study: str) -> str:
    """The study's tables of ``experiment``'s runs, as the study's page shows them."""
    import importlib

    from fed_iotlm.report.render import markdown_table
    from fed_iotlm.report.runs import load_runs

    runs, _ = load_runs(tracking_uri, experiment, include_unfinished=True)
    tables = importlib.import_module(STUDIES[study]).tables(runs, experiment)
    return "\n".join(markdown_table(t) for t in tables)


def run(args: argparse.Namespace) -> int:
    """Build; an unknown experiment or a missing store is a one-line error, exit status 2."""
    from fed_iotlm.report import ReportError, build_report

    if args.study is not None:
        try:
            print(study_tables(args.experiment, args.tracking_uri, args.study), end="")
        except ValueError as exc:  # ReportError too: unknown experiment, no runs, two versions
            print(f"fed-iotlm report: error: {exc}", file=sys.stderr)
            return 2
        return 0
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
