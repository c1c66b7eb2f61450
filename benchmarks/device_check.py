"""One prepared GPU check: every figure of issue 16 in one run, one JSON file.

``bash benchmarks/device_check.sh [--out runs/bench/device_check.json] [--parts ...]``
(the script bounds the run to 8 minutes; this module also keeps its own deadline and
skips what no longer fits, saying so in the JSON).

Parts, each measured side by side on the same machine, same data, same settings:

* ``node``: a node's local training (``train_local``, ``train.batch_size``) in
  samples/s on the GPU (bf16 autocast, split resident on the GPU) vs the CPU with one
  thread (what a simulated node gets, ``simulation.cpus_per_node=1``) and with every
  core; on the default model (``model.dim=64``) and a 10x wider one (``dim=640``).  Each
  side also reports the test accuracy after the same epochs from the same initial
  weights: the two paths should agree in expectation (bf16 rounds differently).
* ``simulation``: a 100-node federation under Flower's simulation engine, every node
  trained every round; seconds per round with nodes on the CPU (one core each) vs
  nodes sharing the GPU (``simulation.gpus_per_node``, as many at once as on the CPU).
* ``topk``: exact cosine top-1 of 1M queries among 1M rows (d=128) with the chunked
  torch path on the GPU (``binding.device=cuda``) vs faiss-cpu ``IndexFlatIP`` on every
  core at 100k x 100k, scaled by 100 (exact search is quadratic); top-1 agreement of
  the GPU result with faiss on a sample of queries.
* ``llm``: one LoRA + prefix-sensor-token training step of a random-init ~1B Llama in
  bf16 (:func:`benchmarks.llm_step.gpu_figures`): tokens/s, MFU, peak memory.

Without a CUDA GPU it stops at once with one line on stderr and exit status 3, before
importing anything heavy, and writes nothing.  Exit status 1: a part failed (its error
is in the JSON, the other parts' figures too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

try:
    import torch
except ImportError as e:  # the wrong interpreter: say which, in one line
    print(f"device_check: {sys.executable} cannot import torch ({e}); set PYTHON", file=sys.stderr)
    sys.exit(2)

PARTS = ("topk", "node", "llm", "simulation")
NO_GPU_EXIT = 3
# the accelerator every "gpu" side runs on; --smoke-on-cpu swaps in the CPU to try the
# code paths on a machine without a GPU (timings then mean nothing; the JSON says so)
GPU = "cuda"


def require_gpu() -> None:
    """Exit with one clear line (status 3) unless torch sees a CUDA GPU."""
    if torch.cuda.is_available():
        return
    build = torch.version.cuda or "none (a CPU-only build)"
    print(
        f"device_check: no CUDA GPU visible to torch {torch.__version__} (CUDA {build}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
        "this check needs one GPU; nothing was written",
        file=sys.stderr,
    )
    sys.exit(NO_GPU_EXIT)


def usable_cores() -> int:
    """Cores this process may run on (not the host's count inside a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- node


def node_cfg(dim: int, num_train: int) -> dict:
    from fed_iotlm.settings import compose

    return compose(
        [
            f"model.dim={dim}",
            f"data.num_train={num_train}",
            "data.num_test=1000",
            "mlflow.enabled=false",
        ]
    )


def time_training(cfg: dict, device: str, threads: int, samples: int, epochs: int) -> dict:
    """samples/s of ``train_local`` on the first ``samples`` rows of the pooled training
    split (all modalities), and the test accuracy the trained model then reaches."""
    import numpy as np

    from fed_iotlm.data.federation import build_layout
    from fed_iotlm.data.preprocess import standardize_own
    from fed_iotlm.experiment import model_spec, train_config
    from fed_iotlm.models.device import Placement
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.models.training import (
        SplitTensors,
        TrainConfig,
        evaluate,
        mean_accuracy,
        train_local,
    )

    torch.set_num_threads(threads)
    place = Placement(torch.device(device))
    layout = build_layout(cfg)
    pooled = standardize_own(layout.dataset.train)
    rows = np.arange(min(samples, len(next(iter(pooled.y.values())))))
    train = SplitTensors.from_split(pooled.subset(rows)).placed(place)
    few = SplitTensors.from_split(pooled.subset(rows[:64])).placed(place)
    test = SplitTensors.from_split(standardize_own(layout.dataset.test)).placed(place)
    tcfg: TrainConfig = train_config(cfg)
    torch.manual_seed(int(cfg["seed"]))
    warm = place.model(MultisensoryModel(model_spec(cfg)))
    train_local(warm, few, replace(tcfg, epochs=1, steps=None), seed=1)  # warm-up
    torch.manual_seed(int(cfg["seed"]))  # the same initial weights on every side
    model = place.model(MultisensoryModel(model_spec(cfg)))
    _sync()
    t0 = time.perf_counter()
    stats = train_local(model, train, replace(tcfg, epochs=epochs, steps=None), seed=2)
    _sync()
    dt = time.perf_counter() - t0
    return {
        "device": device,
        "threads": threads,
        "samples": int(stats["num_labelled"]),
        "epochs": epochs,
        "samples_per_s": round(stats["num_labelled"] * epochs / dt, 1),
        "seconds": round(dt, 3),
        "train_loss": round(stats["train_loss"], 4),
        "test_accuracy": round(mean_accuracy(evaluate(model, test)), 4),
    }


def node_part(quick: bool) -> dict:
    """Rates on a subset sized so the slow side (one CPU thread) takes seconds; then the
    default model trained on the whole split on each device, to compare accuracies."""
    out: dict = {"models": {}}
    cores = usable_cores()
    sizes = (("default", 64, 1024, 5), ("wide_10x", 640, 128, 20))
    for label, dim, samples, gpu_epochs in sizes:
        cfg = node_cfg(dim, 4000)
        out["batch_size"] = int(cfg["train"]["batch_size"])
        samples = samples // 8 if quick else samples
        gpu = time_training(cfg, GPU, cores, samples, gpu_epochs)
        one = time_training(cfg, "cpu", 1, samples, 1)
        every = time_training(cfg, "cpu", cores, samples, 1)
        out["models"][label] = {
            "model_dim": dim,
            "gpu": gpu,
            "cpu_1_thread": one,
            "cpu_all_threads": every,
            "ratio_gpu_vs_cpu_1_thread": round(gpu["samples_per_s"] / one["samples_per_s"], 2),
            "ratio_gpu_vs_cpu_all_threads": round(gpu["samples_per_s"] / every["samples_per_s"], 2),
        }
    cfg = node_cfg(64, 4000)
    epochs, whole = int(cfg["train"]["epochs"]), 256 if quick else 4000
    out["same_training_default_model"] = {  # whole split, train.epochs, same init and seed
        "gpu": time_training(cfg, GPU, cores, whole, epochs),
        "cpu_all_threads": time_training(cfg, "cpu", cores, whole, epochs),
    }
    torch.set_num_threads(cores)
    return out


# ----------------------------------------------------------------------- simulation


def simulation_cfg(nodes: int, per_node: int, device: str, gpus_per_node: float) -> dict:
    from fed_iotlm.settings import compose

    return compose(
        [
            "experiment=quick",
            f"partition.num_nodes={nodes}",
            "partition.plan=null",
            "partition.missing_rate=0.4",
            f"data.num_train={per_node * nodes}",
            f"data.num_test={2 * nodes}",
            "train.epochs=1",
            "method=federated",
            "strategy=fedavg",
            "strategy.fraction_train=1.0",
            f"strategy.min_nodes={nodes}",
            "mlflow.enabled=false",
            f"train.device={device}",
            f"simulation.gpus_per_node={gpus_per_node}",
        ]
    )


def run_simulation_side(cfg: dict, nodes: int, rounds: int, warmup: int) -> dict:
    """One simulation of the project's ClientApp and strategy; per-round times."""
    from flwr.simulation import run_simulation

    from benchmarks.scaling import Point, make_server_app, summarize_run, train_timing_mod
    from benchmarks.scaling import RunResult as Result
    from clients.app import make_client_app
    from simulations.ray_cluster import backend_config, ray_settings

    point = Point(nodes, nodes)
    sink: list = []
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app("ours", cfg, point, warmup + rounds, False, False, sink),
        client_app=make_client_app(cfg, mods=[train_timing_mod]),
        num_supernodes=nodes,
        backend_name="ray",
        backend_config=backend_config(ray_settings(cfg["simulation"])),
        verbose_logging=False,
    )
    wall = time.perf_counter() - t0
    if not sink:
        raise RuntimeError("the ServerApp did not finish; see the log")
    samples, _, _ = sink[0]
    bad = [s.server_round for s in samples if s.errors or s.replies != nodes]
    if len(samples) != warmup + rounds or bad:
        raise RuntimeError(f"rounds {bad} incomplete ({len(samples)} run)")
    return summarize_run(Result(samples, None, None, wall), warmup, point)


def simulation_part(quick: bool) -> dict:
    nodes, per_node = (10, 50) if quick else (100, 200)
    rounds, warmup = 2, 1
    at_once = usable_cores()  # one core per node on both sides
    share = round(1.0 / at_once, 4)
    cpu = run_simulation_side(simulation_cfg(nodes, per_node, "cpu", 0), nodes, rounds, warmup)
    gpu_cfg = simulation_cfg(nodes, per_node, GPU, share if GPU == "cuda" else 0)
    gpu = run_simulation_side(gpu_cfg, nodes, rounds, warmup)
    return {
        "nodes": nodes,
        "samples_per_node": per_node,
        "nodes_at_once": at_once,
        "gpus_per_node": share,
        "cpu_nodes_s_per_round": cpu["s_per_round"],
        "gpu_nodes_s_per_round": gpu["s_per_round"],
        "ratio_cpu_vs_gpu": round(cpu["s_per_round"] / gpu["s_per_round"], 2),
        "runs": {"cpu": cpu, "gpu": gpu},
    }


# ----------------------------------------------------------------------------- topk


def topk_part(quick: bool) -> dict:
    import faiss
    import numpy as np

    from fed_iotlm.binding.index import SearchConfig, normalize, top_k, torch_top_k

    n_gpu, n_cpu, d = (20_000, 5_000, 128) if quick else (1_000_000, 100_000, 128)
    rng = np.random.default_rng(0)
    db = normalize(rng.standard_normal((n_gpu, d), dtype=np.float32))
    q = normalize(rng.standard_normal((n_gpu, d), dtype=np.float32))
    cfg = SearchConfig(device=GPU, memory_budget_bytes=4 * 2**30)
    torch_top_k(q[:1024], db[:4096], 1, cfg)  # CUDA context, cuBLAS handles
    _sync()
    t0 = time.perf_counter()
    _, ids = torch_top_k(q, db, 1, cfg)  # host arrays in, host arrays out
    _sync()
    gpu_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(usable_cores())
    t0 = time.perf_counter()
    top_k(q[:n_cpu], db[:n_cpu], 1, SearchConfig(exact_limit=n_cpu))
    cpu_s = time.perf_counter() - t0
    scale = (n_gpu / n_cpu) ** 2
    pick = rng.choice(n_gpu, size=1000, replace=False)
    _, exact = top_k(q[pick], db, 1, SearchConfig(exact_limit=n_gpu))
    return {
        "gpu_exact": {"queries": n_gpu, "database": n_gpu, "d": d, "seconds": round(gpu_s, 2)},
        "faiss_cpu_exact": {
            "queries": n_cpu,
            "database": n_cpu,
            "threads": usable_cores(),
            "seconds": round(cpu_s, 2),
            "scaled_to_gpu_size_s": round(cpu_s * scale, 1),
            "scale": scale,
        },
        "ratio_faiss_cpu_scaled_vs_gpu": round(cpu_s * scale / gpu_s, 1),
        "top1_agreement_with_faiss_on_1000_queries": float(np.mean(exact[:, 0] == ids[pick, 0])),
        "memory_budget_bytes": cfg.memory_budget_bytes,
    }


# ------------------------------------------------------------------------------ llm


def llm_part(quick: bool) -> dict:
    from benchmarks.llm_step import gpu_figures

    if GPU != "cuda":
        return {"skipped": "--smoke-on-cpu: a ~1B model in bf16 needs the GPU"}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = gpu_figures(repeats=3 if quick else 10)
    if not isinstance(out, dict):
        raise RuntimeError(out)
    out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench/device_check.json"))
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    p.add_argument("--deadline-s", type=float, default=450.0, help="skip parts past it (450)")
    p.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    p.add_argument(
        "--smoke-on-cpu", action="store_true",
        help="run the 'gpu' sides on the CPU to try the code paths (no figure means anything)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.part_list = [x for x in args.parts.split(",") if x]
    unknown = [x for x in args.part_list if x not in PARTS]
    if unknown or not args.part_list:
        p.error(f"--parts: unknown {unknown}; expected any of {','.join(PARTS)}")
    return args


# rough seconds each part needs on an H200-class machine, to skip what cannot finish
BUDGET_S = {"topk": 60, "node": 90, "llm": 60, "simulation": 200}


def main(argv: list[str] | None = None) -> int:
    global GPU
    args = parse_args(argv)
    if args.smoke_on_cpu:
        GPU = "cpu"
    else:
        require_gpu()
    from benchmarks.machine import emit, loadavg, machine_info

    start = time.perf_counter()
    result: dict = {
        "benchmark": "device_check",
        "smoke_on_cpu": args.smoke_on_cpu,
        "gpu": torch.cuda.get_device_name() if GPU == "cuda" else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if GPU == "cuda"
        else None,
        "machine": machine_info(torch=torch.__version__, cuda=str(torch.version.cuda)),
        "loadavg_start": loadavg(),
        "quick": args.quick,
        "parts": {},
        "part_seconds": {},
    }
    runners = {"topk": topk_part, "node": node_part, "llm": llm_part, "simulation": simulation_part}
    failed = False
    for part in args.part_list:
        left = args.deadline_s - (time.perf_counter() - start)
        if left < BUDGET_S[part]:
            result["parts"][part] = {
                "skipped": f"{left:.0f} s left of --deadline-s, needs ~{BUDGET_S[part]}"
            }
            continue
        t0 = time.perf_counter()
        try:
            result["parts"][part] = runners[part](args.quick)
        except Exception as e:  # noqa: BLE001  (one part failing must not lose the others)
            failed = True
            result["parts"][part] = {"error": f"{type(e).__name__}: {e}"}
        result["part_seconds"][part] = round(time.perf_counter() - t0, 1)
        print(f"# device_check {part}: {result['part_seconds'][part]} s", file=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["loadavg_end"] = loadavg()
    emit(result, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    # Run through the importable module so Ray pickles the apps by reference to it.
    from benchmarks.device_check import main as _main

    sys.exit(_main())
