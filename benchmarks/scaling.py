"""Time per round of our federation as the number of simulated nodes grows.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.scaling [--quick]``

Two modes, each at every ``--nodes`` N (default 10, 100, 1000), under
``flwr.simulation.run_simulation`` with the backend config ``simulations.run`` uses:

* ``fixed``: ``--sample`` (10) nodes train per round, whatever N is
  (``strategy.fraction_train = k/N``, ``strategy.min_nodes = k``: flwr's FedAvg samples
  ``max(int(N * fraction_train), min_train_nodes)`` nodes with ``random.sample``).  A
  round's work does not depend on N, so its time should stay flat: the ratio
  t(N)/t(smallest N) near 1 says the server, the nodes and the engine do no per-round
  work for the nodes that were not sampled.
* ``fraction``: ``--fraction`` (10 %) of the nodes train per round
  (``max(1, round(f·N))`` of them), so the work per round grows linearly in N; the report
  fits ``t = a + b·N`` by least squares and gives R² and each point's relative
  residual (linear: R² near 1, residuals small; super-linear: the largest N above the line).

Every node holds ``--samples-per-node`` training samples (``data.num_train =
samples·N``), so a node's local work is the same at every N; ``experiment=quick`` with a
random plan (``partition.missing_rate=0.4``), one local epoch.

Sides.  ``ours``: ``build_strategy("federated", ...)`` (ModalityAwareFedAvg) and the
project's ClientApp.  ``flwr``: ``flwr.serverapp.strategy.FedAvg`` and the textbook
ClientApp of :mod:`benchmarks.round_overhead` (same training, full state dict up), run
at the same N and sampling (``--baseline``: ``fixed`` = every N of the fixed mode,
``largest`` = the largest N of both modes, ``none``).  ``overhead_ratio`` = ours / flwr.

Timing, as in :mod:`benchmarks.round_overhead`: a round is entry of ``configure_train`` to
return of ``aggregate_train`` (wrapped on the strategy instance), ``--warmup`` rounds
dropped (Ray actor start, each actor's first dataset synthesis), median of the timed
rounds.  Outside the rounds, timed in the first ``ours`` run at each N only
(``once_per_run_s``): ``roll_call_s`` (our server's ``wait_for_nodes`` +
``identify_nodes``: one message to every node, once per run; it also warms every Ray
actor up) and, with ``--final-eval``, ``final_eval_s`` (``evaluate_nodes``: every node
scores the final model, once per run).  Both send in chunks (:mod:`server.chunked`).  ``setup_s`` is the rest of the
``run_simulation`` wall time (Ray start, registering N nodes, shut-down).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from benchmarks.machine import emit, loadavg
from benchmarks.round_overhead import (
    CLIENT_TIMING_KEY,
    PER_SITE,
    RoundSample,
    backend_config,
    initial_arrays,
    instrument,
    machine_info,
    make_baseline_client_app,
    make_strategy,
    timed_client_app,
)
from fed_iotlm.settings import compose

MODES = ("fixed", "fraction")


@dataclass(frozen=True)
class Point:
    """One configuration to simulate: N nodes, ``sampled`` of them trained per round."""

    nodes: int
    sampled: int


@dataclass
class RunResult:
    """What one simulation measured."""

    samples: list[RoundSample]
    roll_call_s: float | None
    final_eval_s: float | None
    wall_s: float


def sampled_nodes(mode: str, nodes: int, sample: int, fraction: float) -> int:
    """How many nodes train per round in ``mode`` at ``nodes``."""
    if mode == "fixed":
        return min(sample, nodes)
    return max(1, round(fraction * nodes))


def compose_cfg(point: Point, samples_per_node: int, test_per_node: int) -> dict:
    """``experiment=quick`` scaled to ``point``: same data per node at every N."""
    return compose(
        [
            "experiment=quick",
            f"partition.num_nodes={point.nodes}",
            "partition.plan=null",
            "partition.missing_rate=0.4",
            f"data.num_train={samples_per_node * point.nodes}",
            f"data.num_test={test_per_node * point.nodes}",
            "train.epochs=1",
            "method=federated",
            "strategy=fedavg",
            f"strategy.fraction_train={point.sampled / point.nodes}",
            f"strategy.min_nodes={point.sampled}",
            "mlflow.enabled=false",
            # this ServerApp times training rounds and runs no statistics round, so each
            # node standardises with its own statistics (the same work per node)
            PER_SITE,
        ]
    )


def train_timing_mod(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod adding the time of a train call to its reply, as
    ``timed_client_app`` does for the baseline (``instrument`` removes it again)."""
    t0 = time.perf_counter()
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
        reply.content[CLIENT_TIMING_KEY] = ConfigRecord({"seconds": time.perf_counter() - t0})
    return reply


def make_server_app(
    side: str, cfg: dict, point: Point, num_rounds: int, once: bool, final_eval: bool, sink: list
) -> ServerApp:
    """``num_rounds`` instrumented train rounds; with ``once`` (ours, first run at this N)
    also the roll call before them and, with ``--final-eval``, the final evaluation."""
    from server.federated_run import evaluate_nodes, wait_for_nodes
    from server.roster import identify_nodes

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        roll_call = final = None
        if once:
            t0 = time.perf_counter()
            wait_for_nodes(grid, point.nodes, 600.0)
            identify_nodes(grid, point.nodes)
            roll_call = time.perf_counter() - t0
        strategy = make_strategy(side, cfg, point.nodes)
        samples = instrument(strategy)
        arrays = initial_arrays(cfg)
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=num_rounds)
        if once and final_eval:
            t0 = time.perf_counter()
            scores = evaluate_nodes(grid, result.arrays)
            final = time.perf_counter() - t0
            if len(scores) != point.nodes:
                raise RuntimeError(f"final evaluation: {len(scores)} of {point.nodes} replied")
        sink.append((samples, roll_call, final))

    return app


def run_point(
    side: str, cfg: dict, point: Point, num_rounds: int, once: bool, final_eval: bool
) -> RunResult:
    """One simulation of ``side`` at ``point``."""
    from flwr.simulation import run_simulation

    from clients.app import make_client_app

    sink: list = []
    if side == "ours":  # the project's ClientApp with every handler (identify, evaluate)
        client = make_client_app(cfg, mods=[train_timing_mod])
    else:
        client = timed_client_app(make_baseline_client_app(cfg))
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app(side, cfg, point, num_rounds, once, final_eval, sink),
        client_app=client,
        num_supernodes=point.nodes,
        backend_name=cfg.get("simulation", {}).get("backend", "ray"),
        backend_config=backend_config(cfg),
        verbose_logging=False,
    )
    wall = time.perf_counter() - t0
    if not sink:
        raise RuntimeError(f"{side} at {point}: the ServerApp did not finish; see the log")
    samples, roll_call, final = sink[0]
    bad = [s.server_round for s in samples if s.errors or s.replies != point.sampled]
    if len(samples) != num_rounds or bad:
        raise RuntimeError(f"{side} at {point}: rounds {bad} incomplete ({len(samples)} run)")
    return RunResult(samples, roll_call, final, wall)


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares ``y = a + b·x`` with R² and relative residuals per point."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {
        "intercept_s": round(float(a), 4),
        "slope_s_per_node": round(float(b), 6),
        "r2": round(1.0 - ss_res / ss_tot, 4) if ss_tot > 0 else None,
        "relative_residuals": [round(float(r), 3) for r in (y - pred) / pred],
        # log-log slope: 1 = linear, 0 = flat, 2 = quadratic
        "loglog_slope": round(float(np.polyfit(np.log(x), np.log(y), 1)[0]), 3),
    }


def summarize_run(r: RunResult, warmup: int, point: Point) -> dict:
    timed = r.samples[warmup:]
    per_round = statistics.median(s.seconds for s in timed)
    inside = sum(s.seconds + s.bookkeeping for s in r.samples)
    outside = (r.roll_call_s or 0.0) + (r.final_eval_s or 0.0) + inside
    client = [c for s in timed for c in s.client_seconds]
    return {
        "nodes": point.nodes,
        "sampled_per_round": point.sampled,
        "s_per_round": round(per_round, 4),
        "per_round_s": [round(s.seconds, 4) for s in timed],
        "server_s_per_round": round(statistics.median(s.server_seconds for s in timed), 5),
        "client_s_per_node_round": round(statistics.median(client), 4) if client else None,
        "roll_call_s": None if r.roll_call_s is None else round(r.roll_call_s, 3),
        "final_eval_s": None if r.final_eval_s is None else round(r.final_eval_s, 3),
        "setup_s": round(r.wall_s - outside, 2),
        "wall_s": round(r.wall_s, 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="10,100,1000", help="node counts (default 10,100,1000)")
    p.add_argument("--sample", type=int, default=10, help="fixed mode: nodes per round (10)")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction mode: share (0.1)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per run (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per run (default 1)")
    p.add_argument("--samples-per-node", type=int, default=10, help="training samples (10)")
    p.add_argument("--test-per-node", type=int, default=2, help="test samples per node (2)")
    p.add_argument("--modes", default="fixed,fraction", help="fixed,fraction (default both)")
    p.add_argument(
        "--baseline", choices=("fixed", "largest", "none"), default="largest",
        help="where flwr's FedAvg runs beside ours (default: the largest N of each mode)",
    )  # fmt: skip
    p.add_argument("--final-eval", action="store_true", help="also time evaluate_nodes")
    p.add_argument("--quick", action="store_true", help="10,100 nodes, 2 rounds: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--verbose", action="store_true", help="keep Flower's INFO log")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.rounds = "10,100", 2
    args.node_list = sorted({int(n) for n in str(args.nodes).split(",")})
    args.mode_list = [m for m in MODES if m in args.modes.split(",")]
    if not args.mode_list or min(args.node_list) < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--modes must name fixed and/or fraction; --nodes, --rounds >= 1; --warmup >= 0")
    return args


def plan_runs(args: argparse.Namespace) -> list[tuple[str, Point]]:
    """(side, point) in run order; a point two modes share is simulated once."""
    points = {
        mode: [Point(n, sampled_nodes(mode, n, args.sample, args.fraction)) for n in args.node_list]
        for mode in args.mode_list
    }
    runs: list[tuple[str, Point]] = []
    for mode in args.mode_list:
        for point in points[mode]:
            with_base = args.baseline == "fixed" and mode == "fixed"
            with_base |= args.baseline == "largest" and point.nodes == max(args.node_list)
            for side in ("flwr", "ours") if with_base else ("ours",):
                if (side, point) not in runs:
                    runs.append((side, point))
    return runs


def report(args: argparse.Namespace, results: dict, wall_s: float, load: dict) -> dict:
    out: dict = {"benchmark": "scaling", "modes": {}}
    for mode in args.mode_list:
        pts = [Point(n, sampled_nodes(mode, n, args.sample, args.fraction)) for n in args.node_list]
        ours = [results[("ours", p)] for p in pts]
        t = [r["s_per_round"] for r in ours]
        entry: dict = {
            "sampled_per_round": {str(p.nodes): p.sampled for p in pts},
            "s_per_round": {str(p.nodes): v for p, v in zip(pts, t, strict=True)},
            "ratio_to_smallest": {
                str(p.nodes): round(v / t[0], 3) for p, v in zip(pts, t, strict=True)
            },
        }
        if len(pts) >= 2:
            entry["fit_vs_nodes"] = linear_fit([p.nodes for p in pts], t)
        base = {str(p.nodes): results[("flwr", p)] for p in pts if ("flwr", p) in results}
        if base:
            entry["flwr_s_per_round"] = {n: b["s_per_round"] for n, b in base.items()}
            entry["overhead_ratio"] = {
                n: round(results[("ours", p)]["s_per_round"] / b["s_per_round"], 3)
                for p in pts
                if (n := str(p.nodes)) in base and (b := base[n])
            }
        entry["runs"] = {"ours": ours, "flwr": list(base.values())}
        out["modes"][mode] = entry
    once = [r for (side, _), r in results.items() if side == "ours" and r["roll_call_s"]]
    out["once_per_run_s"] = {  # outside the rounds; timed in the first ours run at each N
        str(r["nodes"]): {"roll_call_s": r["roll_call_s"], "final_eval_s": r["final_eval_s"]}
        for r in sorted(once, key=lambda r: r["nodes"])
    }
    out["settings"] = {
        k: getattr(args, k)
        for k in ("node_list", "sample", "fraction", "rounds", "warmup", "samples_per_node")
    }
    out["settings"]["test_per_node"] = args.test_per_node
    out["wall_s"] = round(wall_s, 1)
    out["loadavg_1m"] = load
    out["machine"] = machine_info()
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    results: dict[tuple[str, Point], dict] = {}
    load: dict = {"start": loadavg(), "per_run": []}
    t0 = time.perf_counter()
    measured_once: set[int] = set()  # N whose roll call (and final eval) were timed
    for side, point in plan_runs(args):
        cfg = compose_cfg(point, args.samples_per_node, args.test_per_node)
        once = side == "ours" and point.nodes not in measured_once
        measured_once.update([point.nodes] if once else [])
        run = run_point(side, cfg, point, args.warmup + args.rounds, once, args.final_eval)
        results[(side, point)] = summarize_run(run, args.warmup, point)
        load["per_run"].append({"side": side, "nodes": point.nodes, "loadavg_1m": loadavg()})
        print(f"# {side} N={point.nodes} k={point.sampled}: {results[(side, point)]}",
              file=sys.stderr, flush=True)  # fmt: skip
    load["end"] = loadavg()
    result = report(args, results, time.perf_counter() - t0, load)
    return emit(result, args.out)


if __name__ == "__main__":
    # Run through the importable module so Ray pickles the apps by reference to it.
    from benchmarks.scaling import main as _main

    _main()
