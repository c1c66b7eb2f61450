"""``fed-iotlm <command>``: one entry point, one module per command.

Each module in :mod:`fed_iotlm.commands` exposes ``add_parser(subparsers)`` (which sets
``func`` on its parser) so a command is added by adding its module to ``COMMANDS``;
imports are lazy so ``fed-iotlm --help`` does not pay for torch or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("run", "study", "tune", "ask", "certs", "sites", "importer", "report")

# optional modules each command needs (fed_iotlm.extras names the extra for each)
NEEDS = {
    "tune": ("transformers", "peft", "gguf"),
    "ask": ("transformers", "peft", "gguf"),
    "report": ("jinja2", "matplotlib", "mlflow"),
}
# set to 1 to see the traceback of a user error too
TRACEBACK_ENV = "FED_IOTLM_TRACEBACK"


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
    """Run a command; a user error (bad value or key, missing file, missing extra) ends
    with one line on stderr naming it and exit status 2, not a traceback."""
    args = build_parser().parse_args(argv)
    from fed_iotlm.logs import configure

    configure()
    try:
        check_extras(args.command)
        return int(args.func(args) or 0)
    except Exception as err:
        if not is_user_error(err) or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"fed-iotlm {args.command}: error: {text or type(err).__name__}", file=sys.stderr)
        return 2


def check_extras(command: str) -> None:
    """Stop before any work when the command needs an extra that is not installed."""
    from fed_iotlm.extras import EXTRA_OF, MissingExtraError, has

    missing = [m for m in NEEDS.get(command, ()) if not has(m)]
    if missing:
        extras = sorted({EXTRA_OF[m] for m in missing})
        raise MissingExtraError(
            f"fed-iotlm {command} needs {', '.join(missing)}, not installed: "
            f"pip install 'fed-iotlm[{','.join(extras)}]'"
        )


def is_user_error(err: BaseException) -> bool:
    """Errors that describe bad input, not a bug: configuration values and keys
    (ValueError, Hydra's composition errors), missing files, missing extras."""
    from fed_iotlm.extras import MissingExtraError

    if isinstance(err, ValueError | FileNotFoundError | MissingExtraError):
        return True
    hydra_errors = sys.modules.get("hydra.errors")
    return hydra_errors is not None and isinstance(err, hydra_errors.HydraException)


if __name__ == "__main__":
    sys.exit(main())
