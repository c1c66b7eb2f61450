"""``fed-iotlm import <layout> SRC DST``: convert a public dataset to the exchange format.

The layouts and their options live in :mod:`fed_iotlm.data.importers`; this module
only wires them into the command line and prints what the import did (sample counts,
modalities, dropped rows, the chosen split), so the user can check it before training.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fed_iotlm.data.importers import LAYOUTS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``import`` with one sub-command per layout."""
    parser = subparsers.add_parser(
        "import",
        help="convert a public dataset layout to the exchange format",
        description=__doc__.splitlines()[0],
    )
    layouts = parser.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    for name in LAYOUTS:
        module = importlib.import_module(f"fed_iotlm.data.importers.{name}")
        sub = layouts.add_parser(
            name,
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("src", help="the release as downloaded")
        sub.add_argument("dst", help="dataset directory to write (replaced if it is one)")
        module.add_arguments(sub)
        sub.set_defaults(func=run, importer=module)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen importer; a bad source is a one-line error and exit status 2."""
    try:
        result = args.importer.run(args)
    except (ValueError, OSError) as exc:  # SourceFormatError and DatasetFormatError included
        print(f"fed-iotlm import {args.layout}: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0
