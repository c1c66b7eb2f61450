"""Node-side MMBind training: the self-supervised shared-modality rounds and the
multimodal rounds on real samples plus cross-node pseudo-pairs.

Pseudo-pairs enter twice:

* **supervised through the fusion**: a labelled sample is fused from its own tokens
  plus its partners' tokens for the modalities it lacks, and its cross-entropy is
  weighted by the pair weight — so fusion and heads learn modality combinations that
  no single node ever observes;
* **weighted contrastive** (InfoNCE, temperature τ) between each own-modality token and
  each partner token — labels not needed, so unlabelled samples contribute.

The node's own-modality loss is kept as well, so real data always anchors training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fed_iotlm.models.heads import multitask_loss
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors, TrainConfig

from .loss import weighted_info_nce


@dataclass(frozen=True)
class BindTrainConfig:
    """Weights of the MMBind loss terms."""

    pseudo_weight: float = 1.0
    contrastive_weight: float = 0.5
    temperature: float = 0.1


@dataclass
class PartnerTensors:
    """For one lacking modality: k partner tokens and weights per own sample."""

    embeddings: torch.Tensor  # [n, k, D]
    weight: torch.Tensor  # [n, k]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random view of a batch for contrastive SSL, by feature layout.

    Sequences [B, T, C]: circular time shift, per-sample gain, jitter.  Grids
    [B, C, H, W]: a shift of up to 1/8 of the size, gain, jitter.  Vectors: gain, jitter.
    """
    b = x.shape[0]
    gain = 1.0 + 0.2 * torch.randn((b,) + (1,) * (x.ndim - 1), generator=gen)
    if x.ndim == 3:
        shift = int(torch.randint(0, x.shape[1], (1,), generator=gen))
        x = torch.roll(x, shift, dims=1)
    elif x.ndim == 4:
        lim = max(1, x.shape[-1] // 8)
        dy, dx = (int(v) for v in torch.randint(-lim, lim + 1, (2,), generator=gen))
        x = torch.roll(x, (dy, dx), dims=(2, 3))
    return x * gain + 0.1 * torch.randn(x.shape, generator=gen)


def _ssl_loss(
    model: MultisensoryModel, modality: str, x: torch.Tensor, method: str, gen
) -> torch.Tensor:
    enc, head = model.enc[modality], model.dec[modality]
    if method == "autoencoder":
        return F.mse_loss(head(enc(x)), x)
    # contrastive: two augmented views, projection through the same head, NT-Xent
    z1 = head(enc(augment(x, gen))).flatten(1)
    z2 = head(enc(augment(x, gen))).flatten(1)
    return weighted_info_nce(z1, z2, torch.ones(x.shape[0]), 0.2, detach_partners=False)


def pretrain_shared(
    model: MultisensoryModel,
    data: SplitTensors,
    modality: str,
    cfg: TrainConfig,
    seed: int,
    method: str = "contrastive",
) -> dict[str, float]:
    """Self-supervised rounds on the shared modality (no labels needed).

    ``autoencoder``: MSE(dec(enc(x)), x), as MMBind's public code.  ``contrastive``:
    two augmented views of each sample pulled together (InfoNCE), which ignores
    nuisances such as phase and gain that an autoencoder spends its capacity on.
    """
    if method not in ("autoencoder", "contrastive"):
        raise ValueError(f"binding.ssl={method!r}: expected 'autoencoder' or 'contrastive'")
    if modality not in data.x or modality not in model.dec:
        return {"pretrain_loss": 0.0, "num_present": 0.0}
    index = torch.nonzero(data.mask[modality]).squeeze(1)
    if index.numel() == 0:
        return {"pretrain_loss": 0.0, "num_present": 0.0}
    params = list(model.enc[modality].parameters()) + list(model.dec[modality].parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(cfg.epochs):
        order = index[torch.randperm(index.numel(), generator=gen)]
        for start in range(0, order.numel(), cfg.batch_size):
            x = data.x[modality][order[start : start + cfg.batch_size]]
            if x.shape[0] < 2:
                continue
            loss = _ssl_loss(model, modality, x, method, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return {
        "pretrain_loss": float(np.mean(losses)) if losses else 0.0,
        "num_present": float(index.numel()),
    }


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
    """``cfg.epochs`` epochs over every source with one optimiser; batches come from one
    source each (sources hold different modalities) in a shuffled order across sources,
    so several sources train as one pooled dataset (centralized MMBind)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, list[float]] = {"loss_own": [], "loss_pseudo": [], "loss_contrastive": []}
    for _ in range(cfg.epochs):
        batches = []
        for s, src in enumerate(sources):
            order = torch.randperm(len(src.data), generator=gen)
            batches += [
                (s, order[i : i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)
            ]
        for j in torch.randperm(len(batches), generator=gen).tolist():
            s, idx = batches[j]
            loss = _batch_loss(model, sources[s], idx, gen, cfg, bcfg, stats)
            if not loss.requires_grad:  # no label and no partner in this batch: nothing to learn
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()}


def _batch_loss(model, src: BoundData, idx, gen, cfg, bcfg, stats) -> torch.Tensor:
    """Own-modality loss plus, where the source has partners, the pseudo-pair terms."""
    x, mask, y = src.data.batch(idx)
    tokens = model.encode(x)
    own, _ = multitask_loss(model.logits_from_tokens(tokens, mask), y, cfg.task_weights)
    stats["loss_own"].append(float(own.detach()))
    if not src.partners:
        return own
    pseudo, contrastive = _partner_terms(model, tokens, mask, y, src.partners, idx, gen, cfg, bcfg)
    stats["loss_pseudo"].append(float(pseudo.detach()))
    stats["loss_contrastive"].append(float(contrastive.detach()))
    return own + bcfg.pseudo_weight * pseudo + bcfg.contrastive_weight * contrastive


def _partner_terms(model, tokens, mask, y, partners, idx, gen, cfg, bcfg):
    """Pseudo-complete supervised loss and weighted contrastive loss for one batch."""
    b = idx.numel()
    ptokens, ppresent = dict(tokens), dict(mask)
    sample_w = torch.ones(b)
    contrastive = next(iter(tokens.values())).new_zeros(())
    for m, p in partners.items():
        k = p.embeddings.shape[1]
        pick = torch.randint(0, k, (b,), generator=gen)  # one of the k partners per sample
        emb = p.embeddings[idx, pick]
        w = p.weight[idx, pick]
        ptokens[m], ppresent[m] = emb, w > 0
        sample_w = sample_w * torch.where(w > 0, w, torch.ones_like(w))
        for o, tok in tokens.items():
            valid = mask[o] & (w > 0)
            if int(valid.sum()) >= 2:
                contrastive = contrastive + weighted_info_nce(
                    tok[valid], emb[valid], w[valid], bcfg.temperature
                )
    any_partner = torch.stack([ppresent[m] for m in partners], 1).any(1)
    sample_w = torch.where(any_partner, sample_w, torch.zeros_like(sample_w))
    logits = model.logits_from_tokens(ptokens, ppresent)
    pseudo, _ = multitask_loss(logits, y, cfg.task_weights, sample_weight=sample_w)
    return pseudo, contrastive
