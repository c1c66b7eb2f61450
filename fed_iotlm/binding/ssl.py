"""Self-supervised rounds on the shared modality, with views that vary the nuisances.

MMBind pairs samples across nodes by the similarity of their shared-modality
embeddings, so those embeddings must ignore what differs between two recordings of the
same activity: how the sensor sits (a rotation of the accelerometer and gyroscope
axes, the same for both), when the window started (a time shift) and the gain.  Two
views of each sample differ by exactly these, per sample:

* a rotation in SO(3) of at most ``rotation_deg`` about a random axis, applied jointly
  to every xyz channel triplet the modality declares (``rotation_groups``, from channel
  names such as ax/ay/az and gx/gy/gz: one rigid sensor, one rotation);
* a circular time shift (sequences) or a spatial shift of up to 1/8 (grids);
* a log-normal gain and a little jitter.

Views go through the encoder and then a projection head of its own (``proj.<m>``, not
the reconstruction decoder), and the loss is supervised contrastive over both views of
the batch: ``contrastive`` treats every sample as its own class (SimCLR's NT-Xent);
``supcon_semi`` gives the node's labelled samples their class, so same-class samples
attract, and leaves the unlabelled ones self-supervised; each of its steps adds a batch
of labelled samples only (at 10 % labels a mixed batch holds too few same-class pairs).  Labels never leave the node:
they only shape its local loss.  ``autoencoder`` (MMBind's public code) reconstructs
the input instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors, TrainConfig

from .schedule import run_schedule

SSL_METHODS = ("contrastive", "supcon_semi", "autoencoder")


@dataclass(frozen=True)
class SSLConfig:
    """How the shared-modality rounds train (``binding.ssl*`` in the config)."""

    method: str = "contrastive"
    temperature: float = 0.2
    batch_size: int = 128  # contrastive: more negatives per step than train.batch_size
    rotation_deg: float = 30.0  # largest rotation angle of a view (0 = none)
    gain: float = 0.2  # std of the log gain of a view
    jitter: float = 0.1  # std of additive noise
    label_task: str | None = None  # supcon_semi: whose labels (default: the first task)

    def __post_init__(self) -> None:
        if self.method not in SSL_METHODS:
            raise ValueError(f"binding.ssl={self.method!r}: expected one of {SSL_METHODS}")
        if self.temperature <= 0:
            raise ValueError(f"binding.ssl_temperature must be > 0, got {self.temperature}")
        if self.batch_size < 2:
            raise ValueError(f"binding.ssl_batch_size must be >= 2, got {self.batch_size}")


def rotation_groups(channels: list[str] | tuple[str, ...]) -> list[list[int]]:
    """Index triplets of channels named ``<prefix>x/y/z`` (e.g. ax, ay, az; gyro_x, ...),
    in x, y, z order: the axes of one sensor, which a rotation mixes."""
    by_prefix: dict[str, dict[str, int]] = {}
    for i, name in enumerate(channels):
        m = re.fullmatch(r"(.*?)[_\-.]?([xyzXYZ])", name)
        if m:
            by_prefix.setdefault(m.group(1).lower(), {})[m.group(2).lower()] = i
    return [[axes[a] for a in "xyz"] for axes in by_prefix.values() if set(axes) == set("xyz")]


def random_rotations(b: int, max_deg: float, gen: torch.Generator) -> torch.Tensor:
    """[b, 3, 3] rotations about uniformly random axes by angles uniform in [0, max_deg]."""
    axis = F.normalize(torch.randn(b, 3, generator=gen), dim=1)
    angle = torch.rand(b, generator=gen) * math.radians(max_deg)
    k = torch.zeros(b, 3, 3)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    return torch.eye(3).expand(b, 3, 3) + s * k + (1 - c) * (k @ k)  # Rodrigues


def augment(
    x: torch.Tensor, gen: torch.Generator, cfg: SSLConfig, groups: list[list[int]] = ()
) -> torch.Tensor:
    """One random view of a batch, every nuisance drawn per sample."""
    b = x.shape[0]
    if x.ndim == 3:  # [B, T, C]
        if groups and cfg.rotation_deg > 0:
            rot = random_rotations(b, cfg.rotation_deg, gen).to(x)
            x = x.clone()
            for g in groups:  # the same rotation for every triplet of the sample
                x[:, :, g] = torch.einsum("bij,btj->bti", rot, x[:, :, g])
        t = x.shape[1]
        shift = torch.randint(0, t, (b, 1), generator=gen)
        rows = (torch.arange(t)[None, :] + shift) % t
        x = torch.gather(x, 1, rows[:, :, None].expand(-1, -1, x.shape[2]).to(x.device))
    elif x.ndim == 4:  # [B, C, H, W]
        lim = max(1, x.shape[-1] // 8)
        dy, dx = torch.randint(-lim, lim + 1, (2, b), generator=gen).tolist()
        x = torch.stack([torch.roll(x[i], (dy[i], dx[i]), dims=(1, 2)) for i in range(b)])
    gain = torch.exp(cfg.gain * torch.randn((b,) + (1,) * (x.ndim - 1), generator=gen))
    return x * gain.to(x) + cfg.jitter * torch.randn(x.shape, generator=gen).to(x)


def supcon_loss(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss over rows ``z`` [N, d] with class ids [N]: each row is
    pulled towards every other row of its id against all other rows.  With a distinct
    id per sample and two views each, this is NT-Xent."""
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (ids[:, None] == ids[None, :]) & ~eye
    per_row = -(log_prob.masked_fill(~pos, 0.0).sum(1)) / pos.sum(1).clamp(min=1)
    has = pos.any(1)
    return per_row[has].mean() if bool(has.any()) else z.sum() * 0.0


def _batch_ids(b: int, y: torch.Tensor | None, method: str, classes: int) -> torch.Tensor:
    """Ids of the 2B views of a batch (a sample's two views share one): the class of a
    labelled sample under ``supcon_semi``, else an id of the sample's own."""
    own = torch.arange(b) + classes  # distinct from every class id
    if method == "supcon_semi" and y is not None:
        own = torch.where(y >= 0, y, own)
    return torch.cat([own, own])


def ssl_loss(
    model: MultisensoryModel,
    modality: str,
    x: torch.Tensor,
    y: torch.Tensor | None,
    cfg: SSLConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """The SSL objective on one batch of the shared modality."""
    enc = model.enc[modality]
    if cfg.method == "autoencoder":
        return F.mse_loss(model.dec[modality](enc(x)), x)
    groups = model.spec.extra.get("rotation_groups", {}).get(modality, [])
    z = model.proj[modality](enc(torch.cat([augment(x, gen, cfg, groups) for _ in range(2)])))
    classes = int(y.max()) + 1 if y is not None and y.numel() and int(y.max()) >= 0 else 0
    return supcon_loss(z, _batch_ids(x.shape[0], y, cfg.method, classes), cfg.temperature)


def ssl_head(modality: str, method: str) -> str:
    """The parameter group trained with the encoder: ``dec.<m>`` or ``proj.<m>``."""
    return f"dec.{modality}" if method == "autoencoder" else f"proj.{modality}"


def pretrain_shared(
    model: MultisensoryModel,
    data: SplitTensors,
    modality: str,
    cfg: TrainConfig,
    seed: int,
    ssl: SSLConfig = SSLConfig(),
) -> dict[str, float]:
    """One self-supervised round on the node's samples holding ``modality``.

    ``cfg.epochs`` passes, or exactly ``cfg.steps`` optimiser steps, in batches of
    ``ssl.batch_size``; only the encoder and its SSL head train."""
    head = model.dec if ssl.method == "autoencoder" else model.proj
    if modality not in data.x or modality not in head:
        return {"pretrain_loss": 0.0, "num_present": 0.0, "steps": 0.0, "examples": 0.0}
    index = torch.nonzero(data.mask[modality]).squeeze(1)
    if index.numel() < 2:
        return {"pretrain_loss": 0.0, "num_present": 0.0, "steps": 0.0, "examples": 0.0}
    label_task = ssl.label_task or next(iter(data.y), None)
    labels = data.y.get(label_task) if ssl.method == "supcon_semi" else None
    labelled = index[labels[index] >= 0] if labels is not None else index[:0]
    params = list(model.enc[modality].parameters()) + list(head[modality].parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []

    def step(_: int, rows: torch.Tensor) -> bool:
        if rows.numel() < 2:
            return False
        rows = index[rows]
        y = labels[rows] if labels is not None else None
        loss = ssl_loss(model, modality, data.x[modality][rows], y, ssl, gen)
        if labelled.numel() >= 2:  # supcon_semi: a batch of labelled samples, many positives
            pick = labelled[torch.randperm(labelled.numel(), generator=gen)[: ssl.batch_size]]
            x_lab = data.x[modality][pick]
            loss = loss + ssl_loss(model, modality, x_lab, labels[pick], ssl, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        return True

    done = run_schedule([index.numel()], ssl.batch_size, cfg.epochs, cfg.steps, gen, step)
    return {
        "pretrain_loss": float(np.mean(losses)) if losses else 0.0,
        "num_present": float(index.numel()),
        **done,
    }


def pooled_modality(nodes: list[SplitTensors], modality: str) -> SplitTensors:
    """Every node's samples holding ``modality`` as one split (centralized SSL), with
    their labels (for ``supcon_semi``)."""
    held = [(n, n.mask[modality]) for n in nodes if modality in n.x]
    if not held:
        raise ValueError(f"no node holds the shared modality {modality!r}")
    x = torch.cat([n.x[modality][m] for n, m in held])
    tasks = list(held[0][0].y)
    y = {t: torch.cat([n.y[t][m] for n, m in held]) for t in tasks}
    return SplitTensors({modality: x}, {modality: torch.ones(len(x), dtype=torch.bool)}, y)
