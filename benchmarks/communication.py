"""Bytes up per node per round: full encoder sync vs adapter-delta sync (``sync.mode``).

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.communication [--quick] [--out FILE]``

Real Flower simulations (``simulations.run.run_experiment``, Ray backend) of the same
experiment, seed, data and rounds, one per side, run one after the other in this
command:

* ``full`` (baseline): ``sync.mode=full``, nodes send every group they hold.
* ``adapters``: ``sync.mode=adapters``, encoders frozen at their initialisation, nodes
  send the per-encoder adapters (``sync.kind``, ``sync.rank``), fusion and heads.
* ``adapters_from_bundle`` (unless ``--no-bundle``): ``sync.mode=adapters`` starting
  from the ``full`` run's bundle, i.e. encoders frozen at federated weights and
  ``--rounds`` more rounds: the deployment case of "train encoders once, then sync
  adapters only".  Its accuracy is after 2 x ``--rounds`` rounds in all.

Bytes are the strategy's own counts (``results.json`` ``comm``: array payload of every
train reply / number of replies), so they are exact, not timed; ``ratio`` is
adapters / full.  Accuracy is the global test accuracy (all modalities, mean over
tasks) after the last round; ``accuracy_by_modality`` shows what each single sensor
gives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import emit, loadavg, machine_info
from fed_iotlm.settings import compose


def run_side(overrides: list[str], out_dir: Path) -> dict:
    """One simulation; the parts of its results.json this benchmark reports."""
    from simulations.run import run_experiment

    cfg = compose([*overrides, "mlflow.enabled=false", f"output_dir={out_dir}"])
    t0 = time.perf_counter()
    res = json.loads(run_experiment(cfg, out_dir).read_text())
    return {
        "bytes_up_per_node_round": res["comm"]["bytes_up_per_node_round"],
        "bytes_down_per_node_round": res["comm"]["bytes_down_per_node_round"],
        "model_bytes": res["comm"]["model_bytes"],
        "accuracy": round(res["test"]["accuracy"], 4),
        "accuracy_by_task": {t: round(v["accuracy"], 4) for t, v in res["test"]["by_task"].items()},
        "accuracy_by_modality": {
            m: round(v, 4) for m, v in res["test"]["accuracy_by_modality"].items()
        },
        "rounds": res["rounds"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "loadavg_1m": loadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="experiment=quick, 2 rounds")
    p.add_argument("--experiment", default=None, help="configs/experiment/<name> (default)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per side (default 4)")
    p.add_argument("--kind", default="adapter", help="sync.kind: adapter | lora")
    p.add_argument("--rank", type=int, default=4, help="sync.rank (4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bundle", action="store_true", help="skip adapters_from_bundle")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.experiment = args.experiment or ("quick" if args.quick else "default")
    args.rounds = args.rounds or (2 if args.quick else 4)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    base = [f"experiment={args.experiment}", f"rounds={args.rounds}", f"seed={args.seed}"]
    adapters = ["sync.mode=adapters", f"sync.kind={args.kind}", f"sync.rank={args.rank}"]
    load_start, t0 = loadavg(), time.perf_counter()
    sides: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-comm-") as tmp:
        sides["full"] = run_side(base, Path(tmp) / "full")
        print(f"full: {json.dumps(sides['full'])}", file=sys.stderr, flush=True)
        sides["adapters"] = run_side(base + adapters, Path(tmp) / "adapters")
        print(f"adapters: {json.dumps(sides['adapters'])}", file=sys.stderr, flush=True)
        if not args.no_bundle:
            bundle = Path(tmp) / "full" / "bundle"
            sides["adapters_from_bundle"] = run_side(
                base + adapters + [f"sync.bundle={bundle}"], Path(tmp) / "from_bundle"
            )
    full = sides["full"]["bytes_up_per_node_round"]
    result = {
        "benchmark": "communication",
        "experiment": args.experiment,
        "rounds": args.rounds,
        "sync": {"kind": args.kind, "rank": args.rank},
        "bytes_up_per_node_round": {k: v["bytes_up_per_node_round"] for k, v in sides.items()},
        "ratio": round(sides["adapters"]["bytes_up_per_node_round"] / full, 4),
        "accuracy": {k: v["accuracy"] for k, v in sides.items()},
        "sides": sides,
        "wall_s": round(time.perf_counter() - t0, 1),
        "loadavg_1m": {"start": load_start, "end": loadavg()},
        "machine": machine_info(),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    # through the importable module, so Ray pickles the apps by reference to it
    from benchmarks.communication import main as _main

    _main()
