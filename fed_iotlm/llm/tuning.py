"""Instruction tuning loop: LoRA + sensor conditioning, answer-only loss.

AdamW with a cosine schedule (warm-up; continued across calls via ``schedule_start``), gradient accumulation, optional gradient
checkpointing, bf16 autocast on CUDA (fp32 on CPU), data parallel under ``torchrun``
(each rank draws its own batches; gradients are averaged by DDP).  A checkpoint is the
peft adapter (safetensors), the projector/adapter (safetensors) and the trainer state,
written to a temp directory and renamed, so ``resume`` always finds a whole one.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .conditioning import GATE_PARAM
from .features import SensorFeatures
from .instructions import Example
from .sensor_lm import SensorLM
from .sequences import SequenceBuilder


@dataclass(frozen=True)
class TuneSettings:
    steps: int = 150
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    sensor_lr: float = 3e-3
    gate_lr: float | None = None  # the adapter's gates (None: sensor_lr)
    warmup: int = 10
    weight_decay: float = 0.0
    grad_checkpointing: bool = False
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    # one schedule over several calls (federated rounds): this call's first step is step
    # ``schedule_start`` of a warm-up + cosine schedule ``schedule_steps`` long (None: steps)
    schedule_start: int = 0
    schedule_steps: int | None = None
    # False: this model's LoRA factors stay frozen (the align phase, phases.py); the
    # optimiser then holds the sensor conditioning alone
    train_lora: bool = True


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine to 0 at ``total`` (transformers' cosine schedule), at a
    global ``step``: a federated site calls ``tune`` once per round and must continue the
    schedule at round × local steps, not restart its warm-up every round."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def make_scheduler(opt: torch.optim.Optimizer, settings: TuneSettings):
    """LambdaLR over this call's steps, offset by ``settings.schedule_start``."""
    total = settings.schedule_steps if settings.schedule_steps is not None else settings.steps
    if settings.schedule_start < 0 or settings.schedule_start + settings.steps > total:
        raise ValueError(
            f"schedule_start={settings.schedule_start} + steps={settings.steps} runs past "
            f"schedule_steps={total}"
        )
    start, warmup = settings.schedule_start, settings.warmup
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(start + i, warmup, total))


def make_optimizer(model: SensorLM, settings: TuneSettings) -> torch.optim.AdamW:
    """AdamW with one group per learning rate: LoRA (``lr``), projector and adapter
    queries (``sensor_lr``) and the adapter's gates (``gate_lr``), which start at zero and
    must travel far in few steps, so they get their own rate."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lora = [p for n, p in trainable if n.startswith("peft.")]
    gates = [p for n, p in trainable if n == GATE_PARAM]
    sensor = [p for n, p in trainable if not n.startswith("peft.") and n != GATE_PARAM]
    gate_lr = settings.sensor_lr if settings.gate_lr is None else settings.gate_lr
    if not trainable:
        raise ValueError("nothing to train: no LoRA and no sensor conditioning is trainable")
    # an empty group (LoRA frozen in the align phase; no sensor part for text) is kept,
    # so checkpoints keep one group layout
    groups = [
        {"params": lora, "lr": settings.lr, "name": "lora"},
        {"params": sensor, "lr": settings.sensor_lr, "name": "sensor"},
    ]
    if gates:
        groups.append({"params": gates, "lr": gate_lr, "name": "gates"})
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


def world() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def tune(
    model: SensorLM,
    builder: SequenceBuilder,
    examples: Sequence[Example],
    feats: SensorFeatures,
    settings: TuneSettings,
    ckpt_dir: Path,
    resume: bool = False,
    # (step, loss, ETA s, the history row: the adapter's gates and output ratios too)
    log: Callable[[int, float, float, dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """Train in place; returns the loss history ``[{"step", "loss"}]``."""
    rank, size = world()
    device = torch.device(device)
    model.to(device)
    model.activate()  # its own LoRA adapter trainable, any other on a shared base frozen
    model.set_lora_trainable(settings.train_lora)
    feats = feats.to(device)
    if settings.grad_checkpointing:
        model.peft.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    opt = make_optimizer(model, settings)
    sched = make_scheduler(opt, settings)
    step, history = 0, []
    rng = random.Random(settings.seed * 1_000_003 + rank)
    if resume and (ckpt_dir / "trainer.pt").is_file():
        step, history = load_checkpoint(model, opt, sched, ckpt_dir, rng)
    train_model: torch.nn.Module = model
    if size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    encoded = [builder.encode(ex) for ex in examples]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    if model.context_part is not None:
        model.context_part.take_output_ratios()  # drop what evaluation passes left
    t0, running, first = time.time(), [], step
    while step < settings.steps:
        for _ in range(settings.grad_accum):
            batch = builder.collate(rng.sample(encoded, min(settings.batch_size, len(encoded))))
            batch = batch.to(device)
            with autocast:
                loss = train_model(batch, feats) / settings.grad_accum
            loss.backward()
            running.append(float(loss.detach()) * settings.grad_accum)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % settings.log_every == 0 or step == settings.steps:
            row = {"step": step, "loss": float(np.mean(running)), "elapsed_s": time.time() - t0}
            if model.adapter is not None:  # how open the gates are, how loud the adapter is
                row["gates_tanh"] = model.adapter.gates_tanh()
                row["adapter_attention_ratio"] = model.adapter.take_output_ratios()
            if model.seed_adapter is not None:  # ‖A(z)‖ / ‖feed-forward output‖ per layer
                row["seed_adapter_ratio"] = model.seed_adapter.take_output_ratios()
            history.append(row)
            running = []
            if log is not None and rank == 0:
                eta = row["elapsed_s"] / (step - first) * (settings.steps - step)
                log(step, row["loss"], eta, row)
        if rank == 0 and (step % settings.checkpoint_every == 0 or step == settings.steps):
            save_checkpoint(model, opt, sched, step, history, ckpt_dir, rng)
    model.eval()
    return history


def save_checkpoint(
    model: SensorLM, opt, sched, step: int, history: list, ckpt_dir: Path, rng: random.Random
) -> None:
    """Write the whole checkpoint beside ``ckpt_dir`` and swap it in."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from peft import get_peft_model_state_dict

    lora = get_peft_model_state_dict(model.peft, adapter_name=model.adapter_name)
    (tmp / "lora").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in lora.items()}, str(tmp / "lora/adapter_model.safetensors")
    )
    model.peft.peft_config[model.adapter_name].save_pretrained(str(tmp / "lora"))
    save_file(
        {k: v.contiguous() for k, v in model.sensor_state().items()},
        str(tmp / "sensor.safetensors"),
    )
    torch.save(
        {
            "step": step,
            "history": history,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "batch_rng": rng.getstate(),  # so a resumed run draws the same batches
        },
        tmp / "trainer.pt",
    )
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(model: SensorLM, ckpt_dir: Path) -> None:
    """LoRA factors and projector/adapter weights of a checkpoint."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    for name in ("lora/adapter_model.safetensors", "sensor.safetensors"):
        if not (ckpt_dir / name).is_file():
            raise FileNotFoundError(f"{ckpt_dir}: not a tuning checkpoint (missing {name})")
    set_peft_model_state_dict(
        model.peft,
        load_file(str(ckpt_dir / "lora/adapter_model.safetensors")),
        adapter_name=model.adapter_name,
    )
    model.load_sensor_state(load_file(str(ckpt_dir / "sensor.safetensors")))


def load_checkpoint(
    model: SensorLM, opt, sched, ckpt_dir: Path, rng: random.Random
) -> tuple[int, list]:
    load_weights(model, ckpt_dir)
    state = torch.load(Path(ckpt_dir) / "trainer.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    rng.setstate(state["batch_rng"])
    return int(state["step"]), list(state["history"])
