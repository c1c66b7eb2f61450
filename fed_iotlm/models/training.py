"""Local training and evaluation loops shared by nodes, baselines and the server.

Batches are drawn by index from tensors built once per split, which keeps the loop
free of DataLoader overhead on the small models this runs on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fed_iotlm.data.dataset import Split
from fed_iotlm.metrics import balanced_accuracy, f1_macro

from .device import Placement, place_tensors, placement_of, stream_batch
from .heads import multitask_loss
from .multisensory import MultisensoryModel


@dataclass
class SplitTensors:
    """A split as torch tensors: features, presence masks and labels.

    ``stream_to``: the device each batch is copied to as it is drawn, when the split is
    too large to live there (see :meth:`placed`); None: batches stay where the tensors are.
    """

    x: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    stream_to: torch.device | None = None

    @classmethod
    def from_split(cls, split: Split, device: str | torch.device = "cpu") -> SplitTensors:
        return cls(
            x={m: torch.from_numpy(np.ascontiguousarray(v)).to(device) for m, v in split.x.items()},
            mask={m: torch.from_numpy(v).to(device) for m, v in split.mask.items()},
            y={t: torch.from_numpy(v.astype(np.int64)).to(device) for t, v in split.y.items()},
        )

    def placed(self, place: Placement) -> SplitTensors:
        """This split where ``place`` computes (:func:`fed_iotlm.models.device.place_tensors`)."""
        groups, stream_to = place_tensors({"x": self.x, "mask": self.mask, "y": self.y}, place)
        return SplitTensors(**groups, stream_to=stream_to)

    def __len__(self) -> int:
        return int(next(iter(self.y.values())).shape[0])

    def batch(self, idx: torch.Tensor, modalities: Iterable[str] | None = None):
        names = list(self.x) if modalities is None else [m for m in modalities if m in self.x]
        parts = (
            {m: self.x[m][idx] for m in names},
            {m: self.mask[m][idx] for m in names},
            {t: v[idx] for t, v in self.y.items()},
        )
        return parts if self.stream_to is None else stream_batch(parts, self.stream_to)


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings (one node, one round)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    task_weights: dict[str, float] | None = None
    steps: int | None = None  # optimiser steps per node per round; None = epochs over the data
    # per task, one cross-entropy weight per class (train.class_weighting=balanced:
    # fed_iotlm/models/class_weights.py); None = the unweighted loss
    class_weights: dict[str, tuple[float, ...]] | None = None


def train_local(
    model: MultisensoryModel,
    data: SplitTensors,
    cfg: TrainConfig,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``model`` in place on labelled samples; returns mean loss, labelled count,
    and the budget spent (``steps``, ``examples``) so equal budgets can be checked.

    ``cfg.steps`` fixes the optimiser steps per call whatever the node holds (a node
    with 20 labels and one with 2000 then get the same budget); otherwise ``epochs``
    passes over the labelled samples.  With ``proximal_mu > 0`` the FedProx term
    (mu/2)·||w - w_start||² keeps the node close to the global model it received.
    """
    labelled = torch.zeros(len(data), dtype=torch.bool)
    for y in data.y.values():
        labelled |= y.cpu() >= 0
    index = torch.nonzero(labelled).squeeze(1)
    if index.numel() == 0:
        return {"train_loss": 0.0, "num_labelled": 0.0, "steps": 0.0, "examples": 0.0}
    model.train()
    place = placement_of(model)  # bf16 autocast on CUDA, nothing on the CPU
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    seen = 0
    for batch in batch_schedule(index, cfg, gen):
        x, mask, y = data.batch(batch)
        with place.autocast():
            loss, _ = multitask_loss(model(x, mask), y, cfg.task_weights, cfg.class_weights)
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            loss = loss + 0.5 * cfg.proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        seen += int(batch.numel())
    return {
        "train_loss": float(np.mean(losses)) if losses else 0.0,
        "num_labelled": float(index.numel()),
        "steps": float(len(losses)),
        "examples": float(seen),
    }


def batch_schedule(
    index: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """The batches of one local training call: ``cfg.steps`` batches drawn from fresh
    permutations of ``index`` one after another (a step budget), or ``cfg.epochs``
    whole passes when no step budget is set."""
    n = index.numel()
    if cfg.steps is None:
        for _ in range(cfg.epochs):
            order = index[torch.randperm(n, generator=gen)]
            yield from order.split(cfg.batch_size)
        return
    if cfg.steps < 0:
        raise ValueError(f"train.steps must be >= 0 or null, got {cfg.steps}")
    done = 0
    while done < cfg.steps:
        order = index[torch.randperm(n, generator=gen)]
        for batch in order.split(cfg.batch_size):
            if done == cfg.steps:
                return
            yield batch
            done += 1


@torch.no_grad()
def evaluate(
    model: MultisensoryModel,
    data: SplitTensors,
    modalities: Iterable[str] | None = None,
    batch_size: int = 512,
) -> dict[str, dict[str, float]]:
    """Per-task accuracy, loss, macro-F1 and balanced accuracy on labelled samples, using
    only ``modalities`` (default all).

    Samples with none of the chosen modalities present are still scored (the model
    answers from its biases), so accuracies over different subsets share a denominator.
    The class-balanced scores come from a confusion matrix summed over batches
    (:mod:`fed_iotlm.metrics`), so they are exact, not averages of batch scores.
    """
    model.eval()
    place = placement_of(model)
    names = list(data.x) if modalities is None else list(modalities)
    correct = {t: 0 for t in data.y}
    seen = {t: 0 for t in data.y}
    loss_sum = {t: 0.0 for t in data.y}
    confusion: dict[str, torch.Tensor] = {}
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x, mask, y = data.batch(idx, names)
        with place.autocast():
            logits = model(x, mask)
        for t, out in logits.items():
            out = out.float()  # bf16 under CUDA autocast; scores and losses in float32
            keep = y[t] >= 0
            if not bool(keep.any()):
                continue
            seen[t] += int(keep.sum())
            pred = out[keep].argmax(1)
            correct[t] += int((pred == y[t][keep]).sum())
            k = out.shape[1]
            counts = torch.bincount(y[t][keep] * k + pred, minlength=k * k).cpu()
            confusion[t] = confusion[t] + counts if t in confusion else counts
            loss_sum[t] += float(
                torch.nn.functional.cross_entropy(out[keep], y[t][keep], reduction="sum")
            )
    return {
        t: {
            "accuracy": correct[t] / seen[t],
            "loss": loss_sum[t] / seen[t],
            **class_balanced(confusion[t].numpy().reshape(int(confusion[t].numel() ** 0.5), -1)),
        }
        for t in data.y
        if seen[t] > 0
    }


def class_balanced(cm: np.ndarray) -> dict[str, float]:
    """Macro-F1 and balanced accuracy of one confusion matrix."""
    return {"f1_macro": f1_macro(cm), "balanced_accuracy": balanced_accuracy(cm)}


def mean_accuracy(per_task: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of accuracy (the headline number in results.json)."""
    return float(np.mean([v["accuracy"] for v in per_task.values()])) if per_task else float("nan")


def mean_metric(per_task: dict[str, dict[str, float]], key: str) -> float:
    """Mean over tasks of ``key`` (``f1_macro``, ``balanced_accuracy``, ...)."""
    return float(np.mean([v[key] for v in per_task.values()])) if per_task else float("nan")


def mean_loss(per_task: dict[str, dict[str, float]]) -> float:
    return float(np.mean([v["loss"] for v in per_task.values()])) if per_task else float("nan")
