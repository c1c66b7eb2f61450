"""The tuned model: a causal LM with peft LoRA plus one sensor conditioning.

Trainable: the LoRA factors and the projector (prefix), the gated adapter (adapter) or
the seed's adapter (seed_adapter).  The LM head runs only where a label is supervised —
most positions are prompt, and the head (vocab × hidden) is the single largest matmul of
a small LM.  Per-task loss weights (``llm.task_weights``) arrive with the batch
(:attr:`Batch.weight`, one per example by its task).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import GatedSensorAdapter, PrefixProjector
from .features import SensorFeatures
from .loading import LoadedLM
from .seed_adapter import SeedAdapter
from .sequences import IGNORE, Batch


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # LoRA in the last ``top_layers`` decoder layers, or every layer (None).  The same for
    # every conditioning: a comparison of prefix and adapter is at equal LoRA coverage
    # (the first version gave the adapter LoRA in its 8 layers and prefix in all 30)
    top_layers: int | None = None


@dataclass(frozen=True)
class ConditioningSettings:
    kind: str = "prefix"  # prefix | adapter | seed_adapter | text | names
    tokens_per_modality: int = 4
    adapter_layers: int = 8
    queries_per_task: int = 4
    names: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    feature_dim: int = 0
    # seed_adapter (llm.seed_adapter): fusion add | concat, its depth and rank
    seed_fusion: str = "add"
    seed_layers: int = 8
    seed_rank: int = 8
    seed_center: bool = False  # z minus its mean over recordings (seed_adapter.py)


def lora_layer_count(top_layers: object, n_layers: int) -> int:
    """How many of the last decoder layers get LoRA: ``top_layers`` (an int in 1..n_layers)
    or every layer (None).  The old ``"auto"`` (the adapter's layers for the adapter, all
    for prefix) made the two conditionings differ in coverage, so it is refused by name."""
    if top_layers is None:
        return n_layers
    if isinstance(top_layers, bool) or not isinstance(top_layers, int):
        raise ValueError(
            f"llm.lora.top_layers={top_layers!r}: give an int (LoRA in the last N decoder "
            "layers, the same for every conditioning) or null (every layer)"
        )
    if not 1 <= top_layers <= n_layers:
        raise ValueError(f"llm.lora.top_layers={top_layers}: the LM has {n_layers} decoder layers")
    return top_layers


def lora_coverage(peft_model: nn.Module, adapter_name: str) -> dict:
    """Where adapter ``adapter_name``'s LoRA factors actually sit (read from the modules,
    not the settings): the decoder layer indices, the projection names and the number of
    adapted modules; written per conditioning to results.json."""
    from peft.tuners.lora import LoraLayer

    layers, modules, count = set(), set(), 0
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A:
            parts = name.split(".")
            if "layers" in parts:
                layers.add(int(parts[parts.index("layers") + 1]))
            modules.add(parts[-1])
            count += 1
    return {"layers": sorted(layers), "modules": sorted(modules), "adapted": count}


class SensorLM(nn.Module):
    """LM + LoRA + one conditioning.  Several SensorLMs can share one base model: the
    first wraps it in peft, each further one adds its own named LoRA adapter to the same
    PeftModel (``adapter_name``) instead of deep-copying the weights; every entry point
    activates its own adapter first."""

    def __init__(
        self,
        lm: LoadedLM,
        lora: LoraSettings,
        cond: ConditioningSettings,
        adapter_name: str = "default",
    ):
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model

        self.cond = cond
        # FFA-LoRA keeps A at its shared init (fed_iotlm.llm.federated.freeze_lora_a):
        # set_lora_trainable(True) then unfreezes B only
        self.lora_a_frozen = False
        n_layers = int(lm.model.config.num_hidden_layers)
        top = lora_layer_count(lora.top_layers, n_layers)
        layers = (
            {}
            if top == n_layers
            else {
                "layers_to_transform": list(range(n_layers - top, n_layers)),
                "layers_pattern": "layers",
            }
        )
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
            **layers,
        )
        self.adapter_name = adapter_name
        if isinstance(lm.model, PeftModel):  # the base is shared with another conditioning
            self.peft = lm.model
            self.peft.add_adapter(adapter_name, config, autocast_adapter_dtype=True)
        else:
            for p in lm.model.parameters():
                p.requires_grad_(False)
            # LoRA factors in fp32 over a bf16/fp16 base
            self.peft = get_peft_model(
                lm.model, config, adapter_name=adapter_name, autocast_adapter_dtype=True
            )
        self.activate()
        causal = self.peft.get_base_model()
        hidden = int(self.embed.weight.shape[1])
        emb_rms = float(self.embed.weight.detach().float().pow(2).mean().sqrt())
        self.projector: PrefixProjector | None = None
        self.adapter: GatedSensorAdapter | None = None
        self.seed_adapter: SeedAdapter | None = None
        args = (cond.names, cond.feature_dim, hidden, cond.tokens_per_modality, emb_rms)
        if cond.kind == "prefix":
            self.projector = PrefixProjector(*args)
        elif cond.kind == "adapter":
            heads = int(causal.config.num_attention_heads)
            self.adapter = GatedSensorAdapter(
                *args, len(cond.tasks), cond.adapter_layers, heads, cond.queries_per_task
            )
            name = adapter_name
            self.adapter.install(causal, active=lambda: self.peft.active_adapter == name)
        elif cond.kind == "seed_adapter":
            self.seed_adapter = SeedAdapter(
                cond.names, cond.feature_dim, hidden, len(cond.tasks), cond.seed_layers,
                cond.seed_fusion, cond.seed_rank, cond.seed_center,
            )  # fmt: skip
            name = adapter_name
            self.seed_adapter.install(causal, active=lambda: self.peft.active_adapter == name)

    # LM parts as properties, not attributes: assigning them would register the same
    # modules twice (duplicate state-dict keys, confused DDP)
    @property
    def decoder(self) -> nn.Module:
        return self.peft.get_base_model().get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.peft.get_base_model().get_output_embeddings()

    @property
    def embed(self) -> nn.Module:
        return self.peft.get_base_model().get_input_embeddings()

    def lora_coverage(self) -> dict:
        """This model's LoRA placement (see :func:`lora_coverage`)."""
        return lora_coverage(self.peft, self.adapter_name)

    @property
    def sensor_part(self) -> nn.Module | None:
        """The trainable sensor conditioning: projector, gated adapter or seed adapter."""
        parts = (self.projector, self.adapter, self.seed_adapter)
        return next((p for p in parts if p is not None), None)

    @property
    def context_part(self) -> GatedSensorAdapter | SeedAdapter | None:
        """The conditioning that carries per-sequence sensor context through hooks."""
        return self.adapter if self.adapter is not None else self.seed_adapter

    def sensor_state(self) -> dict[str, torch.Tensor]:
        """Projector/adapter weights (saved beside the peft adapter)."""
        part = self.sensor_part
        return {} if part is None else {k: v.detach().cpu() for k, v in part.state_dict().items()}

    def load_sensor_state(self, state: dict[str, torch.Tensor]) -> None:
        part = self.sensor_part
        if part is not None:
            part.load_state_dict(state)

    def set_lora_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze this model's own LoRA factors (the align phase trains the
        sensor conditioning alone; LoRA's B is still zero then, so frozen is also off).
        A frozen for FFA (``lora_a_frozen``) stays frozen."""
        for n, p in self.peft.named_parameters():
            if f".lora_A.{self.adapter_name}." in n:
                p.requires_grad_(trainable and not self.lora_a_frozen)
            elif f".lora_B.{self.adapter_name}." in n:
                p.requires_grad_(trainable)

    def activate(self) -> None:
        """Make this model's LoRA adapter the active one (trainable, the others frozen)."""
        if self.peft.active_adapter != self.adapter_name:
            self.peft.set_adapter(self.adapter_name)

    def _inputs(self, batch: Batch, feats: SensorFeatures, sensors: bool = True) -> torch.Tensor:
        """Word embeddings with sensor slots overwritten (prefix) / adapter context set;
        ``sensors=False`` is the plain LM on text (the text-only baseline)."""
        self.activate()
        emb = self.embed(batch.ids)
        ctx = self.context_part
        if ctx is not None:
            ctx.clear_context()
        if not sensors:
            return emb
        if ctx is not None:  # every recording's readings in one adapter context
            recs = batch.recordings()
            rows, present = feats.rows(recs.clamp(min=0).reshape(-1))
            present = present.view(*recs.shape, -1) & (recs >= 0)[..., None]
            if batch.token_task is None:
                ctx.set_context(rows, present, batch.task_id)
            else:
                routing = (batch.token_task, batch.token_segment, batch.sample_segment)
                ctx.set_context(rows, present, batch.task_id, routing)
        if self.projector is not None:
            pos = batch.slot_sample >= 0
            if bool(pos.any()):
                uniq, inv = batch.slot_sample[pos].unique(return_inverse=True)
                rows, _ = feats.rows(uniq)
                tokens = self.projector(rows)  # [U, M, k, H]
                picked = tokens[inv, batch.slot_mod[pos], batch.slot_j[pos]]
                emb = emb.clone()
                emb[pos] = picked.to(emb.dtype)
        return emb

    def forward(self, batch: Batch, feats: SensorFeatures) -> torch.Tensor:
        """Mean cross-entropy over answer tokens; with per-example weights
        (``batch.weight``, from ``llm.task_weights``) each token's term is multiplied by
        its example's weight before the mean over tokens, so a weight scales its task's
        share of the loss (all 1: the plain mean)."""
        emb = self._inputs(batch, feats)
        hidden = self.decoder(inputs_embeds=emb, attention_mask=batch.attn).last_hidden_state
        target = batch.labels[:, 1:]
        sel = target != IGNORE
        logits = self.lm_head(hidden[:, :-1][sel])
        if batch.weight is None:
            return F.cross_entropy(logits.float(), target[sel])
        per_token = F.cross_entropy(logits.float(), target[sel], reduction="none")
        weight = batch.weight[:, None].expand_as(target)[sel].to(per_token.dtype)
        return (per_token * weight).sum() / per_token.numel()

    @torch.no_grad()
    def option_scores(
        self, batch: Batch, feats: SensorFeatures, options: list[list[int]], pad_id: int
    ) -> torch.Tensor:
        """Log-likelihood of each option's tokens after a left-padded prompt: [B, C].

        The prompt runs once; its KV cache (and the adapter's sensor context) is repeated
        per option and every option's tokens are scored in one further pass, so scoring C
        options costs about one prompt plus C short continuations."""
        if not options or any(not o for o in options):
            raise ValueError("every option needs at least one token")
        emb = self._inputs(batch, feats)
        attn = batch.attn
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.decoder(inputs_embeds=emb, attention_mask=attn, position_ids=pos, use_cache=True)
        b, c, width = attn.shape[0], len(options), max(len(o) for o in options)
        dev = attn.device
        opt = torch.tensor([o + [pad_id] * (width - len(o)) for o in options], device=dev)
        valid = torch.tensor(
            [[1.0] * len(o) + [0.0] * (width - len(o)) for o in options], device=dev
        )
        first = F.log_softmax(self.lm_head(out.last_hidden_state[:, -1]).float(), -1)
        score = first[:, opt[:, 0]]  # [B, C]
        if width > 1:
            past = out.past_key_values
            past.batch_repeat_interleave(c)
            if self.context_part is not None:
                self.context_part.repeat_context(c)
            ids = opt[:, :-1].repeat(b, 1)  # row b·C + c is option c of prompt b
            attn2 = torch.cat([attn.repeat_interleave(c, 0), torch.ones_like(ids)], 1)
            pos2 = pos[:, -1:].repeat_interleave(c, 0) + torch.arange(1, width, device=dev)
            hidden = self.decoder(
                input_ids=ids, attention_mask=attn2, position_ids=pos2, past_key_values=past
            ).last_hidden_state
            logp = F.log_softmax(self.lm_head(hidden).float(), -1)
            tok = logp.gather(-1, opt[:, 1:].repeat(b, 1)[..., None]).squeeze(-1)
            score = score + (tok * valid[:, 1:].repeat(b, 1)).sum(-1).view(b, c)
        if self.context_part is not None:
            self.context_part.clear_context()
        return score

    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        feats: SensorFeatures,
        eos_id: int,
        max_new_tokens: int = 12,
        sensors: bool = True,
    ) -> list[list[int]]:
        """Greedy decoding from a left-padded batch with transformers' ``generate`` on the
        spliced input embeddings (the adapter's sensor context stays set for every
        step); new token ids per row, cut at the end of turn."""
        emb = self._inputs(batch, feats, sensors)
        causal = self.peft.get_base_model()
        pad = causal.generation_config.pad_token_id
        try:
            out = causal.generate(
                inputs_embeds=emb,
                attention_mask=batch.attn,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos_id,
                pad_token_id=eos_id if pad is None else pad,
                use_cache=True,
            )
        finally:
            if self.context_part is not None:
                self.context_part.clear_context()
        ids = out.tolist()
        return [row[: row.index(eos_id)] if eos_id in row else row for row in ids]
