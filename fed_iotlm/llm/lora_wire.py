"""Federated LoRA payloads as flat numpy dicts (what goes into a Flower ArrayRecord).

Keys: ``A|<layer>`` and ``B|<layer>`` (LoRA factors, peft module names), ``sensor|<key>``
(projector / adapter state) and ``resA|<layer>`` / ``resB|<layer>`` (the FedEx residual as
stacked factors: the residual is resB @ resA, never shipped as a dense [out, in] matrix).
FFA-LoRA sends ``B|`` only (``b_only``): A is frozen and seeded identically everywhere, so
the receiver supplies it (``shared_a``) and the factor bytes halve for square layers.
The scaling is not sent: both sides use peft's ``alpha / r`` with r read from B's shape,
and :func:`~fed_iotlm.llm.fedlora.load_lora_factors` rejects a mismatch with the model.
Half precision has no numpy dtype, so everything travels as float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .fedlora import LoraFactors, Site

SEP = "|"
KINDS = ("A", "B", "sensor", "resA", "resB")


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def pack(
    factors: Site,
    sensor: Mapping[str, Tensor] | None = None,
    residual: Mapping[str, LoraFactors] | None = None,
    b_only: bool = False,
) -> dict[str, np.ndarray]:
    """One flat dict for the wire; empty parts are simply absent."""
    out: dict[str, np.ndarray] = {}
    for name, f in factors.items():
        if not b_only:
            out[f"A{SEP}{name}"] = _np(f.A)
        out[f"B{SEP}{name}"] = _np(f.B)
    out.update({f"sensor{SEP}{k}": _np(v) for k, v in (sensor or {}).items()})
    for name, r in (residual or {}).items():
        if not isinstance(r, LoraFactors):
            raise TypeError(f"residual {name!r} must be stacked LoraFactors, not {type(r)}")
        out[f"resA{SEP}{name}"] = _np(r.A)
        out[f"resB{SEP}{name}"] = _np(r.scaling * r.B)
    return out


def unpack(
    arrays: Mapping[str, np.ndarray], alpha: float, shared_a: Site | None = None
) -> tuple[Site, dict[str, Tensor], dict[str, LoraFactors]]:
    """(factors, sensor state, residual) from :func:`pack`'s dict; unknown keys raise.

    A layer that came without ``A`` (FFA) takes it from ``shared_a``; without one it raises."""
    parts: dict[str, dict[str, Tensor]] = {kind: {} for kind in KINDS}
    for key, value in arrays.items():
        kind, sep, name = key.partition(SEP)
        if not sep or kind not in parts:
            raise KeyError(f"unexpected federated LoRA array {key!r}")
        parts[kind][name] = torch.from_numpy(np.array(value, dtype=np.float32))
    if unknown := sorted(set(parts["A"]) - set(parts["B"])):
        raise KeyError(f"layers with A but no B: {unknown}")
    if set(parts["resA"]) != set(parts["resB"]):
        raise KeyError(
            f"residual with one factor: {sorted(set(parts['resA']) ^ set(parts['resB']))}"
        )
    a = dict(parts["A"])
    for name in sorted(set(parts["B"]) - set(a)):
        if shared_a is None or name not in shared_a:
            raise KeyError(f"layer {name!r} came without A and no shared A was given")
        a[name] = shared_a[name].A.to(torch.float32)
    factors = {n: LoraFactors(a[n], b, alpha / b.shape[1]) for n, b in parts["B"].items()}
    residual = {n: LoraFactors(ra, parts["resB"][n], 1.0) for n, ra in parts["resA"].items()}
    return factors, parts["sensor"], residual
