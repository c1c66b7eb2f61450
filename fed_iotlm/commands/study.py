"""``fed-iotlm study NAME [ARGS ...]``: run one of the studies in ``simulations/``.

A thin front door: ``fed-iotlm study budget --labels 0.3`` is
``python -m simulations.budget_study --labels 0.3``.  Everything after NAME goes to the
study's own ``main(argv)``, so its options, defaults and ``--help`` stay in one place
(the study module); this module only maps a name to a module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from fed_iotlm.extras import EXTRA_OF, MissingExtraError, has


class Study(NamedTuple):
    """Where a study lives, what it does (one line for ``--help``) and the optional
    packages it needs (checked before its module is imported)."""

    module: str
    summary: str
    needs: tuple[str, ...]


# Written out rather than read from each module's docstring: importing the study modules
# would pull in torch for a plain `fed-iotlm study --help`.
TRACKED = ("mlflow", "matplotlib")
STUDIES: dict[str, Study] = {
    "mmbind": Study(
        "simulations.mmbind_study",
        "MMBind vs the baselines over incompleteness, labels and shift (docs/results.md)",
        TRACKED,
    ),
    "budget": Study(
        "simulations.budget_study",
        "federated vs centralized at equal budgets chosen on validation (docs/budget.md)",
        TRACKED,
    ),
    "byzantine": Study(
        "simulations.byzantine_study",
        "robust aggregation rules under attacking nodes (docs/byzantine.md)",
        TRACKED,
    ),
    "shift": Study(
        "simulations.shift_study",
        "accuracy against domain-shift severity per method (docs/shift.md)",
        TRACKED,
    ),
    "realdata": Study(
        "simulations.realdata_study",
        "the federation on an imported public dataset (hapt, extrasensory)",
        TRACKED,
    ),
    "fedlora": Study(
        "simulations.fedlora_study",
        "FedIT / FFA-LoRA / FedEx-LoRA / FlexLoRA vs centralized LoRA (docs/fedlora.md)",
        ("transformers", "peft"),
    ),
    "dp": Study(
        "simulations.dp_study",
        "DP-FedAvg at many sampled nodes: accuracy at target ε vs non-private (docs/dp_study.md)",
        TRACKED,
    ),
}


def listing() -> str:
    """One line per study, for ``fed-iotlm study --help``."""
    width = max(map(len, STUDIES))
    rows = [f"  {name:<{width}}  {study.summary}" for name, study in STUDIES.items()]
    return (
        "studies:\n" + "\n".join(rows) + "\n\n`fed-iotlm study NAME --help` shows NAME's options."
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``study``; the study's own arguments are left unparsed for its main."""
    parser = subparsers.add_parser(
        "study",
        help="run a study (" + ", ".join(STUDIES) + "); options after the name go to it",
        description=__doc__,
        epilog=listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # optional for argparse, so that a missing name gets the same one-line error as an
    # unknown one (argparse would also call the remainder a missing argument)
    parser.add_argument("name", metavar="NAME", nargs="?", help="one of: " + ", ".join(STUDIES))
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="the study's own options (see NAME --help)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Hand the rest of the command line to the study's ``main``; a missing or unknown
    name is one line on stderr and exit status 2.  A study's own ``--help`` or bad option ends in
    its argparse's SystemExit (0 or 2), which passes through unchanged."""
    study = STUDIES.get(args.name) if args.name else None
    if study is None:
        what = f"unknown study {args.name!r}" if args.name else "no study named"
        print(f"fed-iotlm study: error: {what}; choose from {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    missing = [m for m in study.needs if not has(m)]
    if missing:
        extras = ",".join(sorted({EXTRA_OF[m] for m in missing}))
        raise MissingExtraError(
            f"fed-iotlm study {args.name} needs {', '.join(missing)}, not installed: "
            f"pip install 'fed-iotlm[{extras}]'"
        )
    main = importlib.import_module(study.module).main
    return int(main(list(args.args), prog=f"fed-iotlm study {args.name}") or 0)
