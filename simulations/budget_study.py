"""Budget study: is the federation within reach of the centralized model on the same labels?

``python -m simulations.budget_study [--labels 0.1,0.3] [--grid 10,40] [--seeds 3]``

On the MMBind study federation (``configs/experiment/mmbind_study.yaml``: 8 nodes, IMU
everywhere, audio and depth never on one node at 50 % incompleteness) every method gets
its per-round optimiser-step budget (``train.steps``, and optionally its learning rate,
``--lr-grid``) chosen from the SAME grid on the validation split (seed 0; ties go to the
smaller budget), then runs every seed at that choice; only then is test read.  Writes ``docs/budget.md``: test mean ± std and 95 %
interval, the chosen budget, the steps and examples per node per round the runs
report, and the one code version that produced the table (a table refuses to mix).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fed_iotlm.atomic import atomic_write_text
from simulations.mmbind_study import incompleteness_plan, plan_override
from simulations.study_runner import REPO, fmt_mean_ci, one_code_version, point_key, run_one

# row label -> overrides (as in simulations/mmbind_study.py: late fusion for the methods
# that use it there, so the centralized model gets the better head with scarce labels)
METHODS: dict[str, list[str]] = {
    "local": ["method=local"],
    "federated": ["method=federated"],
    "harmony": ["method=harmony"],
    "ssl_spine": ["method=mmbind", "binding.bind=false", "model.fusion=late"],
    "mmbind": ["method=mmbind", "model.fusion=late"],
    "centralized": ["method=centralized", "model.fusion=late"],
}
DEFAULT_METHODS = ("local", "federated", "harmony", "centralized")


def point(label_fraction: float, extra: list[str]) -> list[str]:
    """Overrides of one point: 50 % incompleteness, the label fraction, the extras."""
    plan = plan_override(incompleteness_plan(0.5))
    return [plan, f"partition.label_fraction={label_fraction}", *extra]


def choose_on_val(runs: dict[tuple[int, float], dict]) -> tuple[int, float]:
    """The (steps, lr) with the best validation accuracy (ties: the smaller budget,
    then the smaller learning rate)."""
    return max(sorted(runs), key=lambda c: (runs[c]["val"]["accuracy"], -c[0], -c[1]))


def lr_override(lr: float) -> list[str]:
    """``train.lr=<lr>``, or nothing for 0.0 (the config's own learning rate)."""
    return [f"train.lr={lr}"] if lr else []


def run(out: Path, method: str, steps: int, seed: int, base: list[str]) -> dict:
    """One resumable run at a budget (logged to MLflow experiment ``budget-study``).

    Runs are filed as ``simulations.mmbind_study`` files them (point folder, then
    ``<method>-seed<n>``), so with ``--out runs/mmbind_study`` a run the MMBind study
    already made at the same point, budget and code version is reused, not repeated."""
    point = [*base, f"train.steps={steps}"]
    overrides = [*METHODS[method], f"seed={seed}", *point]
    t0 = time.time()
    res = run_one(
        out / point_key(point) / f"{method}-seed{seed}",
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


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Run the study; ``argv`` defaults to the command line (``fed-iotlm study`` passes
    its own, with ``prog`` naming the verb in usage and errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--labels", default="0.1,0.3")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=", ".join(METHODS))
    parser.add_argument("--grid", default="10,40", help="train.steps values to choose from")
    parser.add_argument("--lr-grid", default="", help="train.lr values (default: the config's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--extra", default="", help="Hydra overrides added to every run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "budget_study")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "budget.md")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "simulations.budget_study", *argv])
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
    grid = [int(s) for s in args.grid.split(",")]
    lrs = [float(v) for v in args.lr_grid.split(",")] if args.lr_grid else [0.0]
    extra = shlex.split(args.extra)
    rows: dict[str, dict[str, dict]] = {}
    for frac in (float(f) for f in args.labels.split(",")):
        base = point(frac, extra)
        for method in args.methods.split(","):
            tried = {
                (s, lr): run(args.out, method, s, 0, [*base, *lr_override(lr)])
                for s in grid
                for lr in lrs
            }
            steps, lr = choose_on_val(tried)
            results = [
                run(args.out, method, steps, seed, [*base, *lr_override(lr)])
                for seed in range(args.seeds)
            ]
            rows.setdefault(f"{frac:g}", {})[method] = {
                "steps": steps,
                "lr": lr,
                "runs": results,
                "tried": {c: r["val"]["accuracy"] for c, r in tried.items()},
            }
            write_doc(args.doc, rows, grid, args)
    print(args.doc)


def budget_cells(budget: dict) -> str:
    """Steps and examples per node per round as a run reports them; the centralized
    model reports them per round for its one pooled model (``train.steps`` x nodes)."""
    if budget.get("steps_per_node_round") is not None:
        return f"{budget['steps_per_node_round']:g} | {budget['examples_per_node_round']:g}"
    if budget.get("steps_per_round") is not None:
        return f"{budget['steps_per_round']:g} (pooled) | {budget['examples_per_round']:g} (pooled)"
    return "? | ?"


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
        f"`{args.command}`.",
        "",
        "| labels | method | val (seed 0) per grid point | steps / round, lr (chosen on val) "
        "| val | test | steps / node / round | examples / node / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for frac, by_method in rows.items():
        for method, row in by_method.items():
            runs = row["runs"]
            budget = runs[0].get("budget", {})
            lines.append(
                f"| {float(frac):.0%} | {method} | "
                + ", ".join(
                    f"{st}{'@' + str(lr) if lr else ''}: {v:.3f}"
                    for (st, lr), v in row["tried"].items()
                )
                + f" | {row['steps']}, {row['lr'] or 'config'} "
                f"| {fmt_mean_ci([r['val']['accuracy'] for r in runs])} "
                f"| {fmt_mean_ci([r['test']['accuracy'] for r in runs])} "
                f"| {budget_cells(budget)} |"
            )
    atomic_write_text(path, "\n".join(lines) + "\n")
    compact = {
        frac: {
            m: {
                "steps": row["steps"],
                "lr": row["lr"],
                "val_by_grid_point": {f"{st},{lr}": v for (st, lr), v in row["tried"].items()},
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
