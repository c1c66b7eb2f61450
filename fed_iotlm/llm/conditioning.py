"""Two ways to put sensor embeddings into a causal LM, both on frozen federated encoders.

Notation: e_m ∈ R^D is modality m's encoder output (and ``fused``, the federated
model's multisensory embedding), H the LM's hidden size, P_m a per-modality projector
R^D → R^{k×H}.  A modality absent from a sample contributes nothing.

(a) :class:`GatedSensorAdapter`, IoT-LM's multisensory multitask adapter (LLaMA-Adapter V2
    style).  In each of the top L layers l, the attention output for hidden states h gets

        o_l(h) = Attn_l(h) + W_o [tanh(g_{l,j}) · softmax(q_j(h) K_{l,j}ᵀ · s) V_{l,j}]_j,   s = attn.scaling
        K_l = W_k N_l[Q_{l,τ}; P_m(e_m) for present m],   V_l = W_v N_l[same],

    where Q_{l,τ} ∈ R^{n_q×H} are learned adapter queries of task τ (the task the question
    asks about, :mod:`fed_iotlm.llm.routing`), N_l is the layer's own input RMSNorm, W_q/W_k/W_v/W_o are its
    own (LoRA'd) projections and g_{l,j} a zero-initialised gate per head j, so training
    starts from the unchanged LM.  Like peft's
    ``adaption_prompt``, the adapter keys carry no rotary position; unlike it, the prompt is
    per sample (sensors) and per task, which peft's one shared prompt cannot express, so we
    install it as a forward hook on the attention modules rather than replacing them.
(b) :class:`PrefixProjector` (LLaVA style): P_m(e_m) are k soft tokens spliced into the
    input embeddings between the text markers ``<m>`` and ``</m>``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ModalityProjector(nn.Module):
    """P_m: embedding [B, D] → k tokens [B, k, H], RMS-matched to the LM's word embeddings
    (so soft tokens start at the scale the LM is used to)."""

    def __init__(self, names: list[str], dim: int, hidden: int, k: int, emb_rms: float):
        super().__init__()
        self.names, self.k, self.hidden = list(names), k, hidden
        self.proj = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, k * hidden))
                for m in self.names
            }
        )
        self.scale = nn.Parameter(torch.tensor(float(emb_rms)))

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, M, k, H] in ``names`` order (absent modalities still get tokens; the
        caller's masks decide where they go)."""
        out = torch.stack([self.proj[m](feats[m]) for m in self.names], 1)
        out = out.view(out.shape[0], len(self.names), self.k, self.hidden)
        return F.rms_norm(out, (self.hidden,)) * self.scale


class PrefixProjector(ModalityProjector):
    """(b) soft prefix tokens: the projector is all there is; splicing is in
    :mod:`fed_iotlm.llm.sequences`."""


class GatedSensorAdapter(nn.Module):
    """(a) the multisensory multitask adapter, as gated extra keys/values.

    Set up as LLaMA-Adapter V2 does, which the first version did not: the adapter prompt
    (task queries and sensor tokens) enters each adapted layer through that layer's own
    input RMSNorm before the k/v projections, as the layer's hidden states do, so deep
    layers see it at the scale they were trained on rather than at word-embedding scale;
    the queries start N(0, 1) (unit RMS, what the norm expects); the gates are one per
    head per layer, zero-initialised, trained at their own learning rate
    (``llm.adapter.gate_lr``, the optimiser group :data:`GATE_PARAM`)."""

    def __init__(
        self,
        names: list[str],
        dim: int,
        hidden: int,
        k: int,
        emb_rms: float,
        num_tasks: int,
        num_layers: int,
        num_heads: int,
        queries_per_task: int = 4,
    ):
        super().__init__()
        self.sensors = ModalityProjector(names, dim, hidden, k, emb_rms)
        # one query set per task; a question reaches its task's set by routing.py
        self.queries = nn.Parameter(torch.randn(num_layers, num_tasks, queries_per_task, hidden))
        self.gates = nn.Parameter(torch.zeros(num_layers, num_heads))
        self.num_layers = num_layers
        self.layer_indices: list[int] = []  # decoder layers hooked by install()
        self._context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._handles: list = []
        self._ratio_sum = [0.0] * num_layers
        self._ratio_n = [0] * num_layers

    def install(self, causal_lm: nn.Module, active: Callable[[], bool] = lambda: True) -> None:
        """Hook the attention of the last ``num_layers`` decoder layers.  ``active`` says
        whether the owner's LoRA adapter is the one in use: on a base shared by several
        conditionings, another model's pass must not pick up this adapter's context."""
        self._active = active
        model = type(
            causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        ).__name__
        layers = _decoder_layers(causal_lm)
        if not 1 <= self.num_layers <= len(layers):
            raise ValueError(
                f"llm.adapter.layers={self.num_layers}: {model} has {len(layers)} decoder layers"
            )
        first = len(layers) - self.num_layers
        for li, layer in enumerate(layers[first:]):
            where = f"{model} decoder layer {first + li}"
            check_attention(layer.self_attn, where)
            heads = _num_heads(layer.self_attn)
            if heads != self.gates.shape[1]:
                raise ValueError(
                    f"{where}: {heads} attention heads, gates for {self.gates.shape[1]}"
                )
            norm = getattr(layer, "input_layernorm", None)
            if norm is None:
                raise ValueError(
                    f"{where} ({type(layer).__name__}): the gated adapter needs the layer's "
                    "input norm (input_layernorm); use llm.conditioning=[prefix] for this model"
                )
            self.layer_indices.append(first + li)
            self._handles.append(
                layer.self_attn.register_forward_hook(self._hook(li, norm), with_kwargs=True)
            )

    def set_context(
        self,
        feats: dict[str, torch.Tensor],
        present: torch.Tensor,
        task_ids: torch.Tensor,
        routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Per-sequence sensor tokens for the next forward passes.
        ``present`` [B, M] bool, or [B, S, M] for S recordings per sequence (``feats``
        rows then [B·S, D] in that order; a padded recording is all-absent);
        ``task_ids`` [B] (the routed task of each sequence).  The recordings' tokens are
        concatenated into one prompt: adapter keys carry no position, so the adapter sees
        them as a set, enough for order-free questions (same class? how many?).

        ``routing`` = (token task [B, T], token segment [B, T], recording segment [B, S])
        routes per token instead (a dialog whose turns ask about different tasks, or
        in-context examples): every task's queries are in the prompt and a token sees
        only its own turn's task's queries and its own segment's recordings, so an
        example's readings stay beside its own answer."""
        tokens = self.sensors(feats)  # [B·S, M, k, H]
        b = task_ids.shape[0]
        _, m, k, h = tokens.shape
        mask = present.reshape(b, -1, m)[..., None].expand(-1, -1, m, k).reshape(b, -1)
        per_token = None
        if routing is not None:
            token_task, token_segment, sample_segment = routing
            key_segment = sample_segment[..., None].expand(-1, -1, m * k).reshape(b, -1)
            per_token = (token_task, token_segment, key_segment)
        self._context = (tokens.reshape(b, -1, h), mask, task_ids, per_token)

    def repeat_context(self, repeats: int) -> None:
        """Each sample's context ``repeats`` times in a row (scoring several options
        against one cached prompt)."""
        if self._context is not None:
            *plain, per_token = self._context
            if per_token is not None:  # the options continue the last turn
                task, segment, key_segment = per_token
                last = (task[:, -1:], segment[:, -1:], key_segment)
                per_token = tuple(v.repeat_interleave(repeats, 0) for v in last)
            plain = [v.repeat_interleave(repeats, 0) for v in plain]
            self._context = (*plain, per_token)

    def clear_context(self) -> None:
        self._context = None

    def gates_tanh(self) -> list[float]:
        """tanh(g) per adapted layer, the mean over its heads (how open each layer is)."""
        return torch.tanh(self.gates.detach().float()).mean(1).cpu().tolist()

    def take_output_ratios(self) -> list[float | None]:
        """Per adapted layer, the mean of ‖adapter output‖ / ‖attention output‖ (Frobenius
        over the batch, padding included) over the training passes since the last call,
        then reset; None for a layer with no pass.  With the gates this says whether the
        adapter is heard at all or drowned by the layer's own attention."""
        out = [s / n if n else None for s, n in zip(self._ratio_sum, self._ratio_n, strict=True)]
        self._ratio_sum = [0.0] * self.num_layers
        self._ratio_n = [0] * self.num_layers
        return out

    def _hook(self, li: int, norm: nn.Module):
        def hook(attn, args, kwargs, output):
            if self._context is None or not self._active():  # no sensors / not our pass
                return output
            sensor, mask, task_ids, per_token = self._context
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            if per_token is None:
                queries = self.queries[li][task_ids]  # [B, n_q, H]
                kv_mask = torch.cat([mask.new_ones(queries.shape[:2]), mask], 1)
            else:
                queries, kv_mask = self._per_token(li, per_token, mask, hidden.shape[1])
            prompt = torch.cat([queries.to(sensor.dtype), sensor], 1).to(hidden.dtype)
            gate = torch.tanh(self.gates[li])
            extra = _gated_attention(attn, hidden, cos, sin, norm(prompt), kv_mask, gate)
            if self.training:
                with torch.no_grad():
                    ratio = extra.float().norm() / output[0].float().norm().clamp_min(1e-12)
                self._ratio_sum[li] += float(ratio)
                self._ratio_n[li] += 1
            return (output[0] + extra, *output[1:])

        return hook

    def _per_token(self, li: int, per_token, mask: torch.Tensor, t: int):
        """Every task's queries [B, n_tasks·n_q, H] and the [B, T, K] mask of which
        adapter keys each token sees: its turn's task's queries and its segment's
        recordings.  A pass shorter than the tables (a cached continuation: generated
        or option tokens) belongs to the last turn and takes the last column."""
        token_task, token_segment, key_segment = per_token
        if token_task.shape[1] != t:
            token_task, token_segment = token_task[:, -1:], token_segment[:, -1:]
        b = mask.shape[0]
        n_tasks, n_q, h = self.queries.shape[1:]
        queries = self.queries[li].reshape(1, n_tasks * n_q, h).expand(b, -1, -1)
        slot_task = torch.arange(n_tasks, device=mask.device).repeat_interleave(n_q)
        sees_queries = token_task[..., None] == slot_task  # [B, T, n_tasks·n_q]
        sees_sensors = (token_segment[..., None] == key_segment[:, None, :]) & mask[:, None, :]
        kv_mask = torch.cat([sees_queries, sees_sensors], -1)
        return queries, kv_mask.expand(b, t, -1)


GATE_PARAM = "adapter.gates"  # the parameter name tuning gives its own learning rate
REQUIRED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_attention(attn: nn.Module, where: str) -> None:
    """Refuse, up front, an attention layout the adapter cannot reuse: it needs separate
    q/k/v/o projections and a head size (Llama, Mistral, Qwen2/3, SmolLM families); a
    fused qkv projection (Phi-3, GPT-NeoX, Falcon) would be silently mis-sliced.
    ``where`` names the model class and the layer."""
    missing = [name for name in (*REQUIRED_PROJECTIONS, "head_dim") if not hasattr(attn, name)]
    if missing:
        fused = [n for n, _ in attn.named_children() if "qkv" in n]
        raise ValueError(
            f"{where} ({type(attn).__name__}): the gated adapter needs separate q/k/v/o "
            f"projections and head_dim; missing {missing}"
            + (f", found fused {fused}" if fused else "")
            + "; use llm.conditioning=[prefix] for this model"
        )


def _num_heads(attn: nn.Module) -> int:
    """Query heads of an attention module (q_proj's output over head_dim)."""
    return int(attn.q_proj.out_features // attn.head_dim)


def _attention_utils(attn: nn.Module):
    """``apply_rotary_pos_emb`` and ``repeat_kv`` from the installed transformers' own
    module of this attention class (Qwen2, Mistral, ... define their own), else Llama's."""
    import sys

    from transformers.models.llama import modeling_llama

    own = sys.modules.get(type(attn).__module__)
    rope = getattr(own, "apply_rotary_pos_emb", None) or modeling_llama.apply_rotary_pos_emb
    repeat = getattr(own, "repeat_kv", None) or modeling_llama.repeat_kv
    return rope, repeat


def adapter_keys_values(attn, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [B, kv_heads, S, hd] (through k_norm where the layer has one, un-rotated) and
    values of an already input-normed adapter ``prompt`` [B, S, H], through the layer's
    own (LoRA'd) projections."""
    b, s, _ = prompt.shape
    hd = attn.head_dim
    k = attn.k_proj(prompt).view(b, s, -1, hd)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    v = attn.v_proj(prompt).view(b, s, -1, hd)
    return k.transpose(1, 2), v.transpose(1, 2)


def _gated_attention(attn, hidden, cos, sin, prompt, kv_mask, gate) -> torch.Tensor:
    """tanh(g)-per-head-gated attention of ``hidden``'s (rotary) queries over the
    un-rotated adapter keys/values, through the layer's own projections, q/k norms
    (Qwen3-style, if the layer has them), scaling (``attn.scaling``) and grouped-query
    layout, with transformers' own ``apply_rotary_pos_emb`` and ``repeat_kv``.  The gate
    multiplies each head before W_o and W_o's bias (if any) is taken off again, so a
    closed gate adds exactly zero."""
    rope, repeat_kv = _attention_utils(attn)
    b, t, _ = hidden.shape
    hd = attn.head_dim
    q = attn.q_proj(hidden).view(b, t, -1, hd)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    q, _ = rope(q, q, cos, sin)  # keys stay un-rotated (LLaMA-Adapter)
    k, v = adapter_keys_values(attn, prompt)
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    scale = float(getattr(attn, "scaling", hd**-0.5))
    # [B, K]: every token sees the same keys; [B, T, K]: each token its own (routing)
    visible = kv_mask[:, None, None, :] if kv_mask.dim() == 2 else kv_mask[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    out = out * gate.to(out.dtype)[None, :, None, None]
    y = attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    bias = getattr(getattr(attn.o_proj, "base_layer", attn.o_proj), "bias", None)
    return y if bias is None else y - bias


def _decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (possibly peft-wrapped) llama/mistral-style causal LM."""
    for mod in causal_lm.modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return layers
    raise ValueError(
        f"{type(causal_lm).__name__}: no decoder layers with self_attn (llama-style LM needed)"
    )
