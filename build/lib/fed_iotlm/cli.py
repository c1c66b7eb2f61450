"""``fed-iotlm <command>``: one entry point, one module per command.

Each module in :mod:`fed_iotlm.commands` exposes ``add_parser(subparsers)`` (which sets
``func`` on its parser) so a command is added by adding its module to ``COMMANDS``;
imports are lazy so ``fed-iotlm --help`` does not pay for torch or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("tune", "ask", "certs", "sites", "importer", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed-iotlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fed_iotlm.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"fed_iotlm.commands.{name}":
                raise
            continue  # a command whose module is not in this build
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
