"""Budget study: is the federation within reach of the centralized model on the same labels?

``python -m simulations.budget_study [--labels 0.1,0.3] [--grid 10,40] [--seeds 3]``

On the MMBind study federation (``configs/experiment/mmbind_study.yaml``: 8 nodes, IMU
everywhere, audio and depth never on one node at 50 % incompleteness) every method gets
its per-round optimiser-step budget (``train.steps``) chosen from the SAME grid on the
validation split (seed 0; ties go to the smaller budget), then runs every seed at that
budget; only then is test read.  Writes ``docs/budget.md``: test mean ± std and 95 %
interval, the chosen budget, the steps and examples per node per round the runs
report, and the one code version that produced the table (a table refuses to mix).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from fed_iotlm.atomic import atomic_write_text
from simulations.mmbind_study import incompleteness_plan, plan_override
from simulations.study_runner import REPO, fmt_mean_ci, one_code_version, point_key, run_one

METHODS: dict[str, list[str]] = {
    "local": [],
    "federated": [],
    "harmony": [],
    "centralized": [],
}


def point(label_fraction: float, extra: list[str]) -> list[str]:
    """Overrides of one point: 50 % incompleteness, the label fraction, the extras."""
    plan = plan_override(incompleteness_plan(0.5))
    return [plan, f"partition.label_fraction={label_fraction}", *extra]


def choose_on_val(runs: dict[int, dict]) -> int:
    """The budget with the best validation accuracy (ties: the smaller budget)."""
    return max(sorted(runs), key=lambda s: (runs[s]["val"]["accuracy"], -s))


def run(out: Path, method: str, steps: int, seed: int, base: list[str]) -> dict:
    """One resumable run at a budget (logged to MLflow experiment ``budget-study``)."""
    overrides = [f"method={method}", f"seed={seed}", f"train.steps={steps}", *base]
    t0 = time.time()
    res = run_one(
        out / point_key(overrides) / f"{method}-seed{seed}",
        overrides,
        experiment="mmbind_study",
        mlflow_experiment="budget-study",
    )
    print(
        f"{' '.join(base[1:])} | {method} | steps {steps} | seed {seed}: "
        f"val {res['val']['accuracy']:.3f} ({time.time() - t0:.0f}s)",
        flush=True,
    )
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--labels", default="0.1,0.3")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--grid", default="10,40", help="train.steps values to choose from")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--extra", default="", help="Hydra overrides added to every run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "budget_study")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "budget.md")
    args = parser.parse_args()
    grid = [int(s) for s in args.grid.split(",")]
    extra = shlex.split(args.extra)
    rows: dict[str, dict[str, dict]] = {}
    for frac in (float(f) for f in args.labels.split(",")):
        base = point(frac, extra)
        for method in args.methods.split(","):
            chosen = choose_on_val({s: run(args.out, method, s, 0, base) for s in grid})
            results = [run(args.out, method, chosen, seed, base) for seed in range(args.seeds)]
            rows.setdefault(f"{frac:g}", {})[method] = {"steps": chosen, "runs": results}
            write_doc(args.doc, rows, grid, args)
    print(args.doc)


def write_doc(path: Path, rows: dict, grid: list[int], args) -> None:
    """docs/budget.md from the finished rows (rewritten after every method)."""
    every = [r for by_method in rows.values() for m in by_method.values() for r in m["runs"]]
    version = one_code_version(every)
    lines = [
        "# Equal budgets: federated vs centralized on the same labels",
        "",
        "MMBind study federation at 50 % incompleteness (8 nodes; audio and depth never on one",
        f"node). Each method's `train.steps` chosen on validation from the grid {grid} (seed 0),",
        "then every seed run at it. Test accuracy (mean over both tasks, all modalities present),",
        f"mean ± std over {args.seeds} seed(s) [95 % interval]. Produced by code version "
        f"`{version}`:",
        f"`python -m simulations.budget_study --labels {args.labels} --grid {args.grid} "
        f"--seeds {args.seeds}" + (f" --extra '{args.extra}'" if args.extra else "") + "`.",
        "",
        "| labels | method | steps / round (chosen on val) | val | test | steps / node / round "
        "| examples / node / round |",
        "|---|---|---|---|---|---|---|",
    ]
    for frac, by_method in rows.items():
        for method, row in by_method.items():
            runs = row["runs"]
            budget = runs[0].get("budget", {})
            lines.append(
                f"| {float(frac):.0%} | {method} | {row['steps']} "
                f"| {fmt_mean_ci([r['val']['accuracy'] for r in runs])} "
                f"| {fmt_mean_ci([r['test']['accuracy'] for r in runs])} "
                f"| {budget.get('steps_per_node_round')} | {budget.get('examples_per_node_round')} |"
            )
    atomic_write_text(path, "\n".join(lines) + "\n")
    compact = {
        frac: {
            m: {
                "steps": row["steps"],
                "val": [r["val"]["accuracy"] for r in row["runs"]],
                "test": [r["test"]["accuracy"] for r in row["runs"]],
                "budget": [r.get("budget") for r in row["runs"]],
            }
            for m, row in by_method.items()
        }
        for frac, by_method in rows.items()
    }
    atomic_write_text(
        path.with_suffix(".json"), json.dumps({"code_version": version, **compact}, indent=1)
    )


if __name__ == "__main__":
    main()
