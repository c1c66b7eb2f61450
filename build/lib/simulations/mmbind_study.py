"""MMBind study: ``python -m simulations.mmbind_study [--sweeps headline,incompleteness,labels,shift]``.

Every point runs each method with several seeds (one subprocess per run, so each
federation gets a fresh Ray), logs every run to MLflow (experiment ``mmbind-study``)
and writes ``docs/results.md`` with one table per sweep (mean ± std over seeds) and a
plot.  The federation is ``configs/experiment/mmbind_study.yaml``: IMU on every node,
audio only ever with IMU on some nodes, depth only ever with IMU on others, all three
at test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from simulations import study_runner
from simulations.study_report import write_report
from simulations.study_runner import REPO, point_key

# method -> extra overrides (fusion choice per method, stated in docs/results.md)
METHODS: dict[str, list[str]] = {
    "local": [],
    "fedavg": [],
    "harmony": [],
    "federated": [],
    "mmbind": ["model.fusion=late"],
    "centralized_mmbind": ["model.fusion=late"],
    "centralized": ["model.fusion=late"],
}
FEDERATED = ("fedavg", "harmony", "federated")
NON_SHARED = ("audio", "depth")


def incompleteness_plan(rate: float, nodes: int = 8) -> list[list[str]]:
    """IMU everywhere; ``rate`` of the nodes lack depth (from the front) and ``rate``
    lack audio (from the back), so at 50 % audio and depth never meet on a node."""
    n_miss = int(round(rate * nodes))
    plan = []
    for i in range(nodes):
        mods = ["imu"]
        if not i >= nodes - n_miss:
            mods.append("audio")
        if not i < n_miss:
            mods.append("depth")
        plan.append(mods)
    return plan


def plan_override(plan: list[list[str]]) -> str:
    return "partition.plan=[" + ",".join("[" + ",".join(p) + "]" for p in plan) + "]"


def sweep_points(name: str) -> list[tuple[str, list[str]]]:
    """(label, overrides) per point; the headline is 50 % incompleteness, 10 % labels."""
    headline = [plan_override(incompleteness_plan(0.5)), "partition.label_fraction=0.1"]
    if name == "headline":
        return [("50% missing, 10% labels", headline)]
    if name == "incompleteness":
        return [
            (
                f"{int(r * 100)}% missing",
                [plan_override(incompleteness_plan(r)), "partition.label_fraction=0.1"],
            )
            for r in (0.0, 0.25, 0.5, 0.75)
        ]
    if name == "labels":
        return [
            (
                f"{int(f * 100)}% labels",
                [plan_override(incompleteness_plan(0.5)), f"partition.label_fraction={f}"],
            )
            for f in (1.0, 0.3, 0.1)
        ]
    if name == "shift":
        return [(f"site shift {s}", [*headline, f"data.site_shift={s}"]) for s in (0.0, 0.5, 1.0)]
    raise ValueError(f"unknown sweep {name!r}")


def run_one(out: Path, overrides: list[str]) -> dict:
    """One resumable run of the MMBind study federation (logged to ``mmbind-study``)."""
    return study_runner.run_one(
        out, overrides, experiment="mmbind_study", mlflow_experiment="mmbind-study"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweeps", default="headline")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "mmbind_study")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args()
    methods = args.methods.split(",")
    table: dict = {}
    for sweep in args.sweeps.split(","):
        for label, overrides in sweep_points(sweep):
            for method in methods:
                for seed in range(args.seeds):
                    out = args.out / point_key(overrides) / f"{method}-seed{seed}"
                    t0 = time.time()
                    res = run_one(
                        out, [f"method={method}", f"seed={seed}", *METHODS[method], *overrides]
                    )
                    table.setdefault(sweep, {}).setdefault(label, {}).setdefault(method, []).append(
                        res["test"]
                    )
                    print(
                        f"{sweep} | {label} | {method} seed {seed}: {res['test']['accuracy']:.3f} ({time.time() - t0:.0f}s)",
                        flush=True,
                    )
            # the report is rewritten after each point, so an interrupted study keeps its results
            (args.out / "summary.json").write_text(json.dumps(table, indent=2))
            write_report(
                table,
                args.doc,
                args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out,
            )
    print(args.doc)


if __name__ == "__main__":
    main()
