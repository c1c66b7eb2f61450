"""Server aggregation: throughput and peak memory of OUR group-wise mean vs plain numpy.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.aggregation [--quick] [--out FILE]``

What is compared
----------------
Every node sends the full model (all groups, float32; per-group counts 10..16), drawn
from a pool of ``--pool`` distinct random states so that generating updates costs
nothing inside the timed window and the arrays do not sit in cache from one node to
the next (the pool is larger than the last-level cache for every model but the
default one).  Updates reach the aggregator as a *generator*: one node at a time.

* ``ours``: :func:`fed_iotlm.federation.aggregation.aggregate_groups` (count-weighted
  mean per group, float32 running sums by BLAS saxpy, holders per group).
* ``numpy_sum``: the plain baseline, ``np.add(acc[k], v, out=acc[k])`` for every key
  of every node: an unweighted float32 sum, the least work any streaming mean can do.
* ``numpy_weighted64``: ``acc64[k] += v * n`` per key, a float64 weighted sum without
  bookkeeping (what ``ours`` did before it accumulated with saxpy).
* ``numpy_stacked``: ``np.sum(stack, axis=0)`` over one ``(nodes, params)`` float32
  array: the textbook "stack then reduce", O(nodes x model) memory by construction
  (skipped where the stack would exceed ``--stack-limit-gib``).
* ``strategy`` (``--strategy-nodes``): ``ModalityAwareFedAvg.aggregate_train`` on
  Flower reply Messages, i.e. what the server really runs per round: deserialise each
  ArrayRecord, screen every update (keys, dtypes, NaN/Inf, update norm), aggregate.
* ``numpy_sum_replies``: the plain sum again, over the reply Messages' own bytes (each
  array wrapped in place and added): the same distinct memory the real path reads, where
  ``numpy_sum`` cycles a pool of 4 states that stays in cache; ``strategy_vs_replies`` is
  the real path's ratio against it.
* ``robust`` (``--robust-nodes``): median, trimmed mean and Krum of
  :mod:`fed_iotlm.federation.robust`; these stack each group's holders, so their
  memory is O(holders x group) by design.

Throughput is bytes of updates consumed per second (nodes x update bytes / seconds).
``ratio`` is seconds of a side / seconds of ``numpy_sum`` measured in the same command,
sides interleaved (rotating order each repeat), median of ``--repeats``.

Peak memory is measured in a separate, untimed pass with ``tracemalloc`` (numpy reports
its allocations to it): the high-water mark of memory allocated *during* the call.  In
that pass the generator hands out a fresh copy of each node's arrays (as deserialising
a reply would) and drops it afterwards, so an aggregator that kept updates alive would
grow with the node count.  ``per_node_growth_bytes`` is the slope of the peak between
the smallest and largest node counts: about 0 for a streaming aggregator, the update
size for the stacked baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from benchmarks.machine import emit, loadavg, machine_info
from fed_iotlm.federation.aggregation import NodeUpdate, aggregate_groups
from fed_iotlm.federation.groups import group_of
from fed_iotlm.federation.robust import RobustConfig, aggregate_robust

State = dict[str, np.ndarray]


# ---------------------------------------------------------------------------- inputs


def model_state(dim: int) -> State:
    """Keys and shapes of the project's MultisensoryModel at embedding width ``dim``
    (64 = the default experiment's model), as float32 zeros."""
    import torch

    from fed_iotlm.experiment import model_spec
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.settings import compose

    spec = model_spec(compose([f"model.dim={dim}"]))
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = MultisensoryModel(spec)
    return {k: np.zeros(tuple(v.shape), np.float32) for k, v in model.state_dict().items()}


def make_pool(state: State, size: int, seed: int = 0) -> list[State]:
    rng = np.random.default_rng(seed)
    return [
        {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in state.items()}
        for _ in range(size)
    ]


def node_updates(pool: list[State], nodes: int, fresh: bool = False) -> Iterator[NodeUpdate]:
    """One full update per node, lazily; ``fresh`` copies the arrays (a new allocation
    per node, released when the consumer lets go of it)."""
    groups = sorted({group_of(k) for k in pool[0]})
    for i in range(nodes):
        arrays = pool[i % len(pool)]
        if fresh:
            arrays = {k: v.copy() for k, v in arrays.items()}
        yield NodeUpdate(str(i), arrays, {g: float(10 + i % 7) for g in groups})


# ---------------------------------------------------------------------------- sides


def run_ours(current: State, pool: list[State], nodes: int, fresh: bool) -> object:
    return aggregate_groups(current, node_updates(pool, nodes, fresh)).state


def run_numpy_sum(current: State, pool: list[State], nodes: int, fresh: bool) -> object:
    acc = {k: np.zeros_like(v) for k, v in current.items()}
    for upd in node_updates(pool, nodes, fresh):
        for k, v in upd.arrays.items():
            np.add(acc[k], v, out=acc[k])
    return acc


def run_numpy_weighted64(current: State, pool: list[State], nodes: int, fresh: bool) -> object:
    acc = {k: np.zeros(v.shape, np.float64) for k, v in current.items()}
    total = 0.0
    for upd in node_updates(pool, nodes, fresh):
        n = next(iter(upd.counts.values()))
        total += n
        for k, v in upd.arrays.items():
            acc[k] += v * n
    return {k: (a / total).astype(np.float32) for k, a in acc.items()}


def build_stack(pool: list[State], nodes: int) -> np.ndarray:
    """The (nodes, params) float32 stack the textbook baseline reduces."""
    flat = [np.concatenate([v.ravel() for v in s.values()]) for s in pool]
    stack = np.empty((nodes, flat[0].size), np.float32)
    for i in range(nodes):
        stack[i] = flat[i % len(flat)]
    return stack


def robust_side(rule: str) -> Callable[[State, list[State], int, bool], object]:
    cfg = RobustConfig(rule=rule)

    def run(current: State, pool: list[State], nodes: int, fresh: bool) -> object:
        # a robust rule needs every holder at once: the list IS its working set
        return aggregate_robust(current, list(node_updates(pool, nodes, fresh)), cfg).state

    return run


SIDES: dict[str, Callable[[State, list[State], int, bool], object]] = {
    "ours": run_ours,
    "numpy_sum": run_numpy_sum,
    "numpy_weighted64": run_numpy_weighted64,
}


# ---------------------------------------------------------------------------- measuring


# wall-clock by default; ``--clock cpu``: this process's CPU time (every thread of it),
# which a busy shared machine disturbs far less than wall time (other work preempting
# this process is not counted; cache and memory contention still are)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t0 = clock()
    fn()
    return clock() - t0


def traced_peak(fn: Callable[[], object]) -> int:
    """Bytes allocated at the high-water mark of ``fn`` (allocations it made; inputs
    that existed before are not counted)."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def nbytes(state: State) -> int:
    return int(sum(v.nbytes for v in state.values()))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of every repeat per side; the order rotates each repeat so that drift hits
    all sides alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(timed(fns[n]))
    return times


def side_report(times: list[float], base: list[float], consumed: int, peak: int | None) -> dict:
    """Median figures, plus the fastest run's: on a shared machine the minimum is the
    run least disturbed by other work, so ``ratio_best`` is the steadier ratio."""
    seconds, base_s = statistics.median(times), statistics.median(base)
    out = {
        "seconds": round(seconds, 5),
        "gb_per_s": round(consumed / seconds / 1e9, 3),
        "ratio": round(seconds / base_s, 3),
        "ratio_best": round(min(times) / min(base), 3),
    }
    if peak is not None:
        out["peak_mb"] = round(peak / 1e6, 2)
    return out


def bench_mean(current: State, pool: list[State], nodes: int, args: argparse.Namespace) -> dict:
    """ours vs numpy at one node count: time, GB/s, ratio, traced peak."""
    size = nbytes(current)
    consumed = size * nodes
    fns: dict[str, Callable[[], object]] = {
        n: (lambda f=f: f(current, pool, nodes, False)) for n, f in SIDES.items()
    }
    stack_ok = consumed <= args.stack_limit_gib * 2**30
    stack = build_stack(pool, nodes) if stack_ok else None
    if stack is not None:
        fns["numpy_stacked"] = lambda: np.sum(stack, axis=0)
    seconds = interleaved(fns, args.repeats)
    peaks = {n: traced_peak(lambda f=f: f(current, pool, nodes, True)) for n, f in SIDES.items()}
    out = {
        n: side_report(s, seconds["numpy_sum"], consumed, peaks.get(n)) for n, s in seconds.items()
    }
    if stack is not None:
        del stack
        # its memory: building the (nodes, params) stack plus the reduction
        out["numpy_stacked"]["peak_mb"] = round(
            traced_peak(lambda: np.sum(build_stack(pool, nodes), axis=0)) / 1e6, 2
        )
    else:
        out["numpy_stacked"] = {"skipped": f"stack of {consumed / 2**30:.1f} GiB > limit"}
    return out


def bench_robust(current: State, pool: list[State], nodes: int, args: argparse.Namespace) -> dict:
    consumed = nbytes(current) * nodes
    fns = {"numpy_sum": lambda: run_numpy_sum(current, pool, nodes, False)}
    for rule in ("median", "trimmed_mean", "krum"):
        fns[rule] = lambda r=rule: robust_side(r)(current, pool, nodes, False)
    seconds = interleaved(fns, max(1, args.repeats // 2))
    out = {}
    for name, s in seconds.items():
        peak = None if name == "numpy_sum" else traced_peak(fns[name])
        out[name] = side_report(s, seconds["numpy_sum"], consumed, peak)
    return out


def bench_strategy(current: State, pool: list[State], nodes: int, args: argparse.Namespace) -> dict:
    """``ModalityAwareFedAvg.aggregate_train`` on reply Messages vs numpy_sum on the arrays."""
    from fed_iotlm.federation.strategy import build_strategy

    replies = [reply_message(upd) for upd in node_updates(pool, nodes)]
    strategy = build_strategy("federated", {"name": "fedavg"}, num_nodes=nodes)

    def ours() -> object:
        strategy._current = current  # what configure_train sets from the global model
        return strategy.aggregate_train(1, replies)

    consumed = nbytes(current) * nodes
    fns = {
        "numpy_sum": lambda: run_numpy_sum(current, pool, nodes, False),
        "numpy_sum_replies": lambda: sum_reply_buffers(replies),
        "strategy": ours,
    }
    seconds = interleaved(fns, args.repeats)
    peak = traced_peak(ours)
    return {
        "numpy_sum": side_report(seconds["numpy_sum"], seconds["numpy_sum"], consumed, None),
        "numpy_sum_replies": side_report(
            seconds["numpy_sum_replies"], seconds["numpy_sum"], consumed, None
        ),
        "strategy": side_report(seconds["strategy"], seconds["numpy_sum"], consumed, peak),
        # the same path against a plain sum that reads the same bytes (the replies)
        "strategy_vs_replies": side_report(
            seconds["strategy"], seconds["numpy_sum_replies"], consumed, None
        ),
        "replies_mb": round(consumed / 1e6, 2),
    }


def sum_reply_buffers(replies: list) -> dict[str, np.ndarray]:
    """The plain float32 sum of every array in the reply Messages themselves, each
    wrapped in place (``np.frombuffer`` past its ``.npy`` header) and added with
    ``np.add``: the least any aggregator of these replies must do, reading the same
    distinct bytes the real path reads (``numpy_sum`` cycles a cache-resident pool)."""
    acc: dict[str, np.ndarray] = {}
    for msg in replies:
        for key, arr in msg.content["arrays"].items():
            if key.startswith("__"):  # the manifest, not values
                continue
            data = arr.data
            header = len(data) - int(np.prod(arr.shape)) * 4
            values = np.frombuffer(data, np.float32, offset=header)
            if key in acc:
                np.add(acc[key], values, out=acc[key])
            else:
                acc[key] = values.copy()
    return acc


def reply_message(upd: NodeUpdate):
    """A train reply as a node sends it (arrays + count.<group> metrics)."""
    from fed_iotlm.federation.records import node_reply

    return node_reply(int(upd.node), upd.arrays, upd.counts)


# ---------------------------------------------------------------------------- report


def growth(per_nodes: dict[int, dict], side: str) -> float | None:
    """Slope of the traced peak between the smallest and largest node counts."""
    pts = [(n, r[side]["peak_mb"]) for n, r in per_nodes.items() if "peak_mb" in r.get(side, {})]
    if len(pts) < 2:
        return None
    (n0, p0), (n1, p1) = min(pts), max(pts)
    return round((p1 - p0) * 1e6 / (n1 - n0))


def bench_model(label: str, dim: int, nodes_list: list[int], args: argparse.Namespace) -> dict:
    current = model_state(dim)
    pool = make_pool(current, args.pool)
    params = int(sum(v.size for v in current.values()))
    out: dict = {
        "dim": dim,
        "params": params,
        "keys": len(current),
        "update_mb": round(nbytes(current) / 1e6, 3),
        "mean": {},
    }
    for nodes in nodes_list:
        out["mean"][str(nodes)] = r = bench_mean(current, pool, nodes, args)
        r["loadavg_1m"] = loadavg()
        log(f"{label} nodes={nodes}: " + json.dumps(r))
    per_nodes = {int(n): r for n, r in out["mean"].items()}
    out["per_node_growth_bytes"] = {
        s: growth(per_nodes, s) for s in ("ours", "numpy_sum", "numpy_weighted64", "numpy_stacked")
    }
    if label in args.robust_models:
        out["robust"] = {}
        for nodes in args.robust_nodes:
            if 2 * nbytes(current) * nodes > args.stack_limit_gib * 2**30:  # float64 stacks
                out["robust"][str(nodes)] = {"skipped": "float64 stacks > --stack-limit-gib"}
                continue
            out["robust"][str(nodes)] = r = bench_robust(current, pool, nodes, args)
            log(f"{label} robust nodes={nodes}: " + json.dumps(r))
    if label in args.strategy_models:
        out["strategy"] = {}
        for nodes in args.strategy_nodes:
            out["strategy"][str(nodes)] = r = bench_strategy(current, pool, nodes, args)
            log(f"{label} strategy nodes={nodes}: " + json.dumps(r))
    return out


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of ~20 s")
    p.add_argument("--nodes", type=ints, default=None, help="default model (10,100,1000)")
    p.add_argument("--large-nodes", type=ints, default=None, help="large model (10,100)")
    p.add_argument("--default-dim", type=int, default=64, help="the default model (64)")
    p.add_argument("--large-dim", type=int, default=None, help="large model width (1024: 14M)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 3)")
    p.add_argument("--pool", type=int, default=4, help="distinct node states cycled (4)")
    p.add_argument("--stack-limit-gib", type=float, default=4.0, help="numpy_stacked cap")
    p.add_argument("--robust-nodes", type=ints, default=None, help="default 10,100")
    p.add_argument("--strategy-nodes", type=ints, default=None, help="default 10,100,1000")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall (default) | cpu")
    args = p.parse_args(argv)
    q = args.quick
    args.nodes = args.nodes or ([10, 100] if q else [10, 100, 1000])
    args.large_nodes = args.large_nodes or ([10] if q else [10, 100])
    args.large_dim = args.large_dim or (256 if q else 1024)
    args.repeats = args.repeats or (2 if q else 3)
    args.robust_nodes = args.robust_nodes or ([10] if q else [10, 100])
    args.strategy_nodes = args.strategy_nodes or ([10] if q else [10, 100, 1000])
    args.robust_models = ("default", "large")
    args.strategy_models = ("default",)
    return args


def main(argv: list[str] | None = None) -> dict:
    global clock
    args = parse_args(argv)
    clock = CLOCKS[args.clock]
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one INFO line per aggregate_train
    load_start, t0 = loadavg(), time.perf_counter()
    models = {
        "default": (args.default_dim, args.nodes),
        "large": (args.large_dim, args.large_nodes),
    }
    result = {
        "benchmark": "aggregation",
        "models": {label: bench_model(label, d, n, args) for label, (d, n) in models.items()},
        "repeats": args.repeats,
        "clock": args.clock,
        "pool": args.pool,
        "wall_s": round(time.perf_counter() - t0, 1),
        "loadavg_1m": {"start": load_start, "end": loadavg()},
        "machine": machine_info(numpy=np.__version__),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
