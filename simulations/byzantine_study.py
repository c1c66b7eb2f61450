"""Byzantine study: ``python -m simulations.byzantine_study [--seeds 2]``.

On the default federation (``configs/experiment/default.yaml``: 8 nodes, 4 modalities)
it runs clean modality-aware FedAvg, then, with 2 of the 8 nodes (25 %) attacking (partition
ids 0 and 1, scaled ×10 or sign-flipped ×10 updates, :mod:`fed_iotlm.federation.attacks`),
each aggregation rule: ``mean``, ``median``, ``trimmed_mean`` and ``krum``
(:mod:`fed_iotlm.federation.robust`).  Every run is a subprocess and is resumable
(:mod:`simulations.study_runner`); ``docs/byzantine.md`` (mean ± std over seeds) is
rewritten after each point.  ``--extra 'rounds=3'`` adds Hydra overrides to every run
(they are part of the run folder's key, so short runs never mix with full ones).
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
from fed_iotlm.report.page import Table
from fed_iotlm.report.render import markdown_table
from fed_iotlm.report.runs import Run
from fed_iotlm.report.study_table import Column, result, study_table
from simulations.study_progress import study_progress
from simulations.study_runner import REPO, logged_runs, point_key, run_one

RULES = ("mean", "median", "trimmed_mean", "krum")
ATTACKS = ("scale", "sign_flip")
EXPERIMENT = "default"  # configs/experiment/default.yaml
FRACTION = 0.25  # 2 of the default experiment's 8 nodes (attack.fraction rounds to a count)
SCALE = 10.0
# per rule, the parameters used here: trim one holder of 4 (an encoder) and two of 8 per
# side; Krum tolerates the 2 attackers
RULE_OVERRIDES: dict[str, list[str]] = {
    "mean": [],
    "median": [],
    "trimmed_mean": ["strategy.trim_fraction=0.25"],
    "krum": ["strategy.krum_f=2"],
}
CLEAN = "none"
MLFLOW_EXPERIMENT = "byzantine-study"


def study_points(
    rules: list[str], attacks: list[str], clean_rules: list[str]
) -> list[tuple[str, str, list[str]]]:
    """(attack, rule, overrides) per point: the clean runs first, then each attack × rule."""
    points = [
        (CLEAN, rule, [f"strategy.aggregation={rule}", *RULE_OVERRIDES[rule]])
        for rule in clean_rules
    ]
    for attack in attacks:
        for rule in rules:
            points.append(
                (
                    attack,
                    rule,
                    [
                        f"attack.kind={attack}",
                        f"attack.fraction={FRACTION}",
                        f"attack.scale={SCALE}",
                        f"strategy.aggregation={rule}",
                        *RULE_OVERRIDES[rule],
                    ],
                )
            )
    return points


ATTACK_LABELS = {
    CLEAN: "no attack",
    "scale": f"{FRACTION:.0%} scaled ×{SCALE:g}",
    "sign_flip": f"{FRACTION:.0%} sign-flipped ×{SCALE:g}",
}


def attack_row(run: Run) -> tuple[str] | None:
    """A run's row: its attack (``attack.kind``; the clean runs' is ``none``)."""
    attack = run.params.get("attack.kind", CLEAN)
    return (ATTACK_LABELS[attack],) if attack in ATTACK_LABELS else None


def rule_accuracy(rule: str) -> Callable[[Run], float | None]:
    """Test accuracy of the runs aggregated by ``rule`` (None for the other rules' runs)."""
    test = result("test", "accuracy")
    return lambda run: test(run) if run.params.get("strategy.aggregation") == rule else None


def tables(runs: list[Run], experiment: str = MLFLOW_EXPERIMENT, caption: str = "") -> list[Table]:
    """One table: a row per attack, a column per rule, test accuracy over seeds (also
    what ``fed-iotlm report byzantine-study --study byzantine`` prints)."""
    rows = list(ATTACK_LABELS.values())
    rules = [r for r in RULES if any(rule_accuracy(r)(run) is not None for run in runs)]
    table = study_table(
        runs, attack_row, ["attack"], [Column(f"`{r}`", value=rule_accuracy(r)) for r in rules],
        caption=caption or "Test accuracy (mean over the two tasks, all modalities present).",
        order=lambda g: rows.index(g[0]),
    )  # fmt: skip
    return [table]


def write_report(
    runs: list[Run], doc: Path, run_dir: Path, seeds: int, extra: list[str], command: str
) -> None:
    """docs/byzantine.md: the study's runs (read back from MLflow) as one table, one row
    per attack, one column per rule, test accuracy."""
    (table,) = tables(runs, caption=f"Test accuracy over {seeds} seed(s)"
                      + (f", extra overrides `{' '.join(extra)}`" if extra else "") + ".")  # fmt: skip
    lines = [
        "# Byzantine robustness of per-group aggregation",
        "",
        "Default federation (`configs/experiment/default.yaml`: 8 nodes, each missing some",
        "of the 4 modalities), method `federated` (modality-aware FedAvg: each parameter",
        "group aggregated over the nodes holding it). Attackers are partition ids 0 and 1",
        f"({FRACTION:.0%} of the nodes); each sends `current + factor·(trained − current)`",
        f"with factor {SCALE:g} (scaled) or −{SCALE:g} (sign-flipped) for the groups it",
        "holds. Robust rules run per group over its holders, unweighted:",
        "`trimmed_mean` trims 25 % per side (1 of an encoder's 4 holders, 2 of 8 for the",
        "fusion and heads), `krum` assumes f = 2 and keeps the single best update.",
        "Accuracy: mean over the two tasks on the full test set, all modalities present.",
        "",
        markdown_table(table),
        f"Runs: `{run_dir}` (one results.json each; per round `history` has the screening",
        f"counts) and MLflow experiment `{MLFLOW_EXPERIMENT}`, whose runs this table is read",
        f"from (`fed-iotlm report {MLFLOW_EXPERIMENT} --study byzantine` prints it).",
        f"Reproduce: `{command}`.",
        "",
    ]
    atomic_write_text(doc, "\n".join(lines))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Run the study; ``argv`` defaults to the command line (``fed-iotlm study`` passes
    its own, with ``prog`` naming the verb in usage and errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--clean-rules", default="mean", help="rules also run without attack")
    parser.add_argument("--extra", default="", help="Hydra overrides added to every run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "byzantine_study")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "byzantine.md")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "simulations.byzantine_study", *argv])
    extra = shlex.split(args.extra)
    split = [[x for x in s.split(",") if x] for s in (args.rules, args.attacks, args.clean_rules)]
    unknown = sorted({*split[0], *split[2]} - set(RULES)) + sorted(set(split[1]) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown rule or attack: {unknown}")
    run_dir = args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    table: dict[str, dict[str, list[dict]]] = {}
    outs: list[Path] = []
    points = list(study_points(*split))
    with study_progress(len(points) * args.seeds):
        for attack, rule, overrides in points:
            overrides = [*overrides, *extra]
            for seed in range(args.seeds):
                out = args.out / point_key(overrides, experiment=EXPERIMENT) / f"seed{seed}"
                t0 = time.time()
                res = run_one(
                    out,
                    ["method=federated", f"seed={seed}", *overrides],
                    experiment=EXPERIMENT,
                    mlflow_experiment=MLFLOW_EXPERIMENT,
                )
                outs.append(out)
                row = {**res["test"], "code_version": res.get("code_version")}
                table.setdefault(attack, {}).setdefault(rule, []).append(row)
                print(
                    f"{attack} | {rule} | seed {seed}: {res['test']['accuracy']:.3f}"
                    f" ({time.time() - t0:.0f}s)",
                    flush=True,
                )
            # rewritten after each point, so an interrupted study keeps its results
            atomic_write_text(args.out / "summary.json", json.dumps(table, indent=2))
            runs = logged_runs(MLFLOW_EXPERIMENT, outs)
            write_report(runs, args.doc, run_dir, args.seeds, extra, command)
    print(args.doc)


if __name__ == "__main__":
    main()
