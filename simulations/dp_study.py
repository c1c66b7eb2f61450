"""DP study: ``python -m simulations.dp_study [--nodes 1000 --per-round 100 --rounds 20]``.

DP-FedAvg (:mod:`fed_iotlm.federation.privacy`, ``dp.mode=central``) in the regime it is
meant for: many simulated nodes, ``m`` of them sampled per round (``q = m / N < 1``), so
that the noise on a group's average, ``σC / h_g``, is small.  The federation is
``configs/experiment/scale_1000.yaml`` (random plan, 10 training samples per node)
resized to ``N`` nodes and ``m`` per round, with ``--epochs`` local epochs (default 5,
not scale_1000's 1: with 9 training samples an epoch is one optimiser step, and at
N = 200, m = 40, T = 10, seed 0 the non-private run's *validation* accuracy was 0.33 with
1 epoch against 0.54 with 5; a non-private model that has barely learnt makes any DP
row look close to it).

For each target ε (at ``δ``, default ``min(1/N², 1e-5)``) the noise multiplier σ is the
one the project's own accountant (:func:`~fed_iotlm.federation.privacy.epsilon_after`,
opacus' RDP accountant) says reaches that ε after ``T`` rounds at rate ``q``, found by
bisection.  Rows: the non-private run (DP off, everything else equal), optionally the
clipped run without noise (``--clip-only``: what clipping alone costs), and DP at each σ;
one run per seed.  The clipping norm ``C`` is fixed, before any DP run, from the
non-private seed-0 run's update norms (the median over its rounds of the per-round median
``‖update‖₂``), or given with ``--clip``: no test figure feeds any choice.  Every run is a
resumable subprocess (:mod:`simulations.study_runner`); the table (``--doc``, default
``docs/dp_study.md``) is rewritten after each run and quotes the ε each run's
results.json reports, not the requested one.  ``--plan`` prints σ per ε and the runs, and
runs nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.protocol import one_code_version
from simulations import study_runner
from simulations.study_progress import study_progress
from simulations.study_runner import REPO, fmt_mean_ci, fmt_mean_std, point_key

EXPERIMENT = "scale_1000"
MLFLOW_EXPERIMENT = "dp-study"
NON_PRIVATE = "non-private"
CLIP_ONLY = "clipped, no noise"
WITHIN_POINTS = 5.0  # issue 14: accuracy within 5 points of non-private at ε = 8


@dataclass(frozen=True)
class Design:
    """The federation every row shares: ``nodes`` simulated nodes, ``per_round`` sampled
    each round (``q``), ``rounds`` releases, ``per_node`` training samples per node."""

    nodes: int
    per_round: int
    rounds: int
    delta: float
    per_node: int = 10
    epochs: int = 5

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ValueError(f"--nodes must be >= 2, got {self.nodes}")
        if not 1 <= self.per_round <= self.nodes:
            raise ValueError(
                f"--per-round must be in [1, --nodes={self.nodes}], got {self.per_round}"
            )
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"--delta must be in (0, 1), got {self.delta}")
        if self.per_node < 2:
            raise ValueError(f"--per-node must be >= 2 (train and validation), got {self.per_node}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")

    @property
    def q(self) -> float:
        """Sampling rate as the accountant sees it (flwr samples ``per_round`` nodes)."""
        return self.per_round / self.nodes

    def overrides(self) -> list[str]:
        """Hydra overrides that resize scale_1000 to this design (DP settings apart).
        ``min_nodes = m`` makes flwr sample exactly ``m``: it samples
        ``max(int(fraction · N), min_nodes)`` and ``int`` may round ``m/N · N`` down."""
        return [
            "method=federated",
            f"partition.num_nodes={self.nodes}",
            f"data.num_train={self.nodes * self.per_node}",
            f"strategy.fraction_train={self.q!r}",
            f"strategy.min_nodes={self.per_round}",
            f"rounds={self.rounds}",
            f"train.epochs={self.epochs}",
        ]


def default_delta(nodes: int) -> float:
    """``min(1/N², 1e-5)``: below one over the number of nodes squared, as node-level DP
    asks of δ, and never looser than the project's default 1e-5."""
    return min(1.0 / nodes**2, 1e-5)


def sigma_for_epsilon(
    epsilon: float,
    q: float,
    rounds: int,
    delta: float,
    rel_tol: float = 1e-3,
    accountant: Callable[[list[tuple[float, float]], float], float] | None = None,
) -> float:
    """The noise multiplier σ at which ``rounds`` releases of the sampled Gaussian
    mechanism at rate ``q`` reach ``epsilon`` at ``delta``: bisection over σ (ε falls as σ
    grows) until ``epsilon·(1 - rel_tol) <= ε(σ) <= epsilon``, so the returned σ never
    spends more than the target.  ``accountant`` defaults to the project's own
    (:func:`fed_iotlm.federation.privacy.epsilon_after`), the one every run reports with."""
    if not epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {epsilon}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample rate q must be in (0, 1], got {q}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if accountant is None:
        from fed_iotlm.federation.privacy import epsilon_after

        accountant = epsilon_after

    def eps(sigma: float) -> float:
        return accountant([(sigma, q)] * rounds, delta)

    hi = 1.0
    while eps(hi) > epsilon:  # enough noise: ε(hi) <= target
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(
                f"epsilon={epsilon} is out of reach below sigma=1e4 (q={q}, T={rounds})"
            )
    lo = hi / 2.0
    while eps(lo) <= epsilon:  # too little noise: ε(lo) > target
        lo /= 2.0
        if lo < 1e-4:
            raise ValueError(f"epsilon={epsilon} is reached even at sigma=1e-4 (q={q}, T={rounds})")
    eps_hi = eps(hi)
    while eps_hi < epsilon * (1.0 - rel_tol):
        mid = 0.5 * (lo + hi)
        eps_mid = eps(mid)
        if eps_mid > epsilon:
            lo = mid
        else:
            hi, eps_hi = mid, eps_mid
        if hi - lo < 1e-12 * hi:
            break  # ε(σ) jumps here; hi still keeps ε <= target
    return hi


def dp_overrides(clip: float, sigma: float, delta: float) -> list[str]:
    """Central DP-FedAvg at ``C = clip`` and ``σ = sigma`` (σ = 0: clipping alone)."""
    return [
        "dp.enabled=true",
        "dp.mode=central",
        f"dp.clipping_norm={clip:.6g}",
        f"dp.noise_multiplier={sigma:.6g}",
        f"dp.delta={delta:g}",
    ]


def clip_from_update_norms(results: dict) -> float:
    """``C`` from a non-private run: the median over its rounds of the per-round median
    update norm (``history[*].update_norm_median``), to 3 significant digits.  About half
    the updates are then clipped, and nothing but training-time norms is looked at."""
    norms = [h["update_norm_median"] for h in results["history"] if "update_norm_median" in h]
    if not norms:
        raise ValueError("the non-private run's history has no update_norm_median to fix C from")
    return float(f"{float(np.median(norms)):.3g}")


def row_of(results: dict, setting: str, target: float | None) -> dict:
    """One table row's figures from one results.json: test and val accuracy (mean over
    tasks) and the privacy actually spent, as the run's ``privacy`` block reports it."""
    privacy = results.get("privacy") or {}
    val = results.get("val") or {}
    if privacy:
        rates = list(privacy["sample_rate_by_round"].values())
    else:  # DP off: q from how many nodes each round sent to
        rates = [
            h["nodes_sent"] / results["num_nodes"] for h in results["history"] if "nodes_sent" in h
        ]
    return {
        "setting": setting,
        "target_epsilon": target,
        "seed": results["seed"],
        "test": float(results["test"]["accuracy"]),
        "val": float(val["accuracy"]) if "accuracy" in val else None,
        "epsilon": privacy.get("epsilon"),
        "sigma": privacy.get("noise_multiplier"),
        "clip": privacy.get("clipping_norm"),
        "delta": privacy.get("delta"),
        "q": float(np.mean(rates)) if rates else None,
        "rounds": results["rounds"],
        "nodes": results["num_nodes"],
        "wall_s": results.get("wall_s"),
        "code_version": results.get("code_version"),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _order(setting: str, rows: list[dict]) -> tuple[int, float]:
    """non-private, clip only, then DP by decreasing ε."""
    target = rows[0]["target_epsilon"]
    rank = {NON_PRIVATE: 0, CLIP_ONLY: 1}.get(setting, 2)
    return rank, -(target or 0.0)


def table(rows: list[dict], caption: str) -> str:
    """Markdown: the caption, then one line per setting over its seeds.  Refuses rows of
    more than one code version (:func:`fed_iotlm.protocol.one_code_version`)."""
    version = one_code_version(rows)
    by_setting: dict[str, list[dict]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    base = by_setting.get(NON_PRIVATE)
    base_test = float(np.mean([r["test"] for r in base])) if base else None
    head = ["setting", "seeds", "test accuracy: mean ± std [95 % CI]", "Δ test vs non-private (points)",
            "val accuracy: mean ± std", "ε reached", "σ", "C", "q", "T"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    verdict = []
    for setting, rs in sorted(by_setting.items(), key=lambda kv: _order(*kv)):
        test = [r["test"] for r in rs]
        val = [r["val"] for r in rs if r["val"] is not None]
        eps = [r["epsilon"] for r in rs]
        # points of test accuracy against the non-private mean (negative: DP lost some)
        gap = None if base_test is None else 100.0 * (float(np.mean(test)) - base_test)
        eps_cell = "∞ (no noise)" if setting == CLIP_ONLY else "–"
        if all(e is not None for e in eps):
            eps_cell = f"{max(eps):.2f}"  # the worst seed's, should they differ
        cells = [
            setting, str(len(rs)), fmt_mean_ci(test),
            "–" if setting == NON_PRIVATE or gap is None else f"{gap:+.1f}",
            fmt_mean_std(val) if len(val) == len(rs) else "–", eps_cell,
            _fmt(rs[0]["sigma"], ".4g"), _fmt(rs[0]["clip"], ".3g"),
            _fmt(rs[0]["q"], ".3g"), str(rs[0]["rounds"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        if rs[0]["target_epsilon"] is not None and gap is not None:
            within = "within" if gap >= -WITHIN_POINTS else "NOT within"
            side = "below" if gap < 0 else "above"
            verdict.append(
                f"at ε = {rs[0]['target_epsilon']:g} test accuracy is {abs(gap):.1f} points "
                f"{side} non-private ({within} {WITHIN_POINTS:g})"
            )
    text = caption.format(version=version)
    if verdict:
        sentence = "; ".join(verdict)
        text += " " + sentence[0].upper() + sentence[1:] + "."
    return text + "\n\n" + "\n".join(lines) + "\n"


def caption_of(
    design: Design, clip_note: str, seeds: list[int], extra: list[str], command: str
) -> str:
    """The table's caption; ``{version}`` is filled in by :func:`table`."""
    return (
        f"DP-FedAvg (central, node-level) on `experiment={EXPERIMENT}` resized to N = {design.nodes} "
        f"simulated nodes ({design.per_node} training samples each, 1 for validation; "
        f"{design.epochs} local epoch(s) per round), "
        f"m = {design.per_round} sampled per round (q = {design.q:.3g}), T = {design.rounds} "
        f"rounds, δ = {design.delta:g}"
        + (f", extra overrides `{' '.join(extra)}`" if extra else "")
        + ". σ per row: bisection over σ with the project's accountant (opacus RDP, "
        "`fed_iotlm.federation.privacy.epsilon_after`) to the target ε after T rounds at q; "
        "ε reached is what each run's results.json `privacy.epsilon` reports (worst seed). "
        f"C: {clip_note}. Accuracy: mean over the two tasks, last round's model (nothing "
        f"chosen on test), seeds {','.join(map(str, seeds))}; 95 % interval of the mean over "
        "seeds (Student t). Code version `{version}`; "
        f"`{command}`."
    )


def plan_settings(
    args: argparse.Namespace, design: Design
) -> list[tuple[str, float | None, float]]:
    """(setting, target ε, σ) per DP row, σ from :func:`sigma_for_epsilon`."""
    rows = [(CLIP_ONLY, None, 0.0)] if args.clip_only else []
    for eps in sorted(args.epsilons, reverse=True):
        rows.append(
            (f"ε = {eps:g}", eps, sigma_for_epsilon(eps, design.q, design.rounds, design.delta))
        )
    return rows


def parse_args(argv: list[str], prog: str | None) -> argparse.Namespace:
    """The study's options (``fed-iotlm study dp --help``)."""
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--nodes", type=int, default=1000, help="simulated nodes N")
    p.add_argument("--per-round", type=int, default=100, help="nodes sampled per round m")
    p.add_argument("--rounds", type=int, default=20, help="rounds T (= releases)")
    p.add_argument("--per-node", type=int, default=10, help="training samples per node")
    p.add_argument("--epochs", type=int, default=5, help="local epochs per round (train.epochs)")
    p.add_argument("--delta", type=float, default=None, help="default: min(1/N², 1e-5)")
    p.add_argument("--epsilons", type=floats, default=[8.0], help="target ε list, e.g. 8,4,1")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",") if v], default=[0, 1, 2])
    p.add_argument("--clip", default="auto",
                   help="C: a number, or auto (median update norm of the non-private seed-0 run)")  # fmt: skip
    p.add_argument("--clip-only", action="store_true", help="also run clipping without noise")
    p.add_argument(
        "--extra", default="", help="Hydra overrides added to every run, e.g. 'model.dim=32'"
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "runs" / "dp_study", help="run folders (resumable)"
    )
    p.add_argument(
        "--doc", type=Path, default=REPO / "docs" / "dp_study.md", help="the table (Markdown)"
    )
    p.add_argument("--plan", action="store_true", help="print σ per ε and the runs; run nothing")
    args = p.parse_args(argv)
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if not args.epsilons or min(args.epsilons) <= 0:
        p.error(f"--epsilons must be > 0, got {args.epsilons}")
    if args.clip != "auto":
        try:
            args.clip = float(args.clip)
        except ValueError:
            p.error(f"--clip must be a number or auto, got {args.clip!r}")
        if not args.clip > 0:
            p.error(f"--clip must be > 0, got {args.clip}")
    try:
        delta = default_delta(args.nodes) if args.delta is None else args.delta
        args.design = Design(
            args.nodes, args.per_round, args.rounds, delta, args.per_node, args.epochs
        )
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the study; ``argv`` defaults to the command line (``fed-iotlm study dp`` passes
    its own, with ``prog`` naming the verb in usage and errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    design: Design = args.design
    extra = shlex.split(args.extra)
    command = shlex.join(["python", "-m", "simulations.dp_study", *argv])
    settings = plan_settings(args, design)
    print(
        f"N={design.nodes} m={design.per_round} q={design.q:.4g} T={design.rounds} δ={design.delta:g}"
    )
    for setting, _, sigma in settings:
        print(f"  {setting}: sigma={sigma:.6g}", flush=True)
    runs_per_setting = len(args.seeds)
    print(f"  runs: {(1 + len(settings)) * runs_per_setting}", flush=True)
    if args.plan:
        return 0
    base = [*design.overrides(), *extra]
    rows: list[dict] = []

    def run(setting: str, target: float | None, overrides: list[str], seed: int) -> dict:
        keyed = [*overrides, f"seed={seed}"]
        t0 = time.time()
        res = study_runner.run_one(
            args.out / point_key(keyed, experiment=EXPERIMENT),
            keyed,
            experiment=EXPERIMENT,
            mlflow_experiment=MLFLOW_EXPERIMENT,
        )
        rows.append(row_of(res, setting, target))
        print(
            json.dumps({**rows[-1], "code_version": None, "study_s": round(time.time() - t0)}),
            flush=True,
        )
        return res

    def write(clip_note: str) -> None:  # after each run: an interrupted study keeps its rows
        caption = caption_of(design, clip_note, args.seeds, extra, command)
        atomic_write_text(args.doc, "# DP-FedAvg at many nodes\n\n" + table(rows, caption))

    with study_progress((1 + len(settings)) * runs_per_setting):
        first = run(NON_PRIVATE, None, base, args.seeds[0])
        if args.clip == "auto":
            clip = clip_from_update_norms(first)
            note = (f"{clip:g}, the median over rounds of the per-round median update norm of the "
                    f"non-private seed-{args.seeds[0]} run (fixed before any DP run)")  # fmt: skip
        else:
            clip, note = args.clip, f"{args.clip:g}, given (`--clip`)"
        print(f"C = {clip:g}", flush=True)
        write(note)
        for seed in args.seeds[1:]:
            run(NON_PRIVATE, None, base, seed)
            write(note)
        for setting, target, sigma in settings:
            for seed in args.seeds:
                run(setting, target, [*base, *dp_overrides(clip, sigma, design.delta)], seed)
                write(note)
    print(args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
