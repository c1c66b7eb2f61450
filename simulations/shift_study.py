"""Domain-shift study: ``python -m simulations.shift_study [--severities 0,0.25,0.5,1.0]``.

Accuracy against placement-shift severity for one global model (``federated``),
personalised site adapters (``personal``: the same federation, each node keeping its
own adapters, :mod:`fed_iotlm.personal`) and nodes alone (``local``).  The federation
is ``configs/experiment/shift_study.yaml``: 8 nodes with an IMU each, nodes 0-2 wear
it rotated by up to ``severity`` x 180 degrees (one random rotation per node and
seed), the synthetic generator's own site differences off.  Every point runs each
method with several seeds, one resumable subprocess per run
(:mod:`simulations.study_runner`), logged to MLflow experiment ``shift-study``, and
``docs/shift.md`` is rewritten after each point with the table and the plot.

The figure per run is each node's accuracy on its OWN test data (``test.
accuracy_by_node``: the global model for ``federated``, the node's model with its
adapters for ``personal``, its own model for ``local``), averaged over the shifted
nodes and, separately, the others.  The embedding-shift columns come from
``results.json["diagnostics"]`` (``diagnostics.enabled``) of the federated runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.report.page import Table
from fed_iotlm.report.render import markdown_table
from fed_iotlm.report.runs import Run
from fed_iotlm.report.study_table import Column, label_of, seeds_column, study_table
from simulations import study_runner
from simulations.study_progress import study_progress
from simulations.study_runner import REPO, logged_runs, point_key

EXPERIMENT = "shift_study"
MLFLOW_EXPERIMENT = "shift-study"
SEVERITIES = (0.0, 0.25, 0.5, 1.0)
SHIFTED = (0, 1, 2)  # node ids the experiment rotates (shift.0.sites)
# method -> overrides; "personal" is the federated method with site adapters on
METHODS: dict[str, list[str]] = {
    "federated": ["method=federated"],
    # the same global model with per-site test-time standardisation (transductive; named)
    "federated_tta": ["method=federated", "normalization=per_site"],
    "personal": ["method=federated", "personal.enabled=true"],
    "local": ["method=local", "diagnostics.enabled=false"],
}


def point_overrides(severity: float, rounds: int | None) -> list[str]:
    """The overrides of one severity point (and a round budget, for quick checks)."""
    out = [f"shift.0.severity={severity}"]
    return out if rounds is None else [*out, f"rounds={rounds}"]


def summarise(res: dict) -> dict:
    """One run's figures: mean own-data accuracy of shifted / other nodes, the global
    test accuracy, and (federated runs) the IMU embedding shift of shifted nodes."""
    by_node = {int(k): v for k, v in res["test"]["accuracy_by_node"].items()}
    out = {
        "shifted": float(np.mean([by_node[k] for k in SHIFTED])),
        "others": float(np.mean([v for k, v in by_node.items() if k not in SHIFTED])),
        "global_test": float(res["test"]["accuracy"]),
        "code_version": res.get("code_version"),
    }
    diag = res.get("diagnostics")
    if diag:
        for stage in ("before", "after"):
            imu = diag["embedding_shift"][stage].get("imu", {}).get("to_reference", {})
            vals = [imu[str(k)] for k in SHIFTED if str(k) in imu]
            if vals:
                out[f"cka_{stage}"] = float(np.mean([v["cka"] for v in vals]))
                out[f"mmd_{stage}"] = float(np.mean([v["mmd"] for v in vals]))
    return out


def run_one(out: Path, overrides: list[str]) -> dict:
    """One resumable run of the study federation (logged to MLflow ``shift-study``)."""
    return study_runner.run_one(
        out, overrides, experiment=EXPERIMENT, mlflow_experiment=MLFLOW_EXPERIMENT
    )


# ------------------------------------------------------------------------------ report

TOOLKIT = """\
## The toolkit

- **Shift** (`configs/shift/`, `fed_iotlm/data/shift.py`): `shift=placement|hardware|mixed`
  (default `none`), entries overridable (`shift.0.severity=0.5 shift.0.sites=[0,3]`).
  Applied in `fed_iotlm/data/federation.py` to the raw signals before featurisation and
  each node's standardisation. `shift_unit=node` (default): a site is a node (partition
  id), train and test of a node get the same transform; `shift_unit=site`: the
  dataset's own `split.site`. No shift leaves the data bit-identical.
- **Diagnostics** (`diagnostics.enabled=true`, `fed_iotlm/diagnostics/`): results.json
  gets `diagnostics` — `accuracy_by_site` (global model, all modalities and each alone),
  `accuracy_by_node` (global model on each node's own view), and `embedding_shift`
  `before` (initial model) / `after` (final global model): per modality, linear CKA and
  RBF-MMD² (median-heuristic bandwidth) of each site's encoder tokens against the
  unshifted probe (`to_reference`) and site against site (`pairwise`), on one probe of
  raw test samples re-recorded as every site.
- **Personalised site adapters** (`personal.enabled=true`, `fed_iotlm/personal.py`):
  `personal.kind=adapter` (low-rank residual on each encoder's input channels + token
  bottleneck) or `lora` (LoRA on the encoders' Linear layers), `personal.rank`,
  `personal.epochs` / `personal.lr_scale` (adapter-only phase before each round's
  training, FedRep-style), `personal.keep_local` (e.g. `[head]`, FedPer). Adapters stay
  in the node's `context.state`, are never uploaded, and the node's own evaluation
  (`test.accuracy_by_node`) uses them.
- **Sweeps from one command** — Hydra multirun, any shift knob, every run logged to one
  MLflow experiment: `python -m simulations.run -m experiment=shift_study
  'shift.0.severity=0.0,0.5,1.0' seed=0,1 mlflow.experiment=my-sweep` (or this study's
  own runner, `python -m simulations.shift_study`, resumable, which also writes this page).
- **Report** (`fed-iotlm report shift-study`, `fed_iotlm/report/`): one Markdown/HTML page
  from the experiment's MLflow runs — shift curves (accuracy against `shift.0.severity` or
  any numeric param swept alone, one line per method, mean ± std over seeds), per-site
  accuracy from `diagnostics`, per node, per modality, per round, communication.
"""

SETTING = """\
Placement shift: nodes 0-2 of 8 wear their IMU rotated by one random 3-D rotation each
(per node and seed) of up to severity x 180 degrees (`shift.0.severity`; the transform is
`rotation` in `fed_iotlm/data/shift_sensor.py`, applied to the raw signal of the node's
train and test data before featurisation and standardisation, `shift_unit: node`).
Federation: `configs/experiment/shift_study.yaml` — synthetic data with `site_shift=0`
(no other site differences) and `imu_cues=1.0`; every node holds an IMU, some also
audio, depth or thermal (`[imu]`, `[imu, audio]`, `[imu, depth]` are the shifted ones);
IID partition, 500 training samples per node, 12 rounds x 2 local epochs.

Methods: `federated` (one global model, modality-aware FedAvg); `personal` (the same
federation, each node also trains rank-4 site adapters — a low-rank residual map on each
encoder's input channels and a bottleneck on its token — for 1 epoch at 10x the learning
rate before each round's local training, and keeps them: they are never uploaded;
`personal.enabled=true`); `federated_tta` (the same global model, but every node
standardises with its own statistics instead of the federation's pooled ones:
`normalization=per_site`, a named test-time adaptation that cancels a site's gain/offset
by looking at its data); `local` (each node alone). Accuracy: each node on its own test
data (mean over the two tasks), averaged over the shifted nodes (others in brackets);
mean ± std over seeds. `personal` spends one extra (adapter-only) epoch per round.
"""


def point_of(run: Run) -> tuple[str, str] | None:
    """A run's row: its severity (``shift.0.severity``) and its method's label."""
    method = label_of(run.params, METHODS)
    severity = run.params.get("shift.0.severity")
    return None if method is None or severity is None else (f"{float(severity):g}", method)


def figure(key: str) -> Callable[[Run], float | None]:
    """One of :func:`summarise`'s figures of a run (None where it has none)."""
    return lambda run: summarise(run.results).get(key) if run.results else None


def _order(group: tuple[str, ...]) -> tuple[float, int]:
    return float(group[0]), list(METHODS).index(group[1])


def _embedding_row(run: Run) -> tuple[str, str] | None:
    point = point_of(run)
    keep = point is not None and point[1] in ("federated", "personal")
    return point if keep and figure("cka_after")(run) is not None else None


def tables(runs: list[Run], experiment: str = MLFLOW_EXPERIMENT) -> list[Table]:
    """Own-test accuracy per severity and method, then (where the federated runs have
    ``diagnostics``) the embedding shift of the shifted nodes' IMU."""
    accuracy = study_table(
        runs, point_of, ["severity", "method"],
        [seeds_column(), Column("shifted nodes", value=figure("shifted")),
         Column("other nodes", value=figure("others")),
         Column("global model, global test", value=figure("global_test"))],
        caption="Accuracy of each node on its own test data (mean over the two tasks), "
        "averaged over the shifted nodes and over the others.",
        order=_order,
    )  # fmt: skip
    if not any(_embedding_row(r) for r in runs if r.status == "FINISHED"):
        return [accuracy]
    embedding = study_table(
        runs, _embedding_row, ["severity", "method"],
        [Column(f"{name} {stage}", value=figure(f"{key}_{stage}"))
         for name, key in (("CKA", "cka"), ("MMD²", "mmd")) for stage in ("before", "after")],
        caption="Linear CKA (1 = same representation) / RBF-MMD² (0 = same distribution) of "
        "the IMU encoder's tokens for a probe of test samples recorded as each shifted node "
        "vs unshifted; initial model (before) and final global model (after); `diagnostics` "
        "in results.json.",
        order=_order,
    )  # fmt: skip
    return [accuracy, embedding]


def write_report(runs: list[Run], doc: Path, run_dir: Path, seeds: int) -> None:
    """``docs/shift.md``: the study's runs (read back from MLflow) as the accuracy table,
    the embedding-shift table and the plot."""
    lines = ["# Domain shift: toolkit and study", "", TOOLKIT, "## The study", "", SETTING]
    done = [r for r in runs if r.status == "FINISHED" and point_of(r) is not None]
    if not done:
        lines += ["No results yet: `python -m simulations.shift_study` fills this page in.", ""]
        atomic_write_text(doc, "\n".join(lines))
        return
    accuracy, *embedding = tables(runs)
    lines += ["## Accuracy on the shifted nodes' own test data", "", markdown_table(accuracy)]
    table: dict[str, dict[str, list[dict]]] = {}  # severity -> method -> figures, for prose
    for run in done:
        severity, method = point_of(run)  # type: ignore[misc]
        table.setdefault(severity, {}).setdefault(method, []).append(summarise(run.results))
    sevs = sorted(table, key=float)
    methods = [m for m in METHODS if any(m in table[s] for s in sevs)]
    lines += [_gap_line(table, sevs), ""]
    for t in embedding:
        lines += ["## Embedding shift of the shifted nodes' IMU (global model)", "",
                  markdown_table(t)]  # fmt: skip
    png = doc.parent / "shift_study.png"
    _plot(table, sevs, methods, png)
    lines += [
        f"![accuracy against severity]({png.name})",
        "",
        f"{seeds} seed(s) per point. Runs: `{run_dir}` (one results.json each, with "
        f"`diagnostics`), MLflow experiment `{MLFLOW_EXPERIMENT}`, whose runs the tables are "
        f"read from (`fed-iotlm report {MLFLOW_EXPERIMENT} --study shift` prints them). "
        "Reproduce: `python -m simulations.shift_study`.",
        "",
    ]
    atomic_write_text(doc, "\n".join(lines))


def _gap_line(table: dict, sevs: list[str]) -> str:
    top = sevs[-1]
    runs = table[top]
    if "personal" not in runs or "federated" not in runs:
        return ""
    p = np.mean([r["shifted"] for r in runs["personal"]])
    f = np.mean([r["shifted"] for r in runs["federated"]])
    return (
        f"At severity {top}, personalised adapters vs the global model on the shifted "
        f"nodes: {p:.3f} vs {f:.3f} ({100 * (p - f):+.1f} points)."
    )


def _plot(table: dict, sevs: list[str], methods: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [float(s) for s in sevs]
    for i, m in enumerate(methods):
        color = f"C{i}"
        for key, style, label in (("shifted", "-", "shifted nodes"), ("others", ":", "others")):
            pts = [
                (x, [r[key] for r in table[s].get(m, [])]) for x, s in zip(xs, sevs, strict=True)
            ]
            pts = [(x, v) for x, v in pts if v]
            if not pts:
                continue
            ax.errorbar(
                [x for x, _ in pts],
                [np.mean(v) for _, v in pts],
                yerr=[np.std(v) for _, v in pts],
                fmt=style,
                marker="o" if key == "shifted" else "x",
                color=color,
                capsize=3,
                label=f"{m} ({label})",
            )
    ax.set_xlabel("placement severity (max rotation / 180°)")
    ax.set_ylabel("own-test accuracy (mean over tasks)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Run the study; ``argv`` defaults to the command line (``fed-iotlm study`` passes
    its own, with ``prog`` naming the verb in usage and errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--severities", default=",".join(str(s) for s in SEVERITIES))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=None, help="override (quick checks)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "shift_study")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "shift.md")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    table: dict = {}
    outs: list[Path] = []
    run_dir = args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    severities = [float(s) for s in args.severities.split(",")]
    with study_progress(len(severities) * len(methods) * args.seeds):
        for sev in severities:
            overrides = point_overrides(sev, args.rounds)
            for method in methods:
                for seed in range(args.seeds):
                    out = (
                        args.out
                        / point_key(overrides, experiment=EXPERIMENT)
                        / f"{method}-seed{seed}"
                    )
                    t0 = time.time()
                    res = run_one(out, [*METHODS[method], f"seed={seed}", *overrides])
                    outs.append(out)
                    row = summarise(res)
                    table.setdefault(str(sev), {}).setdefault(method, []).append(row)
                    print(
                        f"severity {sev} | {method} seed {seed}: shifted {row['shifted']:.3f}, "
                        f"others {row['others']:.3f} ({time.time() - t0:.0f}s)",
                        flush=True,
                    )
            # rewritten after each point, so an interrupted study keeps what it has
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "summary.json").write_text(json.dumps(table, indent=2))
            write_report(logged_runs(MLFLOW_EXPERIMENT, outs), args.doc, run_dir, args.seeds)
    print(args.doc)


if __name__ == "__main__":
    main()
