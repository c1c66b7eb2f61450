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
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.protocol import first_binding_pair_accuracy
from simulations import study_runner
from simulations.study_progress import study_progress
from simulations.study_runner import REPO, logged_runs, point_key

# row label -> overrides (method and fusion choice per row, stated in docs/results.md).
# The mmbind_* rows are ablations; ssl_spine is MMBind's SSL rounds + the spine without
# binding, the baseline that isolates what binding adds.
EXPERIMENT = "mmbind_study"  # configs/experiment/mmbind_study.yaml (the budget study's too)
MLFLOW_EXPERIMENT = "mmbind-study"
SWEEPS = ("headline", "incompleteness", "labels", "shift")
METHODS: dict[str, list[str]] = {
    "local": ["method=local"],
    "fedavg": ["method=fedavg"],
    "harmony": ["method=harmony"],
    "federated": ["method=federated"],
    "ssl_spine": ["method=mmbind", "binding.bind=false", "model.fusion=late"],
    "mmbind": ["method=mmbind", "model.fusion=late"],
    "mmbind_no_pseudo": ["method=mmbind", "model.fusion=late", "binding.pseudo_weight=0"],
    "mmbind_no_contrastive": [
        "method=mmbind", "model.fusion=late", "binding.contrastive_weight=0",
        "binding.own_pair_weight=0",
    ],
    "mmbind_rebind_every_round": ["method=mmbind", "model.fusion=late", "binding.rebind_every=1"],
    "mmbind_label_aware": ["method=mmbind", "model.fusion=late", "binding.use_labels=true"],
    "centralized_mmbind": ["method=centralized_mmbind", "model.fusion=late"],
    "centralized": ["method=centralized", "model.fusion=late"],
}  # fmt: skip
DEFAULT_METHODS = (
    "local", "fedavg", "harmony", "federated", "ssl_spine", "mmbind", "centralized_mmbind",
    "centralized",
)  # fmt: skip
ABLATIONS = (
    "mmbind_no_pseudo", "mmbind_no_contrastive", "mmbind_rebind_every_round", "mmbind_label_aware",
)  # fmt: skip
FEDERATED = ("fedavg", "harmony", "federated", "ssl_spine")
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
        out, overrides, experiment=EXPERIMENT, mlflow_experiment=MLFLOW_EXPERIMENT
    )


def record(res: dict) -> dict:
    """What a study table needs of one run's results.json: test and val, the budget,
    the code version and the pair accuracy at the first binding (if it bound)."""
    return {
        **res["test"],
        "val": res.get("val", {}).get("accuracy"),
        "budget": res.get("budget", {}),
        "code_version": res.get("code_version"),
        "first_binding_pair_accuracy": first_binding_pair_accuracy(res),
    }


def run_point(args, extra: list[str], sweep: str, label: str, overrides: list[str],
              methods: list[str], seeds: int | range, table: dict,
              on_run: Callable[[dict], None] | None = None) -> None:  # fmt: skip
    """Every method x seed of one point (resumable), appended to ``table``; seed by
    seed, so a study cut short still has every row at the seeds it reached.
    ``on_run(table)`` after each run lets the caller save what is done so far."""
    for seed in range(seeds) if isinstance(seeds, int) else seeds:
        for method in methods:
            point = [*overrides, *extra]
            out = args.out / point_key(point, experiment=EXPERIMENT) / f"{method}-seed{seed}"
            t0 = time.time()
            res = {**record(run_one(out, [f"seed={seed}", *METHODS[method], *point])),
                   "out": str(out)}  # fmt: skip
            table.setdefault(sweep, {}).setdefault(label, {}).setdefault(method, []).append(res)
            print(
                f"{sweep} | {label} | {method} seed {seed}: test {res['accuracy']:.3f} "
                f"val {res['val'] if res['val'] is not None else float('nan'):.3f}"
                + "".join(
                    f"  pair accuracy@1st binding ({t}) {a:.3f}"
                    for t, a in res["first_binding_pair_accuracy"].items()
                )
                + f" ({time.time() - t0:.0f}s)",
                flush=True,
            )
            if on_run is not None:
                on_run(table)


def write_page(table: dict, doc: Path, run_dir: Path, command: str) -> None:
    """docs/results.md from the MLflow runs of the folders ``table``'s records name."""
    from simulations.study_report import write_report

    outs = [r.get("out") for points in table.values() for ms in points.values()
            for rs in ms.values() for r in rs]  # fmt: skip
    if None in outs:
        raise ValueError("summary.json predates run folders in its records; re-run the study")
    runs = logged_runs(MLFLOW_EXPERIMENT, [Path(o) for o in dict.fromkeys(outs)])
    write_report(runs, list(table), doc, run_dir, command)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Run the study; ``argv`` defaults to the command line (``fed-iotlm study`` passes
    its own, with ``prog`` naming the verb in usage and errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--sweeps", default="headline")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="rows: " + ", ".join(METHODS)
    )
    parser.add_argument("--ablations", default="", help="ablation rows, run with --ablation-seeds")
    parser.add_argument("--ablation-seeds", type=int, default=1)
    parser.add_argument("--extra", default="", help="Hydra overrides added to every run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "mmbind_study")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite --doc from --out's summary.json"
    )
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    ablations = [a for a in args.ablations.split(",") if a]
    unknown = [m for m in [*methods, *ablations] if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
    extra = shlex.split(args.extra)
    run_dir = args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    if args.report_only:
        summary = json.loads((args.out / "summary.json").read_text())
        write_page(summary["table"], args.doc, run_dir, summary["command"])
        print(args.doc)
        return
    command = "python -m simulations.mmbind_study " + " ".join(shlex.quote(a) for a in argv)
    table: dict = {}

    def save(table: dict) -> None:
        """Summary and report after every run, so an interrupted study keeps its results."""
        atomic_write_text(
            args.out / "summary.json", json.dumps({"command": command, "table": table}, indent=1)
        )
        write_page(table, args.doc, run_dir, command)

    points = sum(len(sweep_points(sweep)) for sweep in args.sweeps.split(","))
    per_point = len(methods) * args.seeds + (
        len(ablations) * args.ablation_seeds if ablations else 0
    )
    with study_progress(points * per_point):
        for sweep in args.sweeps.split(","):
            for label, overrides in sweep_points(sweep):
                # seed 0 of every row (ablations too) first, then the further seeds
                for seed in range(max(args.seeds, args.ablation_seeds if ablations else 0)):
                    rows = [*(methods if seed < args.seeds else []),
                            *(ablations if seed < args.ablation_seeds else [])]  # fmt: skip
                    run_point(args, extra, sweep, label, overrides, rows, range(seed, seed + 1),
                              table, on_run=save)  # fmt: skip
    print(args.doc)


if __name__ == "__main__":
    main()
