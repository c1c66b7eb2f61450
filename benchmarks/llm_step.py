"""One LoRA training step with sensor tokens vs the same step on text only.

``python -m benchmarks.llm_step [--model smollm2-135m-instruct] [--repeats 5]`` prints JSON:

* ``cpu``: seconds per optimiser step (batch of instruction examples) with prefix sensor
  tokens and with the gated adapter, each as a ratio to the same LoRA step on the same
  question/answer text with no sensor block — run side by side, interleaved, so load on
  the machine hits both alike;
* ``gpu``: when CUDA is present, tokens/s, model FLOP utilisation and peak memory of a
  ~1B-parameter random-init Llama with LoRA + prefix sensor tokens in bf16; otherwise null
  and why.  FLOPs are counted from the model (``fed_iotlm/llm/flops.py``: no weight
  gradients for the frozen base, the LM head at answer positions only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.machine import loadavg, machine_info
from fed_iotlm.llm.features import FUSED, SensorFeatures
from fed_iotlm.llm.flops import train_step_flops
from fed_iotlm.llm.instructions import Example, Turn
from fed_iotlm.llm.loading import load_lm
from fed_iotlm.llm.sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from fed_iotlm.llm.sequences import SequenceBuilder

MODS = ["imu", "audio", "depth", "thermal"]
NAMES = [*MODS, FUSED]
QUESTION, ANSWER = "Which activity does this recording show?", "The activity is walking."


def _setup(lm, kind: str, batch: int, dim: int = 64, k: int = 2):
    feats = SensorFeatures(
        NAMES,
        {m: torch.randn(batch, dim) for m in NAMES},
        torch.ones(batch, len(NAMES), dtype=torch.bool),
        {},
    )
    cond = ConditioningSettings(
        kind, k, adapter_layers=8, names=NAMES, tasks=["activity"], feature_dim=dim
    )
    model = SensorLM(lm, LoraSettings(), cond)
    builder = SequenceBuilder(lm.tokenizer, NAMES, ["activity"], k, kind)
    exs = [
        Example(i, tuple(MODS), (Turn(QUESTION, ANSWER),), "task", "activity", 2, "b")
        for i in range(batch)
    ]
    data = builder.collate([builder.encode(e) for e in exs])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, data, feats, opt


def _step(model, data, feats, opt, autocast) -> None:
    with autocast:
        loss = model(data, feats)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def cpu_figures(model_name: str, batch: int, repeats: int) -> dict:
    import copy

    base = load_lm(model_name)
    runs = {
        kind: _setup(copy.deepcopy(base), kind, batch) for kind in ("none", "prefix", "adapter")
    }
    off = torch.autocast("cpu", enabled=False)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in runs.values():  # warm-up
        _step(*r, off)
    for _ in range(repeats):
        for kind, r in runs.items():
            t0 = time.perf_counter()
            _step(*r, off)
            times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": model_name,
        "batch": batch,
        "tokens_per_example": {k: int(r[1].attn[0].sum()) for k, r in runs.items()},
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "ratio_prefix_vs_text": round(med["prefix"] / med["none"], 3),
        "ratio_adapter_vs_text": round(med["adapter"] / med["none"], 3),
        "flops_per_step": {k: train_step_flops(r[0], r[1])["total"] for k, r in runs.items()},
        "threads": torch.get_num_threads(),
    }


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def gpu_figures(batch: int = 8, seq: int = 512, repeats: int = 10) -> dict | str:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    from transformers import LlamaConfig, LlamaForCausalLM

    from fed_iotlm.llm.loading import LoadedLM, smollm2_tokenizer

    tok = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
    )  # fmt: skip
    with torch.device("cuda"):
        lm = LlamaForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in lm.parameters())
    model, data, feats, opt = _setup(LoadedLM(lm, tok, "random-1b"), "prefix", batch)
    # stretch the question so a sequence is ~seq tokens
    pad = seq - data.ids.shape[1]
    if pad > 0:
        grow = lambda t, v: torch.cat([t[:, :1].expand(-1, pad).clone().fill_(v), t], 1)  # noqa: E731
        data = type(data)(
            ids=grow(data.ids, tok.pad_token_id or 0), attn=grow(data.attn, 1),
            labels=grow(data.labels, -100), slot_sample=grow(data.slot_sample, -1),
            slot_mod=grow(data.slot_mod, -1), slot_j=grow(data.slot_j, -1),
            sample=data.sample, task_id=data.task_id,
        )  # fmt: skip
    model.cuda()
    data, feats = data.to("cuda"), feats.to("cuda")
    auto = torch.autocast("cuda", dtype=torch.bfloat16)
    for _ in range(3):
        _step(model, data, feats, opt, auto)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        _step(model, data, feats, opt, auto)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / repeats
    tokens = int(data.attn.sum())
    # counted from the model: frozen base forward + input gradients, LoRA with weight
    # gradients, attention at the padded length, the LM head at answer positions only
    flops = train_step_flops(model, data)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return {
        "device": name,
        "params": n_params,
        "tokens_per_s": round(tokens / dt, 1),
        "step_s": round(dt, 4),
        "mfu": round(flops["total"] / dt / (peak * 1e12), 4) if peak else None,
        "peak_bf16_tflops": peak,
        "flops_per_step": flops,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    out = {"machine": machine_info(torch=torch.__version__), "loadavg_start": loadavg()}
    if not args.skip_cpu:
        out["cpu"] = cpu_figures(args.model, args.batch, args.repeats)
    gpu = gpu_figures()
    out["gpu"] = gpu if isinstance(gpu, dict) else None
    if not isinstance(gpu, dict):
        out["gpu_skipped"] = gpu
    out["loadavg_end"] = loadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
