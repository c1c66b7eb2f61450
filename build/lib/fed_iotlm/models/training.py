"""Local training and evaluation loops shared by nodes, baselines and the server.

Batches are drawn by index from tensors built once per split, which keeps the loop
free of DataLoader overhead on the small models this runs on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fed_iotlm.data.dataset import Split

from .heads import multitask_loss
from .multisensory import MultisensoryModel


@dataclass
class SplitTensors:
    """A split as torch tensors: features, presence masks and labels."""

    x: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]

    @classmethod
    def from_split(cls, split: Split, device: str | torch.device = "cpu") -> SplitTensors:
        return cls(
            x={m: torch.from_numpy(np.ascontiguousarray(v)).to(device) for m, v in split.x.items()},
            mask={m: torch.from_numpy(v).to(device) for m, v in split.mask.items()},
            y={t: torch.from_numpy(v.astype(np.int64)).to(device) for t, v in split.y.items()},
        )

    def __len__(self) -> int:
        return int(next(iter(self.y.values())).shape[0])

    def batch(self, idx: torch.Tensor, modalities: Iterable[str] | None = None):
        names = list(self.x) if modalities is None else [m for m in modalities if m in self.x]
        return (
            {m: self.x[m][idx] for m in names},
            {m: self.mask[m][idx] for m in names},
            {t: v[idx] for t, v in self.y.items()},
        )


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings (one node, one round)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    task_weights: dict[str, float] | None = None


def train_local(
    model: MultisensoryModel,
    data: SplitTensors,
    cfg: TrainConfig,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``model`` in place on labelled samples; returns mean loss and labelled counts.

    With ``proximal_mu > 0`` the FedProx term (mu/2)·||w - w_start||² keeps the node
    close to the global model it received.
    """
    labelled = torch.zeros(len(data), dtype=torch.bool)
    for y in data.y.values():
        labelled |= y.cpu() >= 0
    index = torch.nonzero(labelled).squeeze(1)
    if index.numel() == 0:
        return {"train_loss": 0.0, "num_labelled": 0.0}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(cfg.epochs):
        order = index[torch.randperm(index.numel(), generator=gen)]
        for start in range(0, order.numel(), cfg.batch_size):
            x, mask, y = data.batch(order[start : start + cfg.batch_size])
            loss, _ = multitask_loss(model(x, mask), y, cfg.task_weights)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * cfg.proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return {"train_loss": float(np.mean(losses)), "num_labelled": float(index.numel())}


@torch.no_grad()
def evaluate(
    model: MultisensoryModel,
    data: SplitTensors,
    modalities: Iterable[str] | None = None,
    batch_size: int = 512,
) -> dict[str, dict[str, float]]:
    """Per-task accuracy and loss on labelled samples, using only ``modalities`` (default all).

    Samples with none of the chosen modalities present are still scored (the model
    answers from its biases), so accuracies over different subsets share a denominator.
    """
    model.eval()
    names = list(data.x) if modalities is None else list(modalities)
    correct = {t: 0 for t in data.y}
    seen = {t: 0 for t in data.y}
    loss_sum = {t: 0.0 for t in data.y}
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x, mask, y = data.batch(idx, names)
        logits = model(x, mask)
        for t, out in logits.items():
            keep = y[t] >= 0
            if not bool(keep.any()):
                continue
            seen[t] += int(keep.sum())
            correct[t] += int((out[keep].argmax(1) == y[t][keep]).sum())
            loss_sum[t] += float(
                torch.nn.functional.cross_entropy(out[keep], y[t][keep], reduction="sum")
            )
    return {
        t: {"accuracy": correct[t] / seen[t], "loss": loss_sum[t] / seen[t]}
        for t in data.y
        if seen[t] > 0
    }


def mean_accuracy(per_task: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of accuracy (the headline number in results.json)."""
    return float(np.mean([v["accuracy"] for v in per_task.values()])) if per_task else float("nan")


def mean_loss(per_task: dict[str, dict[str, float]]) -> float:
    return float(np.mean([v["loss"] for v in per_task.values()])) if per_task else float("nan")
