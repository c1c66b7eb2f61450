"""Real-data studies: ``python -m simulations.realdata_study STUDY --data DIR``, STUDY one
of ``hapt``, ``extrasensory``, ``extrasensory_withheld``.

- ``hapt``: UCI HAPT (``fed-iotlm import hapt SRC DIR --drop-unlabelled``) under
  FedMultimodal's UCI-HAR protocol as far as ``configs/experiment/hapt_fedmultimodal.yaml``
  follows it; every method at each Dirichlet alpha, test macro-F1 in the same table as
  FedMultimodal's published FedAvg/FedOpt figures.  ``--missing-rates 0.1,0.3,0.5`` adds
  FedMultimodal's missing-modality points (``partition.missing_rate=p`` at each alpha:
  each node loses each modality with probability p, whole node).
- ``extrasensory``: the natural federation of ``configs/experiment/extrasensory_natural.yaml``
  (one node per user); balanced accuracy of the main-activity task, local against
  federated against the centralized bound.
- ``extrasensory_withheld``: the same with audio withheld from even-numbered users and the
  watch from odd-numbered ones (``configs/experiment/extrasensory_withheld.yaml``), so the
  two never meet on one node: the federation MMBind is for.

Methods follow ``simulations/budget_study.py``: ``harmony`` (Harmony-style, late fusion),
``ssl_spine`` (MMBind's shared-modality SSL rounds + the spine, no binding) and ``mmbind``
use late fusion there and here.  MMBind needs its shared modality on every node: the
study's ``shared`` (``acc`` on HAPT, the phone accelerometer ``raw_acc`` on ExtraSensory)
goes in as ``partition.shared``.  With no modality dropped at random that changes no
node's sensors; at a ``--missing-rates`` point it keeps the shared modality on every node
of the binding rows (only the other one is dropped), so those rows' partition differs
from the other rows' and the caption says so, unless ``--shared-for-all`` gives every
method the same ``partition.shared`` (then all rows share one partition).

One resumable subprocess per (point, method, seed) (:mod:`simulations.study_runner`);
every method gets the experiment's rounds and local training settings (equal budgets;
``ssl_spine`` and ``mmbind`` take their SSL rounds before them, as in the MMBind study,
and each row prints the steps and examples per node per round its runs report).
Nothing is chosen on test: each run reports its last round's model, or with the
override ``select_round=best_val`` the round with the best validation macro-F1 (every
row under one rule; the caption says which), so the test split feeds back into no
decision.  The table's caption names the code version (git commit,
``+dirty`` for uncommitted changes) and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.report.page import Table
from fed_iotlm.report.render import markdown_table
from fed_iotlm.report.runs import Run
from fed_iotlm.report.study_table import (
    Column,
    budget_columns,
    label_of,
    result,
    seeds_column,
    study_table,
)
from simulations import study_runner
from simulations.study_progress import study_progress
from simulations.study_runner import model_rule, one_model_rule, point_key

# FedMultimodal (Feng et al., KDD 2023), UCI-HAR acc+gyro, macro-F1 (%), its README
PUBLISHED: dict[float, dict[str, float]] = {
    5.0: {"FedAvg": 77.74, "FedOpt": 85.17},
    0.1: {"FedAvg": 76.66, "FedOpt": 79.80},
}
METHODS: dict[str, list[str]] = {
    "federated": ["method=federated"],
    "fedavg": ["method=fedavg"],
    "fedadam": ["method=federated", "strategy=fedadam"],
    "local": ["method=local"],
    "centralized": ["method=centralized"],
    # as simulations/budget_study.py (late fusion where it uses it); the binding rows also
    # get the study's shared modality (method_overrides)
    "harmony": ["method=harmony"],
    "ssl_spine": ["method=mmbind", "binding.bind=false", "model.fusion=late"],
    "mmbind": ["method=mmbind", "model.fusion=late"],
}
BINDING_METHODS = ("ssl_spine", "mmbind")  # need partition.shared on every node
STUDIES: dict[str, dict] = {
    "hapt": {
        "experiment": "hapt_fedmultimodal",
        "task": "activity",
        "metrics": ("f1_macro", "accuracy", "balanced_accuracy"),
        "shared": "acc",
    },
    "extrasensory": {
        "experiment": "extrasensory_natural",
        "task": "main_activity",
        "metrics": ("balanced_accuracy", "f1_macro", "accuracy"),
        "shared": "raw_acc",
    },
    "extrasensory_withheld": {
        "experiment": "extrasensory_withheld",
        "task": "main_activity",
        "metrics": ("balanced_accuracy", "f1_macro", "accuracy"),
        "shared": "raw_acc",
    },
}


def method_overrides(method: str, study: str, shared_for_all: bool = False) -> list[str]:
    """A row's overrides: its method's, plus ``partition.shared=<the study's shared
    modality>`` for the binding rows (or for every row with ``shared_for_all``)."""
    shared = method in BINDING_METHODS or shared_for_all
    return [*METHODS[method], *([f"partition.shared={STUDIES[study]['shared']}"] if shared else [])]


def study_points(args: argparse.Namespace) -> list[list[str]]:
    """The points of a study: one for ExtraSensory; for HAPT each alpha, then each alpha
    at each ``--missing-rates`` p."""
    if args.study != "hapt":
        return [[]]
    rates = getattr(args, "missing_rates", [])
    return [
        [f"partition.alpha={a}", *([f"partition.missing_rate={p}"] if p else [])]
        for a in args.alphas
        for p in [0.0, *rates]
    ]


def task_scores(res: dict, task: str, metrics: tuple[str, ...]) -> dict[str, float]:
    """The task's test figures of one results.json, and its validation figures beside
    them (``val_<metric>``) when the run evaluated a validation split."""
    scores = {m: float(res["test"]["by_task"][task][m]) for m in metrics}
    val_task = (res.get("val") or {}).get("by_task", {}).get(task, {})
    scores.update({f"val_{m}": float(val_task[m]) for m in metrics if m in val_task})
    return scores


def run_points(args: argparse.Namespace) -> list[dict]:
    """Every (point, method, seed) run, in order; finished runs are read, not repeated."""
    study = STUDIES[args.study]
    rows = []
    points = list(study_points(args))
    with study_progress(len(points) * len(args.methods) * len(args.seeds)):
        for point in points:
            for method in args.methods:
                for seed in args.seeds:
                    overrides = [
                        f"data.path={Path(args.data).resolve()}",
                        *point,
                        *method_overrides(method, args.study, args.shared_for_all),
                        f"seed={seed}",
                        *([f"rounds={args.rounds}"] if args.rounds else []),
                        *args.extra,
                    ]
                    out = Path(args.out) / point_key(overrides, experiment=study["experiment"])
                    res = study_runner.run_one(
                        out,
                        overrides,
                        experiment=study["experiment"],
                        mlflow_experiment=mlflow_experiment(args.study),
                        tracking_uri=args.tracking_uri,
                    )
                    scores = task_scores(res, study["task"], study["metrics"])
                    rows.append({"point": " ".join(point), "method": method, "seed": seed, **scores,
                                 "rounds": res["rounds"], "nodes": res["num_nodes"],
                                 "wall_s": res["wall_s"], "budget": res.get("budget", {}),
                                 "code_version": res.get("code_version"), "out": str(out),
                                 **model_rule(res)})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def mlflow_experiment(study: str) -> str:
    """The MLflow experiment a study's runs are logged to and its table is read from."""
    return f"realdata-{study}"


def point_of(run: Run, study: str) -> str:
    """A run's point as the study names it: ``partition.alpha=A`` (and its
    ``partition.missing_rate=p`` where p > 0) for HAPT; ``-`` for ExtraSensory."""
    if study != "hapt":
        return "-"
    alpha = f"partition.alpha={float(run.params.get('partition.alpha', 'nan'))}"
    rate = float(run.params.get("partition.missing_rate", 0) or 0)
    return f"{alpha} partition.missing_rate={rate}" if rate else alpha


def tables(runs: list[Run], experiment: str, caption: str = "") -> list[Table]:
    """One table of ``experiment`` (``realdata-<study>``): a row per (point, method),
    val and test figures of the study's task over seeds, the budget, and for HAPT
    FedMultimodal's published lines after the rows."""
    study = experiment.removeprefix("realdata-")
    if study not in STUDIES:
        raise ValueError(f"{experiment!r} is not a real-data study's experiment "
                         f"(realdata-{'|'.join(STUDIES)})")  # fmt: skip
    task, metrics = STUDIES[study]["task"], STUDIES[study]["metrics"]

    def row(run: Run) -> tuple[str, str] | None:
        method = label_of(run.params, METHODS)
        return None if method is None else (point_of(run, study), method)

    def whole(key: str) -> Callable[[list[Run]], str]:  # rounds, nodes: one per row
        return lambda rs: ", ".join(dict.fromkeys(str((r.results or {}).get(key, "–")) for r in rs))

    if not caption:
        rule = one_model_rule([model_rule(r.results or {}) for r in runs
                               if r.status == "FINISHED" and row(r) is not None])  # fmt: skip
        caption = f"Task `{task}`, {rule}; val and test figures of that task."
    table = study_table(
        runs, row, ["point", "method"],
        [seeds_column(), Column(f"val {metrics[0]}", value=result("val", "by_task", task,
                                                                  metrics[0])),
         *[Column(m, value=result("test", "by_task", task, m)) for m in metrics],
         Column("rounds", text=whole("rounds")), Column("nodes", text=whole("num_nodes")),
         *budget_columns()],
        caption=caption,
    )  # fmt: skip
    if study == "hapt":
        # the rows' alphas, from their point cells ("partition.alpha=5.0 ...")
        for alpha in dict.fromkeys(float(r[0].split()[0].split("=")[1]) for r in table.rows):
            for name, f1 in PUBLISHED.get(alpha, {}).items():
                table.rows.append([f"partition.alpha={alpha}", f"FedMultimodal {name} (published)",
                                   "5", "–", f"{f1 / 100:.4f}", *["–"] * (len(metrics) - 1),
                                   "200", "105", "–", "–"])  # fmt: skip
    return [table]


def table(runs: list[Run], args: argparse.Namespace) -> str:
    """Markdown: the study's table from its MLflow runs, captioned with the round rule,
    the command and what ``partition.shared`` the rows carry."""
    study = STUDIES[args.study]
    done = [r for r in runs if r.status == "FINISHED"]
    rows = [{"method": label_of(r.params, METHODS), "point": point_of(r, args.study),
             **model_rule(r.results or {})} for r in done]  # fmt: skip
    command = "python -m simulations.realdata_study " + " ".join(
        getattr(args, "argv", sys.argv[1:])
    )
    caption = (
        f"Task `{study['task']}`, {one_model_rule(rows)}; val and test figures of that task; "
        f"`{command}`." + shared_note(rows, args)
        + (" FedMultimodal's published lines: macro-F1 from its README." if args.study == "hapt"
           else "")
    )  # fmt: skip
    (out,) = tables(runs, mlflow_experiment(args.study), caption)
    return markdown_table(out)


def shared_note(rows: list[dict], args: argparse.Namespace) -> str:
    """What the caption must say about ``partition.shared``: which rows carry it and,
    where modalities are dropped at random, that their partition is not the others'."""
    shared = STUDIES[args.study]["shared"]
    if getattr(args, "shared_for_all", False):
        return f" Every row has `partition.shared={shared}` (one partition for all rows)."
    binding = [m for m in dict.fromkeys(r["method"] for r in rows) if m in BINDING_METHODS]
    if not binding:
        return ""
    rows_are = f"rows {', '.join(binding)} have" if len(binding) > 1 else f"row {binding[0]} has"
    note = f" The {rows_are} `partition.shared={shared}` (MMBind's shared modality)"
    dropped = any("partition.missing_rate=" in r["point"] for r in rows if r["method"] in binding)
    if not dropped:
        return note + "; no modality is dropped at random, so it changes no node's sensors."
    return (
        note + f": at a `partition.missing_rate` point their nodes all keep `{shared}` and lose "
        "only the other modalities, so their partition differs from the other rows' "
        "(`--shared-for-all` gives every row the same one)."
    )


def clashing_extra(args: argparse.Namespace) -> str | None:
    """An extra override the study also sets per row (two values for one key; which one
    a run got would depend on Hydra's order), named in one line; None if there is none."""
    keys = {e.split("=", 1)[0].lstrip("+~"): e for e in args.extra}
    if args.missing_rates and "partition.missing_rate" in keys:
        return f"{keys['partition.missing_rate']} clashes with --missing-rates; give one of them"
    binding = [m for m in args.methods if m in BINDING_METHODS]
    if "partition.shared" in keys and (binding or args.shared_for_all):
        setter = "--shared-for-all" if args.shared_for_all else f"the {binding[0]} row"
        return (
            f"{keys['partition.shared']} clashes with {setter}, which sets "
            f"partition.shared={STUDIES[args.study]['shared']}"
        )
    return None


def rates_list(text: str) -> list[float]:
    """``0.1,0.3,0.5`` -> the rates, each strictly between 0 and 1, none twice."""
    try:
        rates = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected rates like 0.1,0.3,0.5") from None
    bad = [r for r in rates if not 0.0 < r < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r}: rate {bad[0]:g} is not between 0 and 1")
    if len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"{text!r}: a rate listed twice")
    return rates


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the study; ``argv`` defaults to the command line (``fed-iotlm study`` passes
    its own, with ``prog`` naming the verb in usage and errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--data", required=True, help="the imported dataset directory")
    p.add_argument("--out", default="outputs/realdata", help="run folders (resumable)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--alphas", type=lambda s: [float(v) for v in s.split(",")], default=[5.0, 0.1])
    p.add_argument(
        "--methods", type=lambda s: s.split(","), default=["federated", "fedavg", "centralized"]
    )
    p.add_argument(
        "--missing-rates",
        type=rates_list,
        default=[],
        help="hapt only: also run each alpha at partition.missing_rate=p for each p (0<p<1)",
    )
    p.add_argument(
        "--shared-for-all",
        action="store_true",
        help="give every method the study's partition.shared, not only ssl_spine and mmbind",
    )
    p.add_argument("--rounds", type=int, default=None, help="override the experiment's rounds")
    p.add_argument("--doc", type=Path, default=None, help="also write the table here (Markdown)")
    p.add_argument(
        "--tracking-uri",
        default=study_runner.TRACKING_URI,
        help="MLflow store the runs log to and the table is read from (default: the checkout's "
        "mlflow.db)",
    )
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = p.parse_intermixed_args(argv)
    args.argv = argv  # the command line the table's caption quotes
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    if args.missing_rates and args.study != "hapt":
        p.error(f"--missing-rates is for the hapt study, not {args.study}")
    problem = clashing_extra(args)
    if problem:
        p.error(problem)
    rows = run_points(args)
    runs = study_runner.logged_runs(
        mlflow_experiment(args.study), [Path(r["out"]) for r in rows], args.tracking_uri
    )
    md = table(runs, args)
    if args.doc is not None:
        atomic_write_text(args.doc, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
