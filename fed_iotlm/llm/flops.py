"""Matmul FLOPs of one LoRA training step of a :class:`SensorLM`, counted from the model.

What MFU divides by must be what the step computes, not 6·N per token:

* the frozen base runs forward (2 FLOPs per weight per token) and, in every layer the
  backward pass reaches, the input gradient only (another 2; no weight gradients);
* LoRA factors run forward, input gradient and weight gradient (6 per factor weight);
* attention scores and values: 4·T²·width forward per layer and sequence, 8 backward
  (gradients to both operands), at the padded length the kernels actually see;
* the LM head runs only at supervised answer positions (forward and the gradient into
  the hidden state): 4·V·H per answer token, not per token;
* the sensor projector / adapter are counted at 6 FLOPs per weight per sample (small).

Elementwise work (norms, rotary, softmax, activations) is not matmul work and is left
out, like every MFU convention.  ``tests/test_llm_gpu_ready.py`` checks the count
against torch's own FLOP counter on a small model.
"""

from __future__ import annotations

from torch import nn

from .sequences import IGNORE, Batch


def _layer_weights(layer: nn.Module) -> tuple[int, int]:
    """(frozen linear weights, LoRA factor weights) of one decoder layer."""
    base = lora = 0
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            if "lora_" in name:
                lora += mod.weight.numel()
            else:
                base += mod.weight.numel()
    return base, lora


def train_step_flops(model, batch: Batch) -> dict[str, int]:
    """FLOPs of ``model(batch, feats)`` followed by ``.backward()``, by part."""
    from .conditioning import _decoder_layers

    causal = model.peft.get_base_model()
    layers = _decoder_layers(causal)
    cfg = causal.config
    width = int(cfg.num_attention_heads) * int(
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    )
    b, t = batch.ids.shape
    tokens = b * t  # padded: what the kernels compute
    answer = int((batch.labels[:, 1:] != IGNORE).sum())
    first = _first_backward_layer(model, len(layers))
    out = {"base": 0, "lora": 0, "attention": 0}
    for i, layer in enumerate(layers):
        base, lora = _layer_weights(layer)
        back = i >= first
        out["base"] += (2 + (2 if back else 0)) * base * tokens
        out["lora"] += (6 if back else 2) * lora * tokens
        out["attention"] += (4 + (8 if back else 0)) * b * t * t * width
    head = causal.get_output_embeddings().weight.numel()
    out["lm_head"] = 4 * head * answer
    part = model.sensor_part
    recs = batch.recordings()
    samples = int(recs[recs >= 0].unique().numel())  # every recording is projected once
    sensor = (
        0
        if part is None
        else sum(m.weight.numel() for m in part.modules() if isinstance(m, nn.Linear))
    )
    out["sensor"] = 6 * sensor * samples
    out["total"] = sum(out.values())
    out["answer_tokens"], out["tokens"] = answer, tokens
    return out


def _first_backward_layer(model, n_layers: int) -> int:
    """The lowest layer the backward pass reaches: the bottom one when soft tokens enter
    the input (prefix) or LoRA sits there; else the lowest layer with LoRA or the adapter."""
    if model.projector is not None:
        return 0
    lowest = n_layers
    if model.context_part is not None:  # gated or seed adapter: its top layers
        lowest = n_layers - model.context_part.num_layers
    from .conditioning import _decoder_layers

    for i, layer in enumerate(_decoder_layers(model.peft.get_base_model())):
        if any(p.requires_grad for p in layer.parameters()):
            return min(i, lowest)
    return lowest
