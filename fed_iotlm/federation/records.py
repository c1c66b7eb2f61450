"""Conversions between model state and Flower records (what crosses the wire)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

COUNT_PREFIX = "count."


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copy of a model's state dict."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def numpy_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arr.numpy() for k, arr in record.items()}


def load_into(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load a (possibly partial) state into ``model``; unknown keys are an error."""
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"parameters not in the model: {unknown[:5]}")
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=False)


def counts_to_metrics(counts: Mapping[str, float], extra: Mapping[str, float]) -> MetricRecord:
    """Per-group sample counts as ``count.<group>`` entries next to other metrics."""
    out: dict[str, float] = {f"{COUNT_PREFIX}{g}": float(n) for g, n in counts.items()}
    out.update({k: float(v) for k, v in extra.items()})
    return MetricRecord(out)


def metrics_to_counts(metrics: MetricRecord) -> dict[str, float]:
    return {
        k[len(COUNT_PREFIX) :]: float(v) for k, v in metrics.items() if k.startswith(COUNT_PREFIX)
    }


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (array data only)."""
    return int(sum(len(arr.data) for arr in record.values()))
