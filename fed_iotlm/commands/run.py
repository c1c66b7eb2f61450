"""``fed-iotlm run [key=value ...]``: one experiment, as ``python -m simulations.run``.

Hydra overrides of ``configs/`` follow the verb (``fed-iotlm run experiment=quick
rounds=5``); outputs go to ``output_dir`` or, as with ``simulations.run``, to
``outputs/<date>/<time>``.  The last line printed is the path of results.json."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run one experiment (federation or a reference method)", description=__doc__
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. experiment=quick method=fedavg"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_iotlm.settings import compose
    from simulations.run import run_experiment

    cfg = compose(args.overrides)
    out = Path(cfg.get("output_dir") or Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S"))
    path = run_experiment(cfg, out)
    print(path.resolve())
    return 0
