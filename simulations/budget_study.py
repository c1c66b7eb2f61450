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
from fed_iotlm.report.page import Table
from fed_iotlm.report.params import varying_params
from fed_iotlm.report.render import markdown_table
from fed_iotlm.report.runs import Run
from fed_iotlm.report.study_table import (
    Column,
    budget_columns,
    label_of,
    one_version,
    result,
    seeds_column,
    study_table,
)
from fed_iotlm.settings import compose
from simulations import study_runner
from simulations.mmbind_study import EXPERIMENT, incompleteness_plan, plan_override
from simulations.study_progress import study_progress
from simulations.study_runner import REPO, logged_runs, point_key, run_one

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
MLFLOW_EXPERIMENT = "budget-study"
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


def run(
    out: Path,
    method: str,
    steps: int,
    seed: int,
    base: list[str],
    tracking_uri: str | None = None,
) -> dict:
    """One resumable run at a budget (logged to MLflow experiment ``budget-study``).

    Runs are filed as ``simulations.mmbind_study`` files them (point folder, then
    ``<method>-seed<n>``), so with ``--out runs/mmbind_study`` a run the MMBind study
    already made at the same point, budget and code version is reused, not repeated.
    ``base`` carries a grid point's learning rate and ``--grid-extra`` overrides, so each
    grid point is a folder of its own, named by its overrides and found again on resume."""
    point = [*base, f"train.steps={steps}"]
    overrides = [*METHODS[method], f"seed={seed}", *point]
    t0 = time.time()
    folder = out / point_key(point, experiment=EXPERIMENT) / f"{method}-seed{seed}"
    res = run_one(
        folder,
        overrides,
        experiment=EXPERIMENT,
        mlflow_experiment=MLFLOW_EXPERIMENT,
        tracking_uri=tracking_uri or study_runner.TRACKING_URI,
    )
    res = {**res, "out": str(folder)}
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
    parser.add_argument(
        "--tracking-uri",
        default=study_runner.TRACKING_URI,
        help="MLflow store the runs log to and the page is read from (default: the "
        "checkout's mlflow.db)",
    )
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
    outs: list[Path] = []
    fracs = [float(f) for f in args.labels.split(",")]
    # every grid point at seed 0, then the chosen one at each seed (seed 0 read back)
    per_label = sum(len(grid_points(grid, lrs, extras.get(m, []))) + args.seeds for m in methods)
    with study_progress(len(fracs) * per_label):
        for frac in fracs:
            base = point(frac, extra)
            for method in methods:
                tried = {
                    (s, lr, more): run(args.out, method, s, 0, [*base, *lr_override(lr), *more],
                                       args.tracking_uri)
                    for s, lr, more in grid_points(grid, lrs, extras.get(method, []))
                }  # fmt: skip
                steps, lr, more = choose_on_val(tried)
                results = [
                    run(args.out, method, steps, seed, [*base, *lr_override(lr), *more],
                        args.tracking_uri)
                    for seed in range(args.seeds)
                ]  # fmt: skip
                outs += [Path(r["out"]) for r in [*tried.values(), *results]]
                runs = logged_runs(MLFLOW_EXPERIMENT, outs, args.tracking_uri)
                write_doc(args.doc, runs, grid, args)
    print(args.doc)


def grid_label(steps: int, lr: float, more: Sequence[str]) -> str:
    """One grid point as the table names it: ``20``, ``20@0.001``, ``20 binding.x=0``."""
    return " ".join([f"{steps}{'@' + str(lr) if lr else ''}", *more])


GridPoint = tuple[int, float, tuple[str, ...]]


def row_of(run: Run) -> tuple[str, str] | None:
    """A run's (label fraction, method) row, from its params."""
    method = label_of(run.params, METHODS)
    frac = run.params.get("partition.label_fraction")
    return None if method is None or frac is None else (f"{float(frac):.0%}", method)


def choices(runs: list[Run]) -> dict[tuple[str, str], dict]:
    """Per row, every grid point's seed-0 validation accuracy and the point chosen on it
    (:func:`choose_on_val`), from the FINISHED runs.  A run's grid point is its
    ``train.steps``, its ``train.lr`` where the row's runs differ in it (else 0.0: the
    config's), and every other param they differ in (``--grid-extra`` keys), in the
    order the runs were made; test is never read."""
    rows: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.status == "FINISHED" and (row := row_of(run)) is not None:
            rows.setdefault(row, []).append(run)
    out = {}
    for row, members in rows.items():
        keys = [k for k in varying_params([r.params for r in members]) if k != "seed"]

        def point(run: Run, keys: list[str] = keys) -> GridPoint:
            lr = float(run.params["train.lr"]) if "train.lr" in keys else 0.0
            more = tuple(f"{k}={run.params.get(k)}" for k in keys
                         if k not in ("train.steps", "train.lr"))  # fmt: skip
            return int(float(run.params["train.steps"])), lr, more

        tried = {point(r): r.results for r in members
                 if r.params.get("seed") == "0" and r.results}  # fmt: skip
        if not tried:
            continue
        chosen = choose_on_val(tried)
        out[row] = {"point": point, "chosen": chosen,
                    "tried": {c: res["val"]["accuracy"] for c, res in tried.items()},
                    "runs": [r for r in members if point(r) == chosen]}  # fmt: skip
    return out


def tables(runs: list[Run], experiment: str = MLFLOW_EXPERIMENT, caption: str = "") -> list[Table]:
    """One table: a row per (label fraction, method) at the grid point chosen on
    validation, with every grid point's seed-0 validation accuracy beside it."""
    chosen = choices(runs)

    def row(run: Run) -> tuple[str, str] | None:
        r = row_of(run)
        return r if r in chosen and chosen[r]["point"](run) == chosen[r]["chosen"] else None

    def tried(rs: list[Run]) -> str:
        c = chosen[row_of(rs[0])]  # type: ignore[index]
        return ", ".join(f"{grid_label(*p)}: {v:.3f}" for p, v in c["tried"].items())

    def picked(rs: list[Run]) -> str:
        steps, lr, more = chosen[row_of(rs[0])]["chosen"]  # type: ignore[index]
        return ", ".join([str(steps), str(lr or "config"), *more])

    table = study_table(
        runs, row, ["labels", "method"],
        [Column("val (seed 0) per grid point", text=tried),
         Column("steps / round, lr (chosen on val)", text=picked), seeds_column(),
         Column("val", value=result("val", "accuracy")),
         Column("test", value=result("test", "accuracy")), *budget_columns()],
        caption=caption or "Val and test: accuracy, mean over both tasks, all modalities.",
    )  # fmt: skip
    return [table]


def write_doc(path: Path, runs: list[Run], grid: list[int], args) -> None:
    """docs/budget.md from the study's runs (read back from MLflow; rewritten after every
    method), and the same figures as JSON beside it (``budget.json``), the choice made on
    val in both."""
    (table,) = tables(runs, caption=f"Test accuracy (mean over both tasks, all modalities "
                      f"present) over {args.seeds} seed(s); `{args.command}`.")  # fmt: skip
    lines = [
        "# Equal budgets: federated vs centralized on the same labels",
        "",
        "MMBind study federation at 50 % incompleteness (8 nodes; audio and depth never on one",
        f"node). Each method's `train.steps` chosen on validation from the grid {grid} (seed 0)",
        "(with its learning rate and its `--grid-extra` keys where given; ties: the smaller",
        "budget, the smaller learning rate, then the extra value listed first), then every seed",
        "run at it.",
        "",
        markdown_table(table),
    ]
    atomic_write_text(path, "\n".join(lines))
    compact: dict[str, dict] = {}
    for (_, method), row in choices(runs).items():
        steps, lr, more = row["chosen"]
        done = row["runs"]
        frac = f"{float(done[0].params['partition.label_fraction']):g}"  # as --labels gives it
        compact.setdefault(frac, {})[method] = {
            "chosen_on": "val accuracy, seed 0",
            "steps": steps,
            "lr": lr,
            "extras": list(more),
            "val_by_grid_point": {",".join([str(st), str(v), *m]): acc
                                  for (st, v, m), acc in row["tried"].items()},
            "val": [result("val", "accuracy")(r) for r in done],
            "test": [result("test", "accuracy")(r) for r in done],
            "budget": [(r.results or {}).get("budget") for r in done],
        }  # fmt: skip
    version = one_version([r for row in choices(runs).values() for r in row["runs"]])
    atomic_write_text(
        path.with_suffix(".json"), json.dumps({"code_version": version, **compact}, indent=1)
    )


if __name__ == "__main__":
    main()
