"""Real-data studies: ``python -m simulations.realdata_study hapt|extrasensory --data DIR``.

- ``hapt``: UCI HAPT (``fed-iotlm import hapt SRC DIR --drop-unlabelled``) under
  FedMultimodal's UCI-HAR protocol as far as ``configs/experiment/hapt_fedmultimodal.yaml``
  follows it; every method at each Dirichlet alpha, test macro-F1 in the same table as
  FedMultimodal's published FedAvg/FedOpt figures.
- ``extrasensory``: the natural federation of ``configs/experiment/extrasensory_natural.yaml``
  (one node per user); balanced accuracy of the main-activity task, local against
  federated against the centralized bound.

One resumable subprocess per (point, method, seed) (:mod:`simulations.study_runner`);
every method gets the experiment's rounds and local training settings (equal budgets).
Nothing is chosen here: each run reports its last round's model, so the test split
feeds back into no decision.  The table's caption names the code version (git commit,
``+dirty`` for uncommitted changes) and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fed_iotlm.atomic import atomic_write_text
from simulations import study_runner
from simulations.study_runner import fmt_mean_ci, fmt_mean_std, one_code_version, point_key

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
}
STUDIES: dict[str, dict] = {
    "hapt": {
        "experiment": "hapt_fedmultimodal",
        "task": "activity",
        "metrics": ("f1_macro", "accuracy", "balanced_accuracy"),
    },
    "extrasensory": {
        "experiment": "extrasensory_natural",
        "task": "main_activity",
        "metrics": ("balanced_accuracy", "f1_macro", "accuracy"),
    },
}


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
    points = (
        [[]] if args.study == "extrasensory" else [[f"partition.alpha={a}"] for a in args.alphas]
    )
    rows = []
    for point in points:
        for method in args.methods:
            for seed in args.seeds:
                overrides = [
                    f"data.path={Path(args.data).resolve()}",
                    *point,
                    *METHODS[method],
                    f"seed={seed}",
                    *([f"rounds={args.rounds}"] if args.rounds else []),
                    *args.extra,
                ]
                out = Path(args.out) / point_key(overrides)
                res = study_runner.run_one(
                    out,
                    overrides,
                    experiment=study["experiment"],
                    mlflow_experiment=f"realdata-{args.study}",
                )
                scores = task_scores(res, study["task"], study["metrics"])
                rows.append({"point": " ".join(point), "method": method, "seed": seed, **scores,
                             "rounds": res["rounds"], "nodes": res["num_nodes"],
                             "wall_s": res["wall_s"],
                             "code_version": res.get("code_version")})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown: one line per (point, method), mean ± std over seeds, published lines too."""
    study = STUDIES[args.study]
    metrics = study["metrics"]
    head = ["point", "method", "seeds", f"val {metrics[0]}", *metrics, "rounds", "nodes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["point"], r["method"]) for r in rows))
    for point, method in keys:
        rs = [r for r in rows if r["point"] == point and r["method"] == method]
        val = [r[f"val_{metrics[0]}"] for r in rs if f"val_{metrics[0]}" in r]
        cells = [fmt_mean_std(val) if len(val) == len(rs) else "–"]
        cells += [fmt_mean_ci([r[m] for r in rs]) for m in metrics]
        lines.append(
            f"| {point or '-'} | {method} | {len(rs)} | " + " | ".join(cells)
            + f" | {rs[0]['rounds']} | {rs[0]['nodes']} |"
        )  # fmt: skip
    if args.study == "hapt":
        for alpha in args.alphas:
            for name, f1 in PUBLISHED.get(alpha, {}).items():
                blank = " | ".join("–" for _ in metrics[1:])
                lines.append(
                    f"| partition.alpha={alpha} | FedMultimodal {name} (published) | 5 | – | "
                    f"{f1 / 100:.4f} | {blank} | 200 | 105 |"
                )
    command = "python -m simulations.realdata_study " + " ".join(
        getattr(args, "argv", sys.argv[1:])
    )
    caption = (
        f"Task `{study['task']}`, last round's model (nothing chosen on any split); val: "
        f"mean ± std over seeds; test: mean ± std [95 % interval of the mean]. "
        f"Code version `{one_code_version(rows)}`; `{command}`."
    )
    return caption + "\n\n" + "\n".join(lines) + "\n"


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
    p.add_argument("--rounds", type=int, default=None, help="override the experiment's rounds")
    p.add_argument("--doc", type=Path, default=None, help="also write the table here (Markdown)")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = p.parse_intermixed_args(argv)
    args.argv = argv  # the command line the table's caption quotes
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    rows = run_points(args)
    md = table(rows, args)
    if args.doc is not None:
        atomic_write_text(args.doc, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
