"""Federated LoRA payloads as flat numpy dicts (what goes into a Flower ArrayRecord).

Keys: ``A|<layer>`` and ``B|<layer>`` (LoRA factors, peft module names), ``sensor|<key>``
(projector / adapter state) and ``residual|<layer>`` (FedEx base-weight residual).  The
scaling is not sent: both sides use peft's ``alpha / r`` with r read from A's shape, and
:func:`~fed_iotlm.llm.fedlora.load_lora_factors` rejects a mismatch with the model.
Half precision has no numpy dtype, so everything travels as float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .fedlora import LoraFactors, Site

SEP = "|"


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def pack(
    factors: Site,
    sensor: Mapping[str, Tensor] | None = None,
    residual: Mapping[str, Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """One flat dict for the wire; empty parts are simply absent."""
    out: dict[str, np.ndarray] = {}
    for name, f in factors.items():
        out[f"A{SEP}{name}"], out[f"B{SEP}{name}"] = _np(f.A), _np(f.B)
    out.update({f"sensor{SEP}{k}": _np(v) for k, v in (sensor or {}).items()})
    out.update({f"residual{SEP}{k}": _np(v) for k, v in (residual or {}).items()})
    return out


def unpack(
    arrays: Mapping[str, np.ndarray], alpha: float
) -> tuple[Site, dict[str, Tensor], dict[str, Tensor]]:
    """(factors, sensor state, residual) from :func:`pack`'s dict; unknown keys raise."""
    parts: dict[str, dict[str, Tensor]] = {"A": {}, "B": {}, "sensor": {}, "residual": {}}
    for key, value in arrays.items():
        kind, sep, name = key.partition(SEP)
        if not sep or kind not in parts:
            raise KeyError(f"unexpected federated LoRA array {key!r}")
        parts[kind][name] = torch.from_numpy(np.array(value, dtype=np.float32))
    if set(parts["A"]) != set(parts["B"]):
        raise KeyError(f"layers with only one factor: {sorted(set(parts['A']) ^ set(parts['B']))}")
    factors = {n: LoraFactors(a, parts["B"][n], alpha / a.shape[0]) for n, a in parts["A"].items()}
    return factors, parts["sensor"], parts["residual"]
