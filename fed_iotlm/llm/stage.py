"""The central stage end to end: bundle → the stage's rows (``llm.data``; by default
tokens uploaded by the nodes) → instructions → tune each conditioning (in ``llm.phases``,
with ``llm.task_weights``) and the LoRA-tuned text-only control → choose conditioning and scoring on validation questions → report the
test figures beside the controls (shuffled sensors, majority class, classifier head,
training templates on the same rows) → results.json.

Called by ``fed-iotlm tune`` and by the main pipeline after the federation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.config_schema import block, section
from fed_iotlm.federation.bundle import bundle_standardizer, load_bundle
from fed_iotlm.progress import Bars
from fed_iotlm.protocol import code_version
from fed_iotlm.tracking import console

from .evaluation import (
    head_accuracy,
    majority_accuracy,
    score,
    shuffled_sensors,
)
from .features import SensorFeatures
from .instructions import task_examples
from .loading import load_lm, resolve_dtype
from .phases import ENCODERS_NOTE, caption_examples, check_task_weights, phase_plan
from .question_eval import baselines, score_questions
from .recipe import StageData, stage_data, stage_questions
from .sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from .sequences import SequenceBuilder
from .tuning import TuneSettings, tune, world


def lora_settings(lc: dict) -> LoraSettings:
    lo = section("llm.lora", lc.get("lora"))
    return LoraSettings(
        int(lo["r"]),
        int(lo["alpha"]),
        float(lo["dropout"]),
        tuple(lo["target_modules"]),
        lo["top_layers"],
    )


def tune_settings(lc: dict, seed: int) -> TuneSettings:
    keys = TuneSettings.__dataclass_fields__
    given = {k: lc[k] for k in keys if k in lc and k not in ("seed", "gate_lr")}
    gate_lr = float(section("llm.adapter", lc.get("adapter"))["gate_lr"])
    return TuneSettings(**given, gate_lr=gate_lr, seed=seed)


def conditioning_settings(lc: dict, kind: str, names: list[str], tasks: list[str], dim: int):
    """``llm.*`` as the settings of conditioning ``kind`` (the stage and ``ask`` alike)."""
    ad = section("llm.adapter", lc.get("adapter"))
    sa = section("llm.seed_adapter", lc.get("seed_adapter"))
    return ConditioningSettings(
        kind=kind,
        tokens_per_modality=int(lc["tokens_per_modality"]),
        adapter_layers=int(ad["layers"]),
        queries_per_task=int(ad["queries_per_task"]),
        names=names,
        tasks=tasks,
        feature_dim=dim,
        seed_fusion=str(sa["fusion"]),
        seed_layers=int(sa["layers"]),
        seed_rank=int(sa["rank"]),
        seed_center=bool(sa["center"]),
    )


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


def build_model(
    base,
    lc: dict,
    kind: str,
    feats: SensorFeatures,
    tasks: list[str],
    seed: int,
    classes: dict[str, list[str]] | None = None,
    task_weights: dict[str, float] | None = None,
    titles: dict[str, str] | None = None,
):
    """A SensorLM of conditioning ``kind`` and its sequence builder (which routes each
    question to its task by the task, ``titles`` and ``classes`` names, and weighs each example by
    ``task_weights``).  Every conditioning shares ``base``'s weights (one more named
    LoRA adapter each; no deep copy)."""
    torch.manual_seed(seed)
    cond = conditioning_settings(lc, kind, feats.names, tasks, feats.dim)
    model = SensorLM(base, lora_settings(lc), cond, adapter_name=kind)
    base.model = model.peft  # the next conditioning adds its adapter to the same PeftModel
    builder = SequenceBuilder(
        base.tokenizer, feats.names, tasks, cond.tokens_per_modality, kind, classes=classes,
        task_weights=task_weights, titles=titles,
    )  # fmt: skip
    return model, builder


def tune_in_phases(model, builder, plan, examples, captions, feats, lc, seed, out_dir, kind,
                   device, bars):  # fmt: skip
    """Tune ``model`` through ``plan`` ([(phase, steps)], phases.py): align on
    ``captions`` with LoRA frozen, instruct on ``examples``.  The last phase writes
    ``checkpoint-<kind>`` (what ``ask`` loads), earlier ones ``checkpoint-<kind>-<phase>``;
    the history's steps run on across phases and each row names its phase."""
    history, done = [], 0
    total = sum(n for _, n in plan)
    for i, (phase, steps) in enumerate(plan):
        base = tune_settings(lc, seed)
        settings = replace(
            base,
            steps=steps,
            warmup=phase_warmup(base.warmup, steps, total),
            train_lora=phase != "align",
        )
        last = i == len(plan) - 1
        hist = tune(
            model, builder, captions if phase == "align" else examples, feats, settings,
            out_dir / (f"checkpoint-{kind}" if last else f"checkpoint-{kind}-{phase}"),
            resume=bool(lc["resume"]), device=device,
            log=_step_logger(f"{kind}_{phase}" if len(plan) > 1 else kind, steps, bars),
        )  # fmt: skip
        history += [h | {"step": done + h["step"], "phase": phase} for h in hist]
        done += steps
    return history


def phase_warmup(warmup: int, steps: int, total: int) -> int:
    """A phase's warm-up: the single-phase run's share of its steps (``llm.warmup`` of
    ``llm.steps``), at least one step where there is any, so a short align phase is not
    mostly warm-up (one phase: ``warmup`` itself)."""
    if steps == total:
        return warmup
    if warmup <= 0 or steps <= 0:
        return 0
    return max(1, min(steps, round(warmup * steps / total)))


def step_line(kind: str, step: int, loss: float, eta: float, row: dict) -> str:
    """One tuning log line (read back by :func:`fed_iotlm.progress.parse_line` when a
    study follows the run); the adapter's adds tanh(g) and ‖adapter‖/‖attention‖ per layer."""
    line = f"  {kind} step {step}: loss {loss:.3f} (ETA {eta:.0f}s)"
    if "seed_adapter_ratio" in row:
        fmt = lambda xs: " ".join("-" if x is None else f"{x:.3f}" for x in xs)  # noqa: E731
        line += f"; seed adapter/feed-forward [{fmt(row['seed_adapter_ratio'])}]"
    if "gates_tanh" in row:
        fmt = lambda xs: " ".join("-" if x is None else f"{x:.3f}" for x in xs)  # noqa: E731
        line += f"; tanh(g) per layer [{fmt(row['gates_tanh'])}]"
        line += f", adapter/attention [{fmt(row['adapter_attention_ratio'])}]"
    return line


def _step_logger(kind: str, total: int, bars: Bars):
    """The ``log`` callback of :func:`tune`: the step line, and on a terminal a bar of
    ``total`` steps with the loss and ETA."""
    bar = bars.add(f"{kind} steps", total)

    def log(step: int, loss: float, eta: float, row: dict) -> None:
        console.print(step_line(kind, step, loss, eta, row))
        bars.update(bar, step, eta_s=eta, note=f"loss {loss:.3f}")

    return log


CONTROLS = ("text_lora", "shuffled_sensors", "majority", "head", "train_templates")


def run_stage(cfg: dict, out_dir: Path, data: StageData | None = None) -> Path:
    """Tune every configured conditioning (and the text-only control at the same steps),
    choose conditioning and scoring on validation questions, report test; write
    results.json and return its path.  ``data``: the stage's rows when the caller built
    them (tests); by default they come from ``llm.data``.  Under ``torchrun`` every rank
    tunes; rank 0 evaluates and writes."""
    lc, seed = section("llm", cfg["llm"]), int(cfg["seed"])
    device = resolve_device(str(lc["device"]))
    _init_distributed(device)
    rank = world()[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not lc["bundle"]:
        raise ValueError(
            "llm.bundle: give the model bundle of a federated run (its output_dir/bundle)"
        )
    encoder, bundle_meta = load_bundle(Path(lc["bundle"]))
    scaler = bundle_standardizer(bundle_meta)  # the statistics the encoders trained on
    data = stage_data(cfg, encoder, scaler) if data is None else data
    meta, feats = data.meta, data.feats.to(device)
    fewshot = lc["fewshot"]["task"]
    check_held_out(fewshot, list(meta.tasks), int(lc["fewshot"]["k"]), list(lc["conditioning"]))
    tasks = [t for t in meta.tasks if t != fewshot]
    plan = phase_plan(lc["phases"], lc["phase_steps"], int(lc["steps"]))
    check_task_weights(lc["task_weights"], list(meta.tasks))  # refuse a typo before any tuning
    weights = {t: w for t, w in lc["task_weights"].items() if t in tasks} or None
    qs = stage_questions(data, lc, seed, tasks)
    captions = (
        caption_examples(meta, data.train, qs.fit_rows, tasks)
        if any(p == "align" for p, _ in plan)
        else []
    )
    classes = {t: list(meta.tasks[t].classes) for t in tasks}  # for routing (ask reads it too)
    titles = {t: meta.tasks[t].title for t in tasks}  # what the questions call each task
    val_q = [ex for t in tasks for ex in qs.val[t]]
    test_q = [ex for t in tasks for ex in qs.test[t]]
    scorings = list(lc["scoring"])
    controls = list(lc["controls"])
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        raise ValueError(f"llm.controls: unknown {unknown}; choose from {list(CONTROLS)}")
    console.print(
        f"[bold]IoT-LM stage[/bold] (data: {data.source['data']}): {len(qs.train)} instructions "
        f"from {qs.rows['fit']} samples; {len(val_q)} validation and {len(test_q)} test "
        f"questions (held-out templates); LM {lc['model']}"
    )
    base = load_lm(lc["model"], dtype=resolve_dtype(str(lc["dtype"]), device))
    gen = {"batch_size": int(lc["eval_batch"]), "max_new_tokens": int(lc["max_new_tokens"])}
    reports: dict = {}
    history: list[dict] = []
    models: dict = {}  # kind -> (model, builder); they share the base, so keeping them is cheap
    kinds = [*lc["conditioning"], *(["names"] if "text_lora" in controls else [])]
    for kind in kinds:
        model, builder = build_model(base, lc, kind, feats, tasks, seed, classes, weights, titles)
        t1 = time.time()
        bars = Bars(console, enabled=rank == 0)
        # the text-only control has nothing to align: every step on the instructions
        own_plan = plan if model.sensor_part is not None else [("instruct", int(lc["steps"]))]
        try:
            hist = tune_in_phases(
                model, builder, own_plan, qs.train, captions, feats, lc, seed, out_dir, kind,
                device, bars,
            )  # fmt: skip
        finally:
            bars.close()
        tune_s = time.time() - t1
        if rank != 0:
            continue
        adapter_log = ("gates_tanh", "adapter_attention_ratio", "seed_adapter_ratio", "phase")
        history += [
            {"round": h["step"], "loss": h["loss"], "conditioning": kind}
            | {key: h[key] for key in adapter_log if key in h}
            for h in hist
        ]
        t2 = time.time()
        args = (model, builder, feats)
        report = {
            "val": {s: score(s, *args, val_q, meta, **gen) for s in scorings},
            "test": {s: score(s, *args, test_q, meta, **gen) for s in scorings},
            "tune_s": round(tune_s, 1),
            "eval_s": round(time.time() - t2, 1),
            "steps": len(hist) and hist[-1]["step"],
            # equal across conditionings by construction (one llm.lora for all); recorded
            # from the modules so a reader can check it
            "lora_coverage": model.lora_coverage(),
            "phases": [{"name": p, "steps": n} for p, n in own_plan],
        }
        if qs.types:  # llm.question_types beyond classification, on validation and test
            report["question_types"] = {
                qt: {part: {s: score_questions(s, *args, q[part], meta, **gen) for s in scorings} for part in ("val", "test")}
                for qt, q in qs.types.items()
            }  # fmt: skip
        if model.adapter is not None:
            report["adapter_layers"] = model.adapter.layer_indices
            report["gates_tanh"] = model.adapter.gates_tanh()  # per layer, mean over heads
            report["gates_tanh_per_head"] = torch.tanh(model.adapter.gates.detach()).tolist()
        if model.seed_adapter is not None:
            report["seed_adapter"] = {
                "layers": model.seed_adapter.layer_indices,
                "fusion": model.seed_adapter.fusion,
                "center": model.seed_adapter.center,
                "rank": int(model.seed_adapter.up.shape[-1]),
                # ‖V_{l,τ}‖ per layer and task: how far A moved from its zero start
                "up_norm": model.seed_adapter.up.detach().flatten(2).norm(dim=-1).tolist(),
            }
        if fewshot and model.sensor_part is not None:  # not the text-only control
            report["fewshot"] = held_out_report(
                model, builder, feats, data, qs, fewshot, lc, seed, scorings, gen
            )
        reports[kind] = report
        figures = {s: round(report["val"][s]["accuracy"], 3) for s in scorings}
        console.print(f"  {kind}: validation accuracy {figures} (tuned {tune_s:.0f}s)")
        models[kind] = (model, builder)
    path = out_dir / "results.json"
    if rank != 0:
        return path
    val_figures = {k: reports[k]["val"] for k in lc["conditioning"]}
    kind, method = choose_on_validation(val_figures)
    model, builder = models[kind]
    chosen = reports[kind]
    results: dict = {
        "conditioning": reports,
        "lm": lc["model"],
        "task_classes": classes,
        "task_titles": titles,
        # the seed's recipe as run: phases (the encoders one is the federation) and the
        # per-task loss weights (unlisted tasks: 1)
        "recipe": {
            "phases": [{"name": "encoders", "note": ENCODERS_NOTE}]
            + [{"name": p, "steps": n} for p, n in plan],
            "align_examples": len(captions),
            "task_weights": weights or {},
        },
        "bundle": bundle_meta.get("meta", {}),
        "best": kind,
        "scoring": method,
        "questions": qs.rows,
        "head": head_accuracy(feats, test_q),
        "controls": _controls(controls, reports, model, builder, feats, data, qs, test_q, method, seed, gen),
    }  # fmt: skip
    if qs.types:
        results["question_types"] = _type_table(
            controls, reports, kind, method, model, builder, feats, meta, qs, seed, gen
        )
    selection = {
        "conditioning": kind,
        "scoring": method,
        "chosen_on": "val",
        "candidates": {f"{k}/{s}": reports[k]["val"][s]["accuracy"] for k in lc["conditioning"] for s in scorings},
        "val_rows": qs.rows["val"],
        "not_selected": "step count (fixed: llm.steps)",
    }  # fmt: skip
    val_best, test_best = chosen["val"][method], chosen["test"][method]
    doc = {
        "method": "iotlm",
        "dataset": meta.name,
        "seed": seed,
        "num_nodes": data.source.get("nodes", 0),
        "rounds": int(lc["steps"]),
        "plan": {},
        "data": data.source,
        "selection": selection,
        "val": {"accuracy": val_best["accuracy"], "by_task": {t: {"accuracy": a} for t, a in val_best["by_task"].items()}},
        "test": {"accuracy": test_best["accuracy"], "accuracy_by_modality": {}, "accuracy_by_node": {},
                 "by_task": {t: {"accuracy": a} for t, a in test_best["by_task"].items()}},
        "history": history,
        "comm": {"bytes_up_per_node_round": _mean_upload(data.source), "bytes_down_per_node_round": 0},
        "wall_s": round(time.time() - t0, 1),
        "llm": results,
        "config": cfg,
        # a table of LM runs names the code that produced it, as the federation's does
        "code_version": code_version(),
    }  # fmt: skip
    atomic_write_text(path, json.dumps(doc, indent=2))
    _log_mlflow(cfg, doc, path)
    _print_summary(doc)
    return path


def choose_on_validation(val: dict[str, dict[str, dict]]) -> tuple[str, str]:
    """(conditioning, scoring) with the best validation accuracy; ties go to the first
    listed.  It is given validation figures only, so no test figure can steer it."""
    candidates = [(k, s, r["accuracy"]) for k, by in val.items() for s, r in by.items()]
    if not candidates:
        raise ValueError("llm.conditioning: give at least one of prefix, adapter, seed_adapter")
    best = max(range(len(candidates)), key=lambda i: (candidates[i][2], -i))
    return candidates[best][0], candidates[best][1]


def _mean_upload(source: dict) -> int:
    sizes = source.get("upload_bytes") or {}
    per_node = [sum(v) for v in zip(*sizes.values(), strict=True)] if sizes else []
    return int(np.mean(per_node)) if per_node else 0


def _controls(names, reports, model, builder, feats, data, qs, test_q, method, seed, gen) -> dict:
    """The controls on the test questions, scored like the chosen conditioning."""
    out: dict = {}
    if "head" in names:
        out["head"] = head_accuracy(feats, test_q)
    if "majority" in names:
        out["majority"] = majority_accuracy(data.train, qs.fit_rows, test_q)
    if "text_lora" in names:
        out["text_lora"] = reports["names"]["test"][method]
    if "shuffled_sensors" in names:
        shuffled = shuffled_sensors(feats, qs.test_rows, seed)
        out["shuffled_sensors"] = score(method, model, builder, shuffled, test_q, data.meta, **gen)
    if "train_templates" in names:
        same_rows = [ex for t in builder.tasks for ex in qs.test_train_templates[t]]
        out["train_templates"] = score(method, model, builder, feats, same_rows, data.meta, **gen)
    return out


def _type_table(
    controls, reports, kind, method, model, builder, feats, meta, qs, seed, gen
) -> dict:
    """Per question type beyond classification, on its test questions: the chosen
    conditioning scored by the chosen method (and by both), its baselines (majority,
    chance) and, where ``llm.controls`` asks, the same rows with training templates, the
    readings shuffled, and the LoRA-tuned text-only control."""
    out = {}
    for qt, q in qs.types.items():
        rep = reports[kind]["question_types"][qt]
        row = {
            "conditioning": kind,
            "scoring": method,
            "test": rep["test"][method],
            "by_scoring": rep["test"],
            "val": rep["val"][method],
            "questions": {part: len(q[part]) for part in ("train", "val", "test")},
            **baselines(q["train"], q["test"], meta),
        }
        if "train_templates" in controls:
            row["train_templates"] = score_questions(
                method, model, builder, feats, q["test_train_templates"], meta, **gen
            )
        if "shuffled_sensors" in controls:
            rows = sorted({r for ex in q["test"] for r in ex.rows})
            shuffled = shuffled_sensors(feats, rows, seed)
            row["shuffled_sensors"] = score_questions(
                method, model, builder, shuffled, q["test"], meta, **gen
            )
        if "text_lora" in controls:
            row["text_lora"] = reports["names"]["question_types"][qt]["test"][method]
        out[qt] = row
    return out


# the conditionings that can carry in-context examples: prefix tokens sit in each
# example's own turn; the gated adapter routes per token, each example's turns seeing
# only that example's readings (fed_iotlm/llm/conditioning.py)
SHOTS_CONDITIONINGS = ("prefix", "adapter")
# why the others answer zero-shot only (said in results.json and docs)
SHOTS_REFUSED = (
    "in-context examples need each example's readings beside its own answer; {kind} "
    "conditioning has none in the sequence (text-only) or adds one output for the whole "
    "sequence (the seed adapter), so it cannot tell which example's readings go with "
    "which answer: use prefix or adapter conditioning for k > 0"
)


def check_held_out(task: str | None, tasks: list[str], k: int, kinds: list[str]) -> None:
    """Refuse a held-out task the data lacks, or one that would leave nothing to tune,
    before any tuning; say once which conditionings answer it zero-shot only."""
    if task is None:
        return
    if task not in tasks:
        raise ValueError(f"llm.fewshot.task={task!r}: the data's tasks are {tasks}")
    if len(tasks) < 2:
        raise ValueError(f"llm.fewshot.task={task!r} is the only task: nothing left to tune on")
    for kind in kinds:
        if k > 0 and kind not in SHOTS_CONDITIONINGS:
            console.print(f"  {kind}: zero-shot only on {task}; {SHOTS_REFUSED.format(kind=kind)}")


def held_out_report(model, builder, feats, data, qs, task, lc, seed, scorings, gen) -> dict:
    """The task held out from tuning (``llm.fewshot.task``), asked on its validation and
    test questions (held-out templates, worded like the training ones: ``llm.fewshot``'s
    options/descriptions) with no example and, for prefix and adapter conditioning, with k answered
    in-context examples from the fit rows, each with its own sensor tokens; both scorings,
    the held-out task's majority class and chance beside them.  Validation figures are
    what a study may choose on; test is only reported."""
    from .instructions import phrasing_of

    fs, meta = lc["fewshot"], data.meta
    k, kind = int(fs["k"]), builder.conditioning
    phrasing = phrasing_of(fs)
    pool = task_examples(meta, data.train, task, templates="train", seed=seed,
                         indices=qs.fit_rows, phrasing=phrasing)  # fmt: skip
    refused = SHOTS_REFUSED.format(kind=kind) if k > 0 and kind not in SHOTS_CONDITIONINGS else None
    out: dict = {"task": task, "k": k, "phrasing": vars(phrasing), "shots_refused": refused}
    for part, evals in (("val", qs.val[task]), ("test", qs.test[task])):
        shots = None if k == 0 or refused else draw_shots(pool, evals, k, seed + (part == "val"))
        res = {"zero_shot": {}, "few_shot": {} if shots else None}
        for s in scorings:
            res["zero_shot"][s] = score(s, model, builder, feats, evals, meta, **gen)
            if shots:
                res["few_shot"][s] = score(s, model, builder, feats, evals, meta,
                                           shots=shots.__getitem__, **gen)  # fmt: skip
        out[part] = res
    out["majority"] = majority_accuracy(data.train, qs.fit_rows, qs.test[task])
    out["chance"] = 1.0 / meta.tasks[task].num_classes
    # the first version's two figures (test, generation), kept under their old names
    out["zero_shot"] = out["test"]["zero_shot"].get("generation", {}).get("accuracy")
    few = out["test"]["few_shot"] or {}
    out["few_shot"] = few.get("generation", {}).get("accuracy")
    return out


def draw_shots(pool, evals, k: int, seed: int) -> dict:
    """k in-context examples per question, drawn once (seeded, without replacement, never
    the question's own sample) so every scoring sees the same ones."""
    if len(pool) < k + 1:
        raise ValueError(f"llm.fewshot.k={k}: only {len(pool)} answered examples to draw from")
    rng = np.random.default_rng(seed + 1)
    out = {}
    for ex in evals:
        picks = [pool[j] for j in rng.permutation(len(pool))[: k + 1] if pool[j].index != ex.index]
        out[ex] = picks[:k]
    return out


def _log_mlflow(cfg: dict, doc: dict, path: Path) -> None:
    m = block(cfg, "mlflow")
    if not m["enabled"]:
        return
    import mlflow

    from fed_iotlm.settings import flatten
    from fed_iotlm.tracking import experiment_id

    mlflow.set_tracking_uri(m["tracking_uri"])
    client = mlflow.MlflowClient(tracking_uri=m["tracking_uri"])  # artifacts beside the store
    mlflow.set_experiment(
        experiment_id=experiment_id(client, m["experiment"] + "-llm", m["tracking_uri"])
    )
    with mlflow.start_run(run_name=f"iotlm-{doc['dataset']}-seed{doc['seed']}"):
        mlflow.log_params({k: str(v)[:500] for k, v in flatten({"llm": cfg["llm"]}).items()})
        for h in doc["history"]:
            mlflow.log_metric(f"loss.{h['conditioning']}", h["loss"], step=h["round"])
        llm = doc["llm"]
        metrics = {
            f"{part}_accuracy.{k}.{s}": r["accuracy"]
            for k, rep in llm["conditioning"].items()
            for part in ("val", "test")
            for s, r in rep[part].items()
        }
        metrics |= {f"control.{k}": r["accuracy"] for k, r in llm["controls"].items()}
        metrics |= {
            f"question_type.{qt}.{name}": row[name]["accuracy"]
            for qt, row in llm.get("question_types", {}).items()
            for name in ("test", "majority", "chance")
        }
        metrics |= {
            "val_accuracy": doc["val"]["accuracy"],
            "test_accuracy": doc["test"]["accuracy"],
        }
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(path))


def _print_summary(doc: dict) -> None:
    from rich.table import Table

    llm, sel = doc["llm"], doc["selection"]
    table = Table(
        title=f"IoT-LM stage (data: {doc['data']['data']}); chosen on validation: "
        f"{sel['conditioning']} scored by {sel['scoring']}"
    )
    for col in ("model", "val", "test", "test per task"):
        table.add_column(col, justify="left" if col in ("model", "test per task") else "right")
    for kind, rep in llm["conditioning"].items():
        for s, r in rep["test"].items():
            name = "LoRA text-only control" if kind == "names" else f"LM + {kind}"
            per = ", ".join(f"{t} {a:.3f}" for t, a in r["by_task"].items())
            table.add_row(
                f"{name} ({s})", f"{rep['val'][s]['accuracy']:.3f}", f"{r['accuracy']:.3f}", per
            )
    for name, r in llm["controls"].items():
        if name == "text_lora":
            continue
        per = ", ".join(f"{t} {a:.3f}" for t, a in r["by_task"].items())
        table.add_row(f"control: {name}", "", f"{r['accuracy']:.3f}", per)
    for qt, row in llm.get("question_types", {}).items():
        for name in (
            "test",
            "train_templates",
            "shuffled_sensors",
            "text_lora",
            "majority",
            "chance",
        ):
            if name not in row:
                continue
            r = row[name]
            val = f"{row['val']['accuracy']:.3f}" if name == "test" else ""
            per = ", ".join(f"{t} {a:.3f}" for t, a in r["by_task"].items())
            per += f"; MAE {r['mae']:.2f}" if "mae" in r else ""
            table.add_row(f"{qt}: {name}", val, f"{r['accuracy']:.3f}", per)
    console.print(table)
