"""Per-round cost of OUR federated round against a bare Flower FedAvg round.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.round_overhead [--nodes 4] [--rounds 5]``

What is compared
----------------
Both sides run under ``flwr.simulation.run_simulation`` with the same number of
SuperNodes, the same backend config (built as ``simulations.run`` builds it), the same
initial weights and the same node data: every ClientApp takes its model, tensors and
``TrainConfig`` from ``clients.node.get_node(cfg, partition_id)`` and trains with
``fed_iotlm.models.training.train_local`` under the same per-round seed.

* ``baseline``: a minimal ServerApp calling ``flwr.serverapp.strategy.FedAvg.start``
  and a minimal ClientApp in the textbook Flower style: load the arrays with
  ``ArrayRecord.to_torch_state_dict``, train, reply with the full state dict
  (``ArrayRecord(model.state_dict())``) and ``num-examples``.
* ``ours``: ``build_strategy("federated", cfg["strategy"], n)`` (ModalityAwareFedAvg)
  started by a minimal ServerApp, with the project's ClientApp
  (``clients.app.make_client_app(cfg)``): group selection on the node, per-group
  counts in the metrics, group-wise aggregation on the server.

Neither side evaluates (``fraction_evaluate=0``, no ``evaluate_fn``), writes outputs or
logs to MLflow, so the difference is the round mechanics alone.

How a round is timed
--------------------
The strategy instance's ``configure_train`` and ``aggregate_train`` are wrapped (on
the instance, so the class code under test runs unchanged).  A round's wall time is
``perf_counter()`` at the entry of ``configure_train`` to the return of
``aggregate_train``: node sampling, building the messages, shipping them to the
simulated nodes, client-side training and reply building, the trip back and server
aggregation.  The empty evaluate phase and strategy logging between rounds are outside
the window (they are the same code on both sides); ``loop_s_per_round`` in the output
covers them too, as a cross-check.  ``server_s_per_round`` is the part spent inside
the two strategy methods alone (server-side mechanics, no network, no training).
``client_s_per_node_round`` is the median time of one node's ClientApp train call
(load, train, build the reply), taken by the same thin wrapper around both ClientApps;
the wrapper puts it in a ConfigRecord of the reply, which is read and removed before
the strategy sees the reply (that bookkeeping is subtracted from the round time).

Resolution: Flower's simulation engine polls for messages and replies every 0.1 s
(``InMemoryGrid.pull_interval``, the Simulation Runtime's queue feeder), so single
round times move in steps of about 0.1 s on both sides; medians over several rounds
and repeats, and the two finer-grained figures above, are what to compare.

Each simulation runs ``warmup + rounds`` rounds.  The first ``warmup`` rounds are
discarded: they include Ray actor start-up, the ClientApp's imports and each actor's
first ``get_node`` (dataset synthesis).  Ray itself is started by the first
``run_simulation`` and reused afterwards; its start-up is never inside a timed window.
The sides alternate in ABBA order (baseline, ours, ours, baseline, ...) so that a slow
drift of the machine falls on both equally.  For each side the headline is the median,
over repeats, of each run's median round time (runs on a shared machine can differ by
tens of percent, so pooling the rounds of all runs would give a fragile median of a
mixture); ``ratio`` = ours / baseline of those two numbers, and ``ratio_per_repeat``
gives ours / baseline within each ABBA pair.

Upload bytes are the array payload (``record_nbytes``) of the train replies seen by
``aggregate_train`` during the timed rounds, per reply.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from benchmarks.machine import emit, loadavg
from benchmarks.machine import machine_info as _machine_info
from clients.node import get_node
from fed_iotlm.experiment import model_spec
from fed_iotlm.federation.records import numpy_to_record, record_nbytes, state_to_numpy
from fed_iotlm.federation.strategy import build_strategy
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import train_local
from fed_iotlm.settings import compose

SIDES = ("baseline", "ours")
CLIENT_TIMING_KEY = "bench-client-timing"  # ConfigRecord the timing wrapper adds to replies


@dataclass
class RoundSample:
    """perf_counter() stamps of one round, seen from inside the ServerApp."""

    server_round: int
    start: float = 0.0  # configure_train entered
    sent: float = 0.0  # configure_train returned
    agg_start: float = 0.0  # aggregate_train entered
    end: float = 0.0  # aggregate_train returned
    replies: int = 0
    errors: int = 0
    bytes_up: int = 0
    client_seconds: list[float] = field(default_factory=list)
    bookkeeping: float = 0.0  # time this benchmark spent reading the replies

    @property
    def seconds(self) -> float:
        """The round's wall time, less this benchmark's own bookkeeping."""
        return self.end - self.start - self.bookkeeping

    @property
    def server_seconds(self) -> float:
        return (self.sent - self.start) + (self.end - self.agg_start)


def instrument(strategy: FedAvg) -> list[RoundSample]:
    """Wrap ``strategy``'s train hooks on the instance; returns the list they fill."""
    samples: list[RoundSample] = []
    configure, aggregate = strategy.configure_train, strategy.aggregate_train

    def configure_train(server_round, arrays, config, grid):
        sample = RoundSample(server_round, start=time.perf_counter())
        messages = list(configure(server_round, arrays, config, grid))
        sample.sent = time.perf_counter()
        samples.append(sample)
        return messages

    def aggregate_train(server_round, replies):
        t0 = time.perf_counter()
        replies = list(replies)
        sample = samples[-1]
        for msg in replies:
            if msg.has_error():
                sample.errors += 1
                continue
            # the strategy sees exactly what the node's ClientApp sent
            timing = msg.content.config_records.get(CLIENT_TIMING_KEY)
            if timing is not None:
                sample.client_seconds.append(float(timing["seconds"]))
                del msg.content[CLIENT_TIMING_KEY]
            sample.replies += 1
            sample.bytes_up += sum(record_nbytes(r) for r in msg.content.array_records.values())
        t1 = time.perf_counter()
        out = aggregate(server_round, replies)
        sample.agg_start, sample.end = t1, time.perf_counter()
        sample.bookkeeping = t1 - t0
        return out

    strategy.configure_train = configure_train
    strategy.aggregate_train = aggregate_train
    return samples


# the benchmarks' ServerApps run no statistics round (normalization=federated's)
PER_SITE = "normalization=per_site"


def compose_cfg(experiment: str, nodes: int) -> dict:
    return compose(
        [
            f"experiment={experiment}",
            f"partition.num_nodes={nodes}",
            "partition.plan=null",
            "partition.missing_rate=0.4",
            "method=federated",
            "strategy=fedavg",
            # this ServerApp times training rounds and runs no statistics round, so each
            # node standardises with its own statistics (the same work per node)
            PER_SITE,
        ]
    )


def backend_config(cfg: dict) -> dict:
    """The backend config ``simulations.run.run_flower_simulation`` uses for ``cfg``."""
    sim = cfg.get("simulation", {})
    init_args = {"include_dashboard": False, "logging_level": logging.ERROR}
    if sim.get("num_cpus"):
        init_args["num_cpus"] = int(sim["num_cpus"])
    return {
        "client_resources": {"num_cpus": float(sim.get("cpus_per_node", 1)), "num_gpus": 0.0},
        "init_args": init_args,
    }


def initial_arrays(cfg: dict) -> ArrayRecord:
    """The initial global model, as ``server.federated_run.run_federated`` builds it."""
    torch.manual_seed(int(cfg["seed"]))
    return numpy_to_record(state_to_numpy(MultisensoryModel(model_spec(cfg))))


def make_strategy(side: str, cfg: dict, num_nodes: int) -> FedAvg:
    if side == "ours":
        return build_strategy("federated", cfg["strategy"], num_nodes)
    min_nodes = int(cfg["strategy"].get("min_nodes") or num_nodes)
    return FedAvg(
        fraction_train=float(cfg["strategy"].get("fraction_train", 1.0)),
        fraction_evaluate=0.0,
        min_train_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )


def make_benchmark_server_app(
    side: str, cfg: dict, num_nodes: int, num_rounds: int, sink: list[RoundSample]
) -> ServerApp:
    """A ServerApp that only runs ``num_rounds`` train rounds of ``side``'s strategy."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = make_strategy(side, cfg, num_nodes)
        samples = instrument(strategy)
        strategy.start(grid=grid, initial_arrays=initial_arrays(cfg), num_rounds=num_rounds)
        sink.extend(samples)

    return app


def make_baseline_client_app(cfg: dict) -> ClientApp:
    """Textbook Flower ClientApp on the same node runtime: full state dict up."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # as clients.app: one simulated node per core
        node = get_node(cfg, int(context.node_config["partition-id"]))
        node.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        round_seed = int(msg.content["config"].get("server-round", 0)) * 10_007 + node.node
        stats = train_local(node.model, node.train, node.train_cfg, seed=round_seed)
        metrics = MetricRecord(
            {"train_loss": stats["train_loss"], "num-examples": float(node.num_train)}
        )
        arrays = ArrayRecord(node.model.state_dict())
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def timed_client_app(inner: ClientApp) -> ClientApp:
    """``inner`` with the time of its train call added to the reply (both sides alike).

    ``instrument`` removes the record again before the strategy sees the reply.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        reply = inner(msg, context)
        seconds = time.perf_counter() - t0
        if not reply.has_error():
            reply.content[CLIENT_TIMING_KEY] = ConfigRecord({"seconds": seconds})
        return reply

    return app


def run_side(side: str, cfg: dict, num_nodes: int, num_rounds: int) -> list[RoundSample]:
    """One simulation of ``side``; returns its per-round samples."""
    from flwr.simulation import run_simulation

    from clients.app import make_client_app

    sink: list[RoundSample] = []
    client_app = make_client_app(cfg) if side == "ours" else make_baseline_client_app(cfg)
    run_simulation(
        server_app=make_benchmark_server_app(side, cfg, num_nodes, num_rounds, sink),
        client_app=timed_client_app(client_app),
        num_supernodes=num_nodes,
        backend_name=cfg.get("simulation", {}).get("backend", "ray"),
        backend_config=backend_config(cfg),
        verbose_logging=False,
    )
    if len(sink) != num_rounds:
        raise RuntimeError(f"{side}: {len(sink)} of {num_rounds} rounds completed")
    bad = [s.server_round for s in sink if s.errors or s.replies != num_nodes]
    if bad:
        raise RuntimeError(f"{side}: rounds {bad} did not get a reply from every node")
    return sink


def machine_info() -> dict:
    return _machine_info(torch=torch.__version__, flwr=flwr.__version__)


def summarize(
    args: argparse.Namespace,
    runs: dict[str, list[list[RoundSample]]],
    order: list[str],
    wall_s: float,
    load: tuple[float | None, float | None],
) -> dict:
    """The JSON report: medians over the timed rounds (``args.warmup`` dropped per run)."""
    timed = {side: [r[args.warmup :] for r in runs[side]] for side in SIDES}

    def median_of(side: str, fn) -> float:
        return statistics.median(fn(s) for run in timed[side] for s in run)

    server = {side: median_of(side, lambda s: s.server_seconds) for side in SIDES}
    client = {
        side: statistics.median(c for run in timed[side] for s in run for c in s.client_seconds)
        for side in SIDES
    }
    loop = {
        side: statistics.median((run[-1].end - run[0].start) / len(run) for run in timed[side])
        for side in SIDES
    }
    per_repeat = {
        side: [statistics.median(s.seconds for s in run) for run in timed[side]] for side in SIDES
    }
    per_round = {side: statistics.median(per_repeat[side]) for side in SIDES}
    bytes_up = {
        side: int(
            sum(s.bytes_up for run in timed[side] for s in run)
            / sum(s.replies for run in timed[side] for s in run)
        )
        for side in SIDES
    }
    return {
        "benchmark": "round_overhead",
        "nodes": args.nodes,
        "rounds": args.rounds,
        "baseline_s_per_round": round(per_round["baseline"], 4),
        "ours_s_per_round": round(per_round["ours"], 4),
        "ratio": round(per_round["ours"] / per_round["baseline"], 4),
        "bytes_up_per_node_round": bytes_up,
        "detail": {
            "experiment": args.experiment,
            "repeats": args.repeats,
            "warmup_rounds": args.warmup,
            "order": order,
            "per_repeat_median_s": {k: [round(x, 4) for x in v] for k, v in per_repeat.items()},
            "ratio_per_repeat": [
                round(o / b, 4)
                for b, o in zip(per_repeat["baseline"], per_repeat["ours"], strict=True)
            ],
            "server_s_per_round": {k: round(v, 5) for k, v in server.items()},
            "client_s_per_node_round": {k: round(v, 4) for k, v in client.items()},
            "loop_s_per_round": {k: round(v, 4) for k, v in loop.items()},
            "wall_s": round(wall_s, 1),
            # other load on the machine during the run makes round times noisy
            "loadavg_1m": {"start": load[0], "end": load[1]},
        },
        "machine": machine_info(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4, help="simulated SuperNodes (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per run (default 5)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per run (default 1)")
    p.add_argument("--experiment", default="quick", help="configs/experiment/<name>.yaml")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--verbose", action="store_true", help="keep Flower's INFO log")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.rounds < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--nodes, --rounds and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = compose_cfg(args.experiment, args.nodes)
    # ABBA: baseline, ours, ours, baseline, ... so drift weighs on both sides alike
    pairs = [SIDES if i % 2 == 0 else SIDES[::-1] for i in range(args.repeats)]
    order = [side for pair in pairs for side in pair]
    runs: dict[str, list[list[RoundSample]]] = {side: [] for side in SIDES}
    load_start, t0 = loadavg(), time.perf_counter()
    for side in order:
        runs[side].append(run_side(side, cfg, args.nodes, args.warmup + args.rounds))
    wall_s = time.perf_counter() - t0
    result = summarize(args, runs, order, wall_s, (load_start, loadavg()))
    return emit(result, args.out)


if __name__ == "__main__":
    # Run through the importable module so Ray pickles the apps by reference to it.
    from benchmarks.round_overhead import main as _main

    _main()
