"""The central stage end to end: bundle → sensor features → instructions → tune each
conditioning → evaluate by generation beside the head and a text-only prompt → results.

Called by ``fed-iotlm tune`` and by the main pipeline after the federation.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.data.federation import build_layout
from fed_iotlm.data.preprocess import standardize_own
from fed_iotlm.federation.bundle import load_bundle
from fed_iotlm.tracking import console

from .evaluation import generation_accuracy, head_accuracy, text_description, with_options
from .features import SensorFeatures, sensor_features
from .instructions import build_instructions, load_jsonl, task_examples
from .loading import load_lm
from .sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from .sequences import SequenceBuilder
from .tuning import TuneSettings, tune, world


def _concat(a: SensorFeatures, b: SensorFeatures) -> SensorFeatures:
    """One feature table for train rows then test rows (few-shot prompts mix both)."""
    return SensorFeatures(
        a.names,
        {m: torch.cat([a.feats[m], b.feats[m]]) for m in a.names},
        torch.cat([a.present, b.present]),
        {t: torch.cat([a.head_pred[t], b.head_pred[t]]) for t in a.head_pred},
    )


def lora_settings(lc: dict) -> LoraSettings:
    lo = lc["lora"]
    return LoraSettings(
        int(lo["r"]),
        int(lo["alpha"]),
        float(lo["dropout"]),
        tuple(lo["target_modules"]),
        lo.get("top_layers", "auto"),
    )


def tune_settings(lc: dict, seed: int) -> TuneSettings:
    keys = TuneSettings.__dataclass_fields__
    return TuneSettings(**{k: lc[k] for k in keys if k in lc and k != "seed"}, seed=seed)


def resolve_device(name: str) -> torch.device:
    """``auto``: this rank's GPU when there is one (``torchrun`` sets LOCAL_RANK), else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> None:
    """Data parallel under ``torchrun``: NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist

    if world()[1] > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)


def run_stage(cfg: dict, out_dir: Path) -> Path:
    """Tune and evaluate every configured conditioning; write results.json; return its
    path.  Under ``torchrun`` every rank tunes; rank 0 evaluates and writes."""
    lc, seed = cfg["llm"], int(cfg["seed"])
    device = resolve_device(str(lc.get("device", "auto")))
    _init_distributed(device)
    rank = world()[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not lc.get("bundle"):
        raise ValueError(
            "llm.bundle: give the model bundle of a federated run (its output_dir/bundle)"
        )
    encoder, bundle_meta = load_bundle(Path(lc["bundle"]))
    ds = build_layout(cfg).dataset
    train, test = standardize_own(ds.train), standardize_own(ds.test)
    f_train = sensor_features(encoder, train, use_fused=bool(lc["use_fused"]))
    f_test = sensor_features(encoder, test, use_fused=bool(lc["use_fused"]))
    feats, offset = _concat(f_train, f_test).to(device), len(train)
    tasks = [t for t in ds.meta.tasks if t != (lc["fewshot"] or {}).get("task")]
    rng = np.random.default_rng(seed)
    train_idx = np.sort(rng.permutation(len(train))[: int(lc["train_samples"])])
    examples = build_instructions(
        ds.meta, train, templates="train", tasks=tasks, per_sample=int(lc["per_sample"]),
        seed=seed, indices=train_idx,
    )  # fmt: skip
    if lc.get("instructions_jsonl"):
        examples += load_jsonl(Path(lc["instructions_jsonl"]), len(train))
    eval_idx = np.sort(rng.permutation(len(test))[: int(lc["eval_samples"])])
    evals = {
        t: [replace(ex, index=ex.index + offset) for ex in task_examples(ds.meta, test, t, templates="heldout", seed=seed, indices=eval_idx)]
        for t in ds.meta.tasks
    }  # fmt: skip
    tuned_evals = [ex for t in tasks for ex in evals[t]]
    console.print(
        f"[bold]IoT-LM stage[/bold]: {len(examples)} instructions from {len(train_idx)} samples, "
        f"{len(tuned_evals)} held-out-template questions, LM {lc['model']}"
    )
    base = load_lm(lc["model"])
    gen = {"batch_size": int(lc["eval_batch"]), "max_new_tokens": int(lc["max_new_tokens"])}
    results: dict = {"conditioning": {}, "lm": lc["model"], "bundle": bundle_meta.get("meta", {})}
    history: list[dict] = []
    model = builder = None
    for kind in lc["conditioning"]:
        torch.manual_seed(seed)
        cond = ConditioningSettings(
            kind=kind,
            tokens_per_modality=int(lc["tokens_per_modality"]),
            adapter_layers=int(lc["adapter_layers"]),
            queries_per_task=int(lc["queries_per_task"]),
            names=feats.names,
            tasks=tasks,
            feature_dim=feats.dim,
        )
        lm = replace(base, model=copy.deepcopy(base.model))
        model = SensorLM(lm, lora_settings(lc), cond)
        builder = SequenceBuilder(
            base.tokenizer, feats.names, tasks, cond.tokens_per_modality, kind
        )
        t1 = time.time()
        hist = tune(
            model, builder, examples, feats, tune_settings(lc, seed), out_dir / f"checkpoint-{kind}",
            resume=bool(lc["resume"]), device=device, log=lambda s, loss, k=kind: console.print(f"  {k} step {s}: loss {loss:.3f}"),
        )  # fmt: skip
        tune_s = time.time() - t1
        if rank != 0:
            continue
        history += [{"round": h["step"], "loss": h["loss"], "conditioning": kind} for h in hist]
        t2 = time.time()
        report = generation_accuracy(model, builder, feats, tuned_evals, ds.meta, **gen)
        report |= {
            "tune_s": round(tune_s, 1),
            "eval_s": round(time.time() - t2, 1),
            "steps": len(hist) and hist[-1]["step"],
        }
        fs = (lc["fewshot"] or {}).get("task")
        if fs and kind == "prefix":
            report["fewshot"] = _fewshot(
                model, builder, feats, ds.meta, train, evals[fs], int(lc["fewshot"]["k"]), seed, gen
            )
        results["conditioning"][kind] = report
        console.print(
            f"  {kind}: generation accuracy {report['accuracy']:.3f} {report['by_task']} (tuned {tune_s:.0f}s)"
        )
    path = out_dir / "results.json"
    if rank != 0:
        return path
    text_builder = SequenceBuilder(
        base.tokenizer, feats.names, tasks, 1, "text", describe=text_description(test, offset)
    )
    if model is not None:
        results["text_only"] = generation_accuracy(
            model,
            text_builder,
            feats,
            with_options(tuned_evals, ds.meta),
            ds.meta,
            sensors=False,
            **gen,
        )
    results["head"] = head_accuracy(feats, tuned_evals)
    best = max(results["conditioning"].items(), key=lambda kv: kv[1]["accuracy"])
    doc = {
        "method": "iotlm",
        "dataset": ds.meta.name,
        "seed": seed,
        "num_nodes": len(bundle_meta.get("meta", {}).get("plan", {}) or {}),
        "rounds": int(lc["steps"]),
        "plan": {},
        "test": {"accuracy": best[1]["accuracy"], "accuracy_by_modality": {}, "accuracy_by_node": {},
                 "by_task": {t: {"accuracy": a} for t, a in best[1]["by_task"].items()}},
        "history": history,
        "comm": {"bytes_up_per_node_round": 0, "bytes_down_per_node_round": 0},
        "wall_s": round(time.time() - t0, 1),
        "llm": results | {"best": best[0]},
        "config": cfg,
    }  # fmt: skip
    atomic_write_text(path, json.dumps(doc, indent=2))
    _log_mlflow(cfg, doc, path)
    _print_summary(results)
    return path


def _fewshot(model, builder, feats, meta, train, evals, k: int, seed: int, gen: dict) -> dict:
    """Task held out from tuning: k answered in-context examples (with their own sensor
    tokens) before each question, against the same questions with no examples."""
    task = evals[0].task
    pool = task_examples(meta, train, task, templates="train", seed=seed)
    rng = np.random.default_rng(seed + 1)
    pick = lambda ex: [pool[j] for j in rng.choice(len(pool), k, replace=False)]  # noqa: E731
    return {
        "task": task,
        "k": k,
        "zero_shot": generation_accuracy(model, builder, feats, evals, meta, **gen)["accuracy"],
        "few_shot": generation_accuracy(model, builder, feats, evals, meta, shots=pick, **gen)[
            "accuracy"
        ],
    }


def _log_mlflow(cfg: dict, doc: dict, path: Path) -> None:
    m = cfg.get("mlflow", {})
    if not m.get("enabled", True):
        return
    import mlflow

    from fed_iotlm.settings import flatten

    mlflow.set_tracking_uri(m.get("tracking_uri", "sqlite:///mlflow.db"))
    mlflow.set_experiment(m.get("experiment", "fed-iotlm") + "-llm")
    with mlflow.start_run(run_name=f"iotlm-{doc['dataset']}-seed{doc['seed']}"):
        mlflow.log_params({k: str(v)[:500] for k, v in flatten({"llm": cfg["llm"]}).items()})
        for h in doc["history"]:
            mlflow.log_metric(f"loss.{h['conditioning']}", h["loss"], step=h["round"])
        llm = doc["llm"]
        metrics = {f"gen_accuracy.{k}": r["accuracy"] for k, r in llm["conditioning"].items()}
        metrics["head_accuracy"] = llm["head"]["accuracy"]
        if "text_only" in llm:
            metrics["text_only_accuracy"] = llm["text_only"]["accuracy"]
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(path))


def _print_summary(results: dict) -> None:
    from rich.table import Table

    table = Table(title="IoT-LM stage: accuracy on held-out question templates")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("per task")
    rows = [(f"LM + {k}", r) for k, r in results["conditioning"].items()]
    rows += [("LM, text-only prompt", results["text_only"])] if "text_only" in results else []
    rows += [("federated classifier head", results["head"])]
    for name, r in rows:
        per = ", ".join(f"{t} {a:.3f}" for t, a in r["by_task"].items())
        table.add_row(name, f"{r['accuracy']:.3f}", per)
    console.print(table)
