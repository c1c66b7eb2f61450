"""Node-side MMBind training: the multimodal rounds on real samples plus cross-node
pseudo-pairs.

Pseudo-pairs enter twice:

* **supervised through the fusion**: a labelled sample is fused from its own tokens
  plus its partners' tokens for the modalities it lacks, and its cross-entropy is
  weighted by the pair weight — so fusion and heads learn modality combinations that
  no single node ever observes;
* **weighted contrastive** (InfoNCE, temperature τ) between each own-modality token and
  each partner token — labels not needed, so unlabelled samples contribute.

A node's own naturally paired modalities are contrasted as well (``own_pair_weight``,
0.1 as in MMBind's reference code): free, correct positives, so a node without
partners still learns more than plain supervised training.  The node's own-modality
supervised loss is kept, so real data always anchors training.  Centralized MMBind may
hand in its partners' raw features (``PartnerTensors.inputs``): they then go through
the live encoders instead of arriving as frozen tokens.  A round takes ``epochs``
passes or exactly ``steps`` optimiser steps (:mod:`.schedule`).  The self-supervised
shared-modality rounds are in :mod:`.ssl`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fed_iotlm.models.heads import multitask_loss
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors, TrainConfig

from .loss import weighted_info_nce
from .schedule import run_schedule


@dataclass(frozen=True)
class BindTrainConfig:
    """Weights of the MMBind loss terms."""

    pseudo_weight: float = 1.0
    contrastive_weight: float = 0.5
    temperature: float = 0.1
    own_pair_weight: float = 0.1  # contrastive between a node's own paired modalities


@dataclass
class PartnerTensors:
    """For one lacking modality: k partner tokens and weights per own sample."""

    embeddings: torch.Tensor  # [n, k, D]
    weight: torch.Tensor  # [n, k]
    inputs: torch.Tensor | None = None  # [n, k, *features]: raw partners (centralized only)


@dataclass
class BoundData:
    """One node's training tensors with the partners it received."""

    data: SplitTensors
    partners: dict[str, PartnerTensors]


def train_with_partners(
    model: MultisensoryModel,
    data: SplitTensors,
    partners: dict[str, PartnerTensors],
    cfg: TrainConfig,
    bcfg: BindTrainConfig,
    seed: int,
) -> dict[str, float]:
    """One round of MMBind training at a node (all samples; labels where present)."""
    return train_bound([BoundData(data, partners)], model, cfg, bcfg, seed)


def train_bound(
    sources: list[BoundData],
    model: MultisensoryModel,
    cfg: TrainConfig,
    bcfg: BindTrainConfig,
    seed: int,
) -> dict[str, float]:
    """``cfg.epochs`` passes over every source, or exactly ``cfg.steps`` optimiser steps,
    with one optimiser; batches come from one source each (sources hold different
    modalities) in a shuffled order across sources, so several sources train as one
    pooled dataset (centralized MMBind).  Returns mean losses, ``steps`` and
    ``examples`` (rows of the batches that took a step)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, list[float]] = {
        "loss_own": [], "loss_own_pair": [], "loss_pseudo": [], "loss_contrastive": []
    }  # fmt: skip

    def step(s: int, idx: torch.Tensor) -> bool:
        loss = _batch_loss(model, sources[s], idx, gen, cfg, bcfg, stats)
        if not loss.requires_grad:  # no label, pair or partner in this batch: nothing to learn
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return True

    sizes = [len(src.data) for src in sources]
    done = run_schedule(sizes, cfg.batch_size, cfg.epochs, cfg.steps, gen, step)
    return {**{k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()}, **done}


def _batch_loss(model, src: BoundData, idx, gen, cfg, bcfg, stats) -> torch.Tensor:
    """Own-modality loss, the own-pair contrastive term and, where the source has
    partners, the pseudo-pair terms."""
    x, mask, y = src.data.batch(idx)
    tokens = model.encode(x)
    own, _ = multitask_loss(
        model.logits_from_tokens(tokens, mask), y, cfg.task_weights, cfg.class_weights
    )
    stats["loss_own"].append(float(own.detach()))
    loss = own
    if bcfg.own_pair_weight > 0 and len(tokens) > 1:
        pair = own_pair_contrastive(tokens, mask, bcfg.temperature)
        stats["loss_own_pair"].append(float(pair.detach()))
        loss = loss + bcfg.own_pair_weight * pair
    if not src.partners:
        return loss
    pseudo, contrastive = _partner_terms(model, tokens, mask, y, src.partners, idx, gen, cfg, bcfg)
    stats["loss_pseudo"].append(float(pseudo.detach()))
    stats["loss_contrastive"].append(float(contrastive.detach()))
    return loss + bcfg.pseudo_weight * pseudo + bcfg.contrastive_weight * contrastive


def own_pair_contrastive(
    tokens: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], temperature: float
) -> torch.Tensor:
    """InfoNCE between every two of a node's own modalities, over the samples holding
    both (true pairs, so weight 1 and gradients into both encoders)."""
    names = list(tokens)
    total = next(iter(tokens.values())).new_zeros(())
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = mask[a] & mask[b]
            if int(both.sum()) >= 2:
                total = total + weighted_info_nce(
                    tokens[a][both],
                    tokens[b][both],
                    torch.ones(int(both.sum()), device=total.device),
                    temperature,
                    detach_partners=False,
                )
    return total


def _partner_terms(model, tokens, mask, y, partners, idx, gen, cfg, bcfg):
    """Pseudo-complete supervised loss and weighted contrastive loss for one batch."""
    b = idx.numel()
    ptokens, ppresent = dict(tokens), dict(mask)
    sample_w = torch.ones(b)
    contrastive = next(iter(tokens.values())).new_zeros(())
    for m, p in partners.items():
        k = p.embeddings.shape[1]
        pick = torch.randint(0, k, (b,), generator=gen)  # one of the k partners per sample
        live = p.inputs is not None
        emb = model.enc[m](p.inputs[idx, pick]) if live else p.embeddings[idx, pick]
        w = p.weight[idx, pick]
        ptokens[m], ppresent[m] = emb, w > 0
        sample_w = sample_w * torch.where(w > 0, w, torch.ones_like(w))
        for o, tok in tokens.items():
            valid = mask[o] & (w > 0)
            if int(valid.sum()) >= 2:
                contrastive = contrastive + weighted_info_nce(
                    tok[valid], emb[valid], w[valid], bcfg.temperature, detach_partners=not live
                )
    any_partner = torch.stack([ppresent[m] for m in partners], 1).any(1)
    sample_w = torch.where(any_partner, sample_w, torch.zeros_like(sample_w))
    logits = model.logits_from_tokens(ptokens, ppresent)
    pseudo, _ = multitask_loss(
        logits, y, cfg.task_weights, cfg.class_weights, sample_weight=sample_w
    )
    return pseudo, contrastive
