"""``fed-iotlm tune [key=value ...]``: the central IoT-LM stage, configured by Hydra
overrides of ``configs/config.yaml`` (its ``llm`` block), e.g. ``llm.bundle=DIR``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help="instruction-tune the LM on the sensor encoders", description=__doc__
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. llm.bundle=runs/x/bundle llm.steps=100"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fed_iotlm.llm.stage import run_stage
    from fed_iotlm.settings import compose

    cfg = compose(args.overrides)
    out = Path(cfg.get("output_dir") or Path("outputs") / time.strftime("llm-%Y%m%d-%H%M%S"))
    created = [d for d in (out, *out.parents) if not d.exists()]  # innermost first
    try:
        path = run_stage(cfg, out)
    except Exception:
        remove_empty(created)
        raise
    print(path.resolve())
    return 0


def remove_empty(created: list[Path]) -> None:
    """Remove the folders this run created, innermost first, while they are empty: the
    stage makes its output folder before it reads the bundle, and a run refused for bad
    input should leave nothing behind (a folder that holds anything is kept)."""
    for directory in created:
        if not directory.is_dir() or any(directory.iterdir()):
            return
        directory.rmdir()
