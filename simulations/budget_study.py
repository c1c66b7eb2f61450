"""Budget study: is the federation within reach of the centralized model on the same labels?

``python -m simulations.budget_study [--labels 0.1,0.3] [--grid 10,40] [--seeds 3]
[--grid-extra 'centralized_mmbind:binding.pseudo_weight=0.0,1.0' ...]``

On the MMBind study federation (``configs/experiment/mmbind_study.yaml``: 8 nodes, IMU
everywhere, audio and depth never on one node at 50 % incompleteness) every method gets
its per-round optimiser-step budget (``train.steps``, and optionally its learning rate,
``--lr-grid``) chosen from the SAME grid on the validation split (seed 0), then runs
every seed at that choice; only then is test read.  ``--grid-extra METHOD:KEY=V1,V2``
(repeatable) adds a config key of one method's own to that method's grid (every
combination with the steps and learning rates), e.g. the centralized MMBind reference's
pseudo-pair weight.  Tie rule: of the grid points with the best validation accuracy,
the smaller budget, then the smaller learning rate, then the extra values in the order
``--grid-extra`` lists them.  Writes ``docs/budget.md``: test mean ± std and 95 %
interval, the chosen setting, the steps and examples per node per round the runs
report, and the one code version that produced the table (a table refuses to mix);
``docs/budget.json`` beside it holds the same choice and every grid point's validation
accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.config_schema import ConfigError
from fed_iotlm.settings import compose
from simulations.mmbind_study import EXPERIMENT, incompleteness_plan, plan_override
from simulations.study_progress import study_progress
from simulations.study_runner import REPO, fmt_mean_ci, one_code_version, point_key, run_one

# row label -> overrides (as in simulations/mmbind_study.py: late fusion for the methods
# that use it there, so the centralized model gets the better head with scarce labels)
METHODS: dict[str, list[str]] = {
    "local": ["method=local"],
    "federated": ["method=federated"],
    "harmony": ["method=harmony"],
    "ssl_spine": ["method=mmbind", "binding.bind=false", "model.fusion=late"],
    "mmbind": ["method=mmbind", "model.fusion=late"],
    # the fair pooled MMBind reference (mmbind_study's row); its pseudo-pair weight is best
    # chosen on validation: --grid-extra 'centralized_mmbind:binding.pseudo_weight=0.0,1.0'
    "centralized_mmbind": ["method=centralized_mmbind", "model.fusion=late"],
    "centralized": ["method=centralized", "model.fusion=late"],
}
# keys the study's own grid options set; --grid-extra may not set them too
GRID_KEYS = ("train.steps", "train.lr")
DEFAULT_METHODS = ("local", "federated", "harmony", "centralized")


def point(label_fraction: float, extra: list[str]) -> list[str]:
    """Overrides of one point: 50 % incompleteness, the label fraction, the extras."""
    plan = plan_override(incompleteness_plan(0.5))
    return [plan, f"partition.label_fraction={label_fraction}", *extra]


def choose_on_val(runs: dict[tuple, dict]) -> tuple:
    """The grid point ``(steps, lr[, extras])`` with the best validation accuracy.

    Ties (equal accuracies; they are ratios of counts) go to the smaller budget, then the
    smaller learning rate, then the first in ``runs``' order, which :func:`grid_points`
    makes the order ``--grid-extra`` lists the extra values in: list the setting you
    would take without evidence first.  Test is never read here."""
    order = sorted(runs, key=lambda c: (c[0], c[1]))  # stable: extras keep their order
    best = max(runs[c]["val"]["accuracy"] for c in order)
    return next(c for c in order if runs[c]["val"]["accuracy"] == best)


def parse_grid_extra(text: str) -> tuple[str, str, tuple[str, ...]]:
    """``METHOD:KEY=V1,V2`` -> (method, key, values); argparse shows a refusal as
    ``argument --grid-extra: ...`` naming what is wrong in the text given."""
    method, colon, rest = text.partition(":")
    key, equals, values_text = rest.partition("=")
    method, key = method.strip(), key.strip()
    values = tuple(v.strip() for v in values_text.split(","))
    problem = None
    if not colon or not equals:
        problem = "expected METHOD:KEY=V1,V2"
    elif method not in METHODS:
        problem = f"unknown method {method!r}; expected one of {', '.join(METHODS)}"
    elif not key or any(c.isspace() for c in key):
        problem = "no config key before '='"
    elif key in GRID_KEYS:
        problem = f"{key} has its own grid option (--grid / --lr-grid)"
    elif not all(values):
        problem = "an empty value (expected V1,V2,... after '=')"
    elif len(set(values)) != len(values):
        problem = "a value listed twice"
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return method, key, values


def grid_extras(
    given: list[tuple[str, str, tuple[str, ...]]],
) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Per method, its extra grid keys with their values, in the order given; a key
    given twice for one method is refused (which list would count?)."""
    extras: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for method, key, values in given:
        if any(k == key for k, _ in extras.get(method, [])):
            raise ValueError(f"--grid-extra gives {method}:{key} twice; give its values once")
        extras.setdefault(method, []).append((key, values))
    return extras


def grid_points(
    steps: list[int], lrs: list[float], extras: list[tuple[str, tuple[str, ...]]]
) -> list[tuple[int, float, tuple[str, ...]]]:
    """Every (steps, lr, extra overrides) of a method's grid: steps and learning rates
    ascending, then the extra values in the order given (the tie rule's order)."""
    combos = list(itertools.product(*[[f"{k}={v}" for v in vals] for k, vals in extras]))
    return [(s, lr, combo) for s in sorted(steps) for lr in sorted(lrs) for combo in combos]


def lr_override(lr: float) -> list[str]:
    """``train.lr=<lr>``, or nothing for 0.0 (the config's own learning rate)."""
    return [f"train.lr={lr}"] if lr else []


def run(out: Path, method: str, steps: int, seed: int, base: list[str]) -> dict:
    """One resumable run at a budget (logged to MLflow experiment ``budget-study``).

    Runs are filed as ``simulations.mmbind_study`` files them (point folder, then
    ``<method>-seed<n>``), so with ``--out runs/mmbind_study`` a run the MMBind study
    already made at the same point, budget and code version is reused, not repeated.
    ``base`` carries a grid point's learning rate and ``--grid-extra`` overrides, so each
    grid point is a folder of its own, named by its overrides and found again on resume."""
    point = [*base, f"train.steps={steps}"]
    overrides = [*METHODS[method], f"seed={seed}", *point]
    t0 = time.time()
    res = run_one(
        out / point_key(point, experiment=EXPERIMENT) / f"{method}-seed{seed}",
        overrides,
        experiment=EXPERIMENT,
        mlflow_experiment="budget-study",
    )
    print(
        f"{' '.join(base[1:])} | {method} | steps {steps} | seed {seed}: "
        f"val {res['val']['accuracy']:.3f} ({time.time() - t0:.0f}s)",
        flush=True,
    )
    return res


def check_grid_extras(
    extras: dict[str, list[tuple[str, tuple[str, ...]]]], methods: list[str], extra: list[str]
) -> None:
    """Refuse, naming the ``--grid-extra`` at fault, what would be dropped or clash: a
    method not in ``--methods`` (its grid would never run), a key the method's row or
    ``--extra`` already sets, and a key or value the config schema refuses (checked by
    composing each grid value now, not an hour into the study)."""
    for method, keys in extras.items():
        if method not in methods:
            raise ValueError(
                f"--grid-extra {method}:...: {method} is not in --methods ({','.join(methods)})"
            )
        fixed = {o.split("=", 1)[0].lstrip("+~") for o in [*METHODS[method], *extra]}
        for key, values in keys:
            if key in fixed:
                raise ValueError(
                    f"--grid-extra {method}:{key}: {key} is already set by the {method} row "
                    "or --extra"
                )
            for value in values:
                try:
                    compose(
                        [f"experiment={EXPERIMENT}", *METHODS[method], *extra, f"{key}={value}"]
                    )
                except ConfigError as err:
                    raise ValueError(f"--grid-extra {method}:{key}={value}: {err}") from err


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Run the study; ``argv`` defaults to the command line (``fed-iotlm study`` passes
    its own, with ``prog`` naming the verb in usage and errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--labels", default="0.1,0.3")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=", ".join(METHODS))
    parser.add_argument("--grid", default="10,40", help="train.steps values to choose from")
    parser.add_argument("--lr-grid", default="", help="train.lr values (default: the config's)")
    parser.add_argument(
        "--grid-extra",
        type=parse_grid_extra,
        action="append",
        default=[],
        metavar="METHOD:KEY=V1,V2",
        help="more values of a config key in one method's grid (repeatable); ties go to the "
        "value listed first",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--extra", default="", help="Hydra overrides added to every run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "budget_study")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "budget.md")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "simulations.budget_study", *argv])
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
    grid = [int(s) for s in args.grid.split(",")]
    lrs = [float(v) for v in args.lr_grid.split(",")] if args.lr_grid else [0.0]
    extra = shlex.split(args.extra)
    try:
        extras = grid_extras(args.grid_extra)
        check_grid_extras(extras, methods, extra)
    except ValueError as err:
        parser.error(str(err))
    rows: dict[str, dict[str, dict]] = {}
    fracs = [float(f) for f in args.labels.split(",")]
    # every grid point at seed 0, then the chosen one at each seed (seed 0 read back)
    per_label = sum(len(grid_points(grid, lrs, extras.get(m, []))) + args.seeds for m in methods)
    with study_progress(len(fracs) * per_label):
        for frac in fracs:
            base = point(frac, extra)
            for method in methods:
                tried = {
                    (s, lr, more): run(args.out, method, s, 0, [*base, *lr_override(lr), *more])
                    for s, lr, more in grid_points(grid, lrs, extras.get(method, []))
                }
                steps, lr, more = choose_on_val(tried)
                results = [
                    run(args.out, method, steps, seed, [*base, *lr_override(lr), *more])
                    for seed in range(args.seeds)
                ]
                rows.setdefault(f"{frac:g}", {})[method] = {
                    "steps": steps,
                    "lr": lr,
                    "extras": list(more),
                    "runs": results,
                    "tried": {c: r["val"]["accuracy"] for c, r in tried.items()},
                }
                write_doc(args.doc, rows, grid, args)
    print(args.doc)


def grid_label(steps: int, lr: float, more: Sequence[str]) -> str:
    """One grid point as the table names it: ``20``, ``20@0.001``, ``20 binding.x=0``."""
    return " ".join([f"{steps}{'@' + str(lr) if lr else ''}", *more])


def budget_cells(budget: dict) -> str:
    """Steps and examples per node per round as a run reports them; the centralized
    model reports them per round for its one pooled model (``train.steps`` x nodes)."""
    if budget.get("steps_per_node_round") is not None:
        return f"{budget['steps_per_node_round']:g} | {budget['examples_per_node_round']:g}"
    if budget.get("steps_per_round") is not None:
        return f"{budget['steps_per_round']:g} (pooled) | {budget['examples_per_round']:g} (pooled)"
    return "? | ?"


def write_doc(path: Path, rows: dict, grid: list[int], args) -> None:
    """docs/budget.md from the finished rows (rewritten after every method), and the
    same figures as JSON beside it (``budget.json``), the choice made on val in both."""
    every = [r for by_method in rows.values() for m in by_method.values() for r in m["runs"]]
    version = one_code_version(every)
    lines = [
        "# Equal budgets: federated vs centralized on the same labels",
        "",
        "MMBind study federation at 50 % incompleteness (8 nodes; audio and depth never on one",
        f"node). Each method's `train.steps` chosen on validation from the grid {grid} (seed 0)",
        "(with its learning rate and its `--grid-extra` keys where given; ties: the smaller",
        "budget, the smaller learning rate, then the extra value listed first), then every seed",
        "run at it. Test accuracy (mean over both tasks, all modalities present),",
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
            chosen = ", ".join([str(row["steps"]), str(row["lr"] or "config"), *row["extras"]])
            lines.append(
                f"| {float(frac):.0%} | {method} | "
                + ", ".join(f"{grid_label(*c)}: {v:.3f}" for c, v in row["tried"].items())
                + f" | {chosen} "
                f"| {fmt_mean_ci([r['val']['accuracy'] for r in runs])} "
                f"| {fmt_mean_ci([r['test']['accuracy'] for r in runs])} "
                f"| {budget_cells(budget)} |"
            )
    atomic_write_text(path, "\n".join(lines) + "\n")
    compact = {
        frac: {
            m: {
                "chosen_on": "val accuracy, seed 0",
                "steps": row["steps"],
                "lr": row["lr"],
                "extras": row["extras"],
                "val_by_grid_point": {
                    ",".join([str(st), str(lr), *more]): v
                    for (st, lr, more), v in row["tried"].items()
                },
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
