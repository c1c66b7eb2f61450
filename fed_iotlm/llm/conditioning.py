"""Two ways to put sensor embeddings into a causal LM, both on frozen federated encoders.

Notation: e_m ∈ R^D is modality m's encoder output (and ``fused``, the federated
model's multisensory embedding), H the LM's hidden size, P_m a per-modality projector
R^D → R^{k×H}.  A modality absent from a sample contributes nothing.

(a) :class:`GatedSensorAdapter`, IoT-LM's multisensory multitask adapter (LLaMA-Adapter V2
    style).  In each of the top L layers l, the attention output for hidden states h gets

        o_l(h) = Attn_l(h) + tanh(g_l) · W_o softmax(q(h) K_lᵀ · s) V_l,   s = attn.scaling
        K_l = W_k [Q_{l,τ}; P_m(e_m) for present m],   V_l = W_v [same],

    where Q_{l,τ} ∈ R^{n_q×H} are learned adapter queries of task τ (a "general" slot for
    questions about no task), W_q/W_k/W_v/W_o are the layer's own (LoRA'd) projections and
    g_l is a zero-initialised gate, so training starts from the unchanged LM.  Like peft's
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
    """(a) the multisensory multitask adapter, as gated extra keys/values."""

    def __init__(
        self,
        names: list[str],
        dim: int,
        hidden: int,
        k: int,
        emb_rms: float,
        num_tasks: int,
        num_layers: int,
        queries_per_task: int = 4,
    ):
        super().__init__()
        self.sensors = ModalityProjector(names, dim, hidden, k, emb_rms)
        # slot ``num_tasks`` is the general one (presence questions, dialogs)
        self.queries = nn.Parameter(
            torch.randn(num_layers, num_tasks + 1, queries_per_task, hidden) * emb_rms
        )
        self.gates = nn.Parameter(torch.zeros(num_layers))
        self.num_layers = num_layers
        self._context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._handles: list = []

    def install(self, causal_lm: nn.Module, active: Callable[[], bool] = lambda: True) -> None:
        """Hook the attention of the top ``num_layers`` decoder layers.  ``active`` says
        whether the owner's LoRA adapter is the one in use: on a base shared by several
        conditionings, another model's pass must not pick up this adapter's context."""
        self._active = active
        layers = _decoder_layers(causal_lm)
        if self.num_layers > len(layers):
            raise ValueError(f"adapter wants {self.num_layers} layers; the LM has {len(layers)}")
        for li, layer in enumerate(layers[-self.num_layers :]):
            check_attention(layer.self_attn, f"decoder layer {len(layers) - self.num_layers + li}")
            self._handles.append(
                layer.self_attn.register_forward_hook(self._hook(li), with_kwargs=True)
            )

    def set_context(
        self, feats: dict[str, torch.Tensor], present: torch.Tensor, task_ids: torch.Tensor
    ) -> None:
        """Per-sample sensor tokens for the next forward passes.
        ``present`` [B, M] bool, ``task_ids`` [B] (``num_tasks`` = general)."""
        tokens = self.sensors(feats)  # [B, M, k, H]
        b, m, k, h = tokens.shape
        mask = present[:, :, None].expand(b, m, k).reshape(b, m * k)
        self._context = (tokens.reshape(b, m * k, h), mask, task_ids)

    def repeat_context(self, repeats: int) -> None:
        """Each sample's context ``repeats`` times in a row (scoring several options
        against one cached prompt)."""
        if self._context is not None:
            self._context = tuple(v.repeat_interleave(repeats, 0) for v in self._context)

    def clear_context(self) -> None:
        self._context = None

    def _hook(self, li: int):
        def hook(attn, args, kwargs, output):
            if self._context is None or not self._active():  # no sensors / not our pass
                return output
            sensor, mask, task_ids = self._context
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            queries = self.queries[li][task_ids]  # [B, n_q, H]
            kv_in = torch.cat([queries.to(sensor.dtype), sensor], 1)
            kv_mask = torch.cat([mask.new_ones(queries.shape[:2]), mask], 1)
            extra = _gated_attention(attn, hidden, cos, sin, kv_in.to(hidden.dtype), kv_mask)
            gate = torch.tanh(self.gates[li]).to(extra.dtype)
            return (output[0] + gate * extra, *output[1:])

        return hook


REQUIRED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_attention(attn: nn.Module, where: str) -> None:
    """Refuse, up front, an attention layout the adapter cannot reuse: it needs separate
    q/k/v/o projections and a head size (Llama, Mistral, Qwen2/3, SmolLM families); a
    fused qkv projection (Phi-3, GPT-NeoX, Falcon) would be silently mis-sliced."""
    missing = [name for name in REQUIRED_PROJECTIONS if not hasattr(attn, name)]
    if missing or not hasattr(attn, "head_dim"):
        fused = [n for n, _ in attn.named_children() if "qkv" in n]
        raise ValueError(
            f"{where} ({type(attn).__name__}): the gated adapter needs separate q/k/v/o "
            f"projections and head_dim; missing {missing or ['head_dim']}"
            + (f", found fused {fused}" if fused else "")
            + "; use llm.conditioning=[prefix] for this model"
        )


def _gated_attention(attn, hidden, cos, sin, kv_in, kv_mask) -> torch.Tensor:
    """Attention of ``hidden``'s (rotary) queries over un-rotated adapter keys/values,
    through the layer's own projections, q/k norms (Qwen3-style, if the layer has them),
    scaling (``attn.scaling``) and grouped-query layout, with transformers' own
    ``apply_rotary_pos_emb`` and ``repeat_kv``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    b, t, _ = hidden.shape
    hd = attn.head_dim
    q = attn.q_proj(hidden).view(b, t, -1, hd)
    s = kv_in.shape[1]
    k = attn.k_proj(kv_in).view(b, s, -1, hd)
    v = attn.v_proj(kv_in).view(b, s, -1, hd).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)  # keys stay un-rotated (LLaMA-Adapter)
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    scale = float(getattr(attn, "scaling", hd**-0.5))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask[:, None, None, :], scale=scale)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (possibly peft-wrapped) llama/mistral-style causal LM."""
    for mod in causal_lm.modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return layers
    raise ValueError(
        f"{type(causal_lm).__name__}: no decoder layers with self_attn (llama-style LM needed)"
    )
