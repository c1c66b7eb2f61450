"""docs/results.md from the MMBind study's MLflow runs: tables (mean ± std [95 % interval]
over seeds, through :mod:`fed_iotlm.report.study_table`) and a plot.

A run's row is its method (:data:`simulations.mmbind_study.METHODS`, matched on its
params) and its column the sweep point whose overrides it was made with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.protocol import first_binding_pair_accuracy
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
from simulations.mmbind_study import FEDERATED, METHODS, MLFLOW_EXPERIMENT, SWEEPS, sweep_points

SETTING = """\
## Setting (the default study federation)

`configs/experiment/mmbind_study.yaml` on the synthetic generator with `imu_cues=0.5`:
IMU is on every node and is the binding modality. It is *descriptive but imperfect*: it
carries cadence and axis (2 of the 3 activity bits) plus weak, noisy cues of the third
bit and of location. Audio carries activity bits b1, b2 and location bit l0; depth carries
b0, b2 and l1. The 8 nodes hold `[imu, audio]` or `[imu, depth]` (at 50 % incompleteness
audio and depth never meet on any node), all three modalities are present at test, and 10 %
of each node's training samples are labelled (10 % of them are carved off as the node's
validation share). 12 rounds; 4000 training samples spread IID; inputs standardised with the
federation's pooled training statistics (the statistics round), never with test's. Budgets
are equal: every run is given the same `train.steps` per node per round (the `--extra` of
the command below); the centralized references take the whole federation's steps per round
on their one pooled model (steps x 8 nodes). The SSL variants (`ssl_spine`, `mmbind` and its
ablations) first run 10 shared-modality SSL rounds of 40 steps each at every node
(`binding.pretrain_rounds`/`pretrain_steps`, batch 128, `supcon_semi`), the same for all of
them; `centralized_mmbind` takes those 10 x 40 x 8 steps on the pooled IMU with one
optimiser. Those SSL settings were chosen by the first-binding pair accuracy on training
pairs (`python -m simulations.mmbind_pairs`, which reads the simulation's hidden training
labels; no validation or test label): 0.401 at 3 rounds, 0.471 at 6, 0.509 at 10. Accuracy = mean over the two tasks (activity: 8 classes, location: 4), all
modalities present at test; `val` is the same on the global validation set. The model
reported is the last round's (no choice is made on test or on validation).

Methods: `local` (each node alone, its own modalities; mean over nodes); `fedavg` (naive
FedAvg over zero-filled inputs); `harmony` (modality-wise FedAvg + late fusion, Harmony's
first stage); `federated` (modality-wise FedAvg + masked attention fusion, the spine);
`ssl_spine` (MMBind's SSL rounds on IMU, then the spine's training with late fusion and no
binding: what SSL alone gives); `mmbind` (ours: SSL rounds on IMU, cross-node binding every 4
rounds, weighted contrastive + pseudo-pair supervised loss + contrastive between a node's own
paired modalities, late fusion); ablations `mmbind_no_pseudo` (`binding.pseudo_weight=0`),
`mmbind_no_contrastive` (cross-node and own-pair contrastive weights 0),
`mmbind_rebind_every_round`, `mmbind_label_aware` (`binding.use_labels=true`);
`centralized_mmbind` (the fair pooled reference: SSL once on the pooled IMU with one
optimiser, the same matching, partners' raw samples through the live encoders);
`centralized` (all training data pooled with every modality present, late fusion: the
complete-data bound). Late fusion is used for `harmony`, `mmbind`, `centralized_mmbind` and
`centralized`. That fusion choice is inherited from an earlier version of this study,
where it was made on test (issue 11); it was not re-chosen on validation here, so read
`harmony` vs `federated` as the comparison of the two heads, not as a tuned choice.
"""


def method_of(run: Run) -> str | None:
    return label_of(run.params, METHODS)


def point_of(run: Run, sweep: str) -> str | None:
    """The label of the ``sweep`` point the run was made at (None: not one of them)."""
    return label_of(run.params, dict(sweep_points(sweep)))


def accuracy(*path: str) -> Callable[[Run], float | None]:
    """A test figure of the run (``accuracy``, or a task's: ``by_task activity accuracy``)."""
    return result("test", *path)


def _pairs(task: str) -> Callable[[Run], float | None]:
    return lambda run: first_binding_pair_accuracy(run.results or {}).get(task)


def _order(group: tuple[str, ...]) -> int:
    return list(METHODS).index(group[0].strip("`"))


def headline_table(runs: list[Run]) -> Table | None:
    """The headline in full: val, test with its interval, per task, the budget each run
    reports, the pair accuracy at the first binding; None without headline runs."""
    ((label, _),) = sweep_points("headline")

    def row(run: Run) -> tuple[str] | None:
        method = method_of(run)
        return (f"`{method}`",) if method and point_of(run, "headline") == label else None

    if not any(row(r) for r in runs if r.status == "FINISHED"):
        return None
    return study_table(
        runs, row, ["method"],
        [seeds_column(), Column("val", value=result("val", "accuracy")),
         Column("test [95 % interval]", value=accuracy("accuracy")),
         *[Column(t, value=accuracy("by_task", t, "accuracy")) for t in ("activity", "location")],
         *budget_columns(),
         Column("pair acc. @1st binding (activity)", value=_pairs("activity")),
         Column("(location)", value=_pairs("location"))],
        caption=f"Headline: {label}. Test and val: accuracy, mean over the two tasks, all "
        "modalities present.",
        order=_order,
    )  # fmt: skip


def sweep_table(runs: list[Run], sweep: str) -> Table | None:
    """A row per method, a column per point of ``sweep``, test accuracy; None without runs."""
    labels = [label for label, _ in sweep_points(sweep)]

    def row(run: Run) -> tuple[str] | None:
        method = method_of(run)
        return (f"`{method}`",) if method and point_of(run, sweep) else None

    def at(label: str) -> Callable[[Run], float | None]:
        return lambda run: accuracy("accuracy")(run) if point_of(run, sweep) == label else None

    if not any(row(r) for r in runs if r.status == "FINISHED"):
        return None
    return study_table(
        runs, row, ["method"], [Column(label, value=at(label)) for label in labels],
        caption=f"Sweep: {sweep}. Test accuracy, mean over the two tasks.", order=_order,
    )  # fmt: skip


def tables(runs: list[Run], experiment: str = MLFLOW_EXPERIMENT,
           sweeps: Sequence[str] = SWEEPS) -> list[Table]:  # fmt: skip
    """The headline table and one per sweep, for the sweeps that have runs (also what
    ``fed-iotlm report mmbind-study --study mmbind`` prints)."""
    built = [headline_table(runs) if s == "headline" else sweep_table(runs, s) for s in sweeps]
    return [t for t in built if t is not None]


def write_report(
    runs: list[Run], sweeps: Sequence[str], doc: Path, run_dir: Path, command: str = ""
) -> None:
    """docs/results.md from the study's runs (read back from MLflow): the headline in
    full and one table per sweep, each captioned with the one code version of its runs
    (refused if they differ), and the plot."""
    lines = ["# Results: MMBind across federated nodes", "", SETTING,
             f"Command: `{command}`" if command else "Command not recorded.",
             "(seeds 0..n-1).", ""]  # fmt: skip
    for sweep in sweeps:
        table = headline_table(runs) if sweep == "headline" else sweep_table(runs, sweep)
        if table is None:
            continue
        lines += [f"## {'Headline' if sweep == 'headline' else f'Sweep: {sweep}'}", "",
                  markdown_table(table)]  # fmt: skip
        if sweep == "headline":
            lines += _verdict(runs)
    png = doc.parent / "results_mmbind.png"
    _plot(runs, [s for s in sweeps if s != "headline"] or list(sweeps), png)
    lines += [
        f"![accuracy per sweep]({png.name})",
        "",
        f"Runs: `{run_dir}` (one results.json each) and MLflow experiment "
        f"`{MLFLOW_EXPERIMENT}`, whose runs the tables are read from (`fed-iotlm report "
        f"{MLFLOW_EXPERIMENT} --study mmbind` prints them).",
        "",
    ]
    atomic_write_text(doc, "\n".join(lines))


def _means(runs: list[Run], sweep: str, label: str) -> dict[str, float]:
    """Mean test accuracy per method at one point of a sweep (FINISHED runs)."""
    found: dict[str, list[float]] = {}
    for run in runs:
        method, acc = method_of(run), accuracy("accuracy")(run)
        if (
            run.status == "FINISHED"
            and method
            and acc is not None
            and point_of(run, sweep) == label
        ):
            found.setdefault(method, []).append(acc)
    return {m: float(np.mean(v)) for m, v in found.items()}


def _verdict(runs: list[Run]) -> list[str]:
    """MMBind against the best other federated row, and its gap to centralized MMBind."""
    ((label, _),) = sweep_points("headline")
    mean = _means(runs, "headline", label)
    fed = {m: v for m, v in mean.items() if m in FEDERATED}
    if "mmbind" not in mean or not fed:
        return []
    best = max(fed, key=fed.__getitem__)
    out = [f"MMBind-federated {mean['mmbind']:.3f} vs the best other federated baseline "
           f"(`{best}`) {fed[best]:.3f}: {100 * (mean['mmbind'] - fed[best]):+.1f} points "
           "(target: +5)."]  # fmt: skip
    if "centralized_mmbind" in mean:
        gap = 100 * (mean["mmbind"] - mean["centralized_mmbind"])
        out.append(
            f"Gap to centralized MMBind ({mean['centralized_mmbind']:.3f}): {gap:+.1f} points "
            "(target: within 2)."
        )
    return [*out, ""]


def _plot(runs: list[Run], sweeps: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 3.6), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps, strict=True):
        labels = [label for label, _ in sweep_points(sweep)]
        for m in METHODS:
            vals = [[accuracy("accuracy")(r) for r in runs if r.status == "FINISHED"
                     and method_of(r) == m and point_of(r, sweep) == p] for p in labels]  # fmt: skip
            if not any(vals):
                continue
            ys = [np.mean(v) if v else np.nan for v in vals]
            es = [np.std(v) if v else np.nan for v in vals]
            ax.errorbar(range(len(labels)), ys, yerr=es, marker="o", capsize=3, label=m)
        ax.set_xticks(range(len(labels)), labels, rotation=15)
        ax.set_ylim(0, 1)
        ax.set_title(sweep)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (all modalities)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
