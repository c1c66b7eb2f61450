"""Aggregating peft LoRA adapters trained on several sites (federated LoRA).

Every adapted linear layer carries ΔW = s·B·A (A: [r, in], B: [out, r], s = lora_alpha/r).
The exact federated update is Σ p_k s_k B_k A_k with p_k = n_k/Σn, but that is a rank-Σr_k
matrix, not a LoRA pair, so each method trades exactness for staying in LoRA form:

- ``fedit``: average A and B separately. Inexact, because mean(B)·mean(A) ≠ mean(B·A):
  the product drops the cross terms B_j A_k (j ≠ k) mixing and the variance of the factors.
- ``ffa`` (FFA-LoRA): A stays frozen at a shared init, so ΔW is linear in B and averaging B
  is exact. Sites whose A differ break that premise, so they are rejected.
- ``fedex`` (FedEx-LoRA): FedIT plus the residual s·(Σp B A − mean(B)mean(A)) per layer,
  folded into the frozen base weight, which makes the whole update exact.
- ``flexlora`` (FlexLoRA): form the exact ΔW, then truncated-SVD it back to each site's own
  rank r_k, so heterogeneous ranks can share one update; it loses the SVD tail beyond r_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

METHODS = ("fedit", "ffa", "fedex", "flexlora")
SHARED_A_TOL = 1e-6
# Half-precision sums and SVDs are too lossy for an exactness claim: compute in float32.
_WORK = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


@dataclass
class LoraFactors:
    """One adapted layer's LoRA pair; ``delta()`` is what it adds to the base weight."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        return self.scaling * (self.B @ self.A)


Site = dict[str, LoraFactors]  # one site's adapter: peft module name -> factors


@dataclass
class LoraAggregate:
    """Result of one aggregation round.

    ``per_site[k]`` is what site k loads next round (one shared dict except for flexlora),
    ``residual`` holds per-layer corrections for the frozen base weight (fedex only) and
    ``error`` the Frobenius distance to the exact update Σ p_k s_k B_k A_k per layer; for
    flexlora it is the worst site's (i.e. the smallest rank's) truncation error.
    """

    per_site: list[Site]
    residual: dict[str, Tensor] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)


def _normalised(weights: list[float], n_sites: int) -> Tensor:
    """p_k = n_k / Σn, after checking there is one positive, finite weight per site."""
    if n_sites == 0:
        raise ValueError("no sites to aggregate")
    if len(weights) != n_sites:
        raise ValueError(f"got {len(weights)} weights for {n_sites} sites")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"site weights must be positive and finite, got {list(weights)}")
    p = torch.tensor(weights, dtype=torch.float64)
    return p / p.sum()


def _mismatch(f: LoraFactors, ref: LoraFactors, same_rank: bool) -> str | None:
    """Why ``f`` cannot be aggregated with site 0's ``ref`` (None if it can)."""
    shape, ref_shape = (f.B.shape[0], f.A.shape[1]), (ref.B.shape[0], ref.A.shape[1])
    if f.A.ndim != 2 or f.B.shape[1:] != f.A.shape[:1]:
        return f"A {tuple(f.A.shape)} and B {tuple(f.B.shape)} are not a LoRA pair"
    if shape != ref_shape:
        return f"ΔW shape {shape} != site 0's {ref_shape}"
    if same_rank and f.rank != ref.rank:
        return f"rank {f.rank} != site 0's {ref.rank} (only flexlora mixes ranks)"
    if same_rank and not math.isclose(f.scaling, ref.scaling, rel_tol=1e-9):
        return f"scaling {f.scaling} != site 0's {ref.scaling}"
    return None


def _check_sites(sites: list[Site], same_rank: bool) -> list[str]:
    """Layer names shared by all sites; every mismatch names the layer and the site index."""
    names = sorted(sites[0])
    for k, site in enumerate(sites):
        if set(site) != set(names):
            raise ValueError(f"site {k} layers differ: {sorted(set(site) ^ set(names))}")
        for name in names:
            if problem := _mismatch(site[name], sites[0][name], same_rank):
                raise ValueError(f"layer {name!r}, site {k}: {problem}")
    return names


def _wmean(tensors: list[Tensor], p: Tensor) -> Tensor:
    """Weighted mean over sites of equally shaped tensors, via one stacked contraction."""
    stack = torch.stack([t.to(_WORK.get(t.dtype, t.dtype)) for t in tensors])
    return torch.einsum("k,k...->...", p.to(stack), stack)


def _exact_delta(layer: list[LoraFactors], p: Tensor) -> Tensor:
    """Σ p_k s_k B_k A_k as one product of concatenated factors (works for mixed ranks)."""
    dt = _WORK.get(layer[0].A.dtype, layer[0].A.dtype)
    coef = [float(pk) * f.scaling for pk, f in zip(p, layer, strict=True)]
    big_b = torch.cat([c * f.B.to(dt) for c, f in zip(coef, layer, strict=True)], dim=1)
    big_a = torch.cat([f.A.to(dt) for f in layer], dim=0)
    return big_b @ big_a


def _averaged(layer: list[LoraFactors], p: Tensor, keep_a: bool = False) -> LoraFactors:
    """Factor-wise weighted means (FedIT); ``keep_a`` keeps site 0's A bit-exact (FFA)."""
    a = layer[0].A.clone() if keep_a else _wmean([f.A for f in layer], p).to(layer[0].A.dtype)
    b = _wmean([f.B for f in layer], p).to(layer[0].B.dtype)
    return LoraFactors(a, b, layer[0].scaling)


def _check_shared_a(name: str, layer: list[LoraFactors]) -> None:
    """FFA-LoRA is exact only if every site kept A at the same frozen init."""
    gap = (torch.stack([f.A for f in layer]) - layer[0].A).abs().flatten(1).amax(dim=1)
    if bool((gap > SHARED_A_TOL).any()):
        k = int((gap > SHARED_A_TOL).nonzero()[0])
        raise ValueError(f"ffa needs a shared frozen A: layer {name!r}, site {k} differs")


def _flexlora(name: str, layer: list[LoraFactors], exact: Tensor) -> list[LoraFactors]:
    """Best rank-r_k approximation of the exact ΔW for each site, in that site's scaling."""
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    out = []
    for k, f in enumerate(layer):
        if f.rank > s.numel():
            raise ValueError(f"layer {name!r}, site {k}: rank {f.rank} > min(out, in)")
        root = (s[: f.rank] / f.scaling).sqrt()
        b, a = u[:, : f.rank] * root, root[:, None] * vh[: f.rank]
        out.append(LoraFactors(a.to(f.A.dtype), b.to(f.B.dtype), f.scaling))
    return out


def aggregate_lora(sites: list[Site], weights: list[float], method: str) -> LoraAggregate:
    """Aggregate per-site LoRA factors with ``method`` (one of METHODS), weighted by n_k."""
    if method not in METHODS:
        raise ValueError(f"unknown LoRA aggregation method {method!r}; choose one of {METHODS}")
    p = _normalised(weights, len(sites))
    names = _check_sites(sites, same_rank=method != "flexlora")
    per_site: list[Site] = [{} for _ in sites]
    residual: dict[str, Tensor] = {}
    error: dict[str, float] = {}
    for name in names:
        layer = [site[name] for site in sites]
        exact = _exact_delta(layer, p)
        if method == "flexlora":
            new = _flexlora(name, layer, exact)
        else:
            if method == "ffa":
                _check_shared_a(name, layer)
            new = [_averaged(layer, p, keep_a=method == "ffa")] * len(sites)
        applied = [f.delta().to(exact) for f in new]
        if method == "fedex":
            residual[name] = (exact - applied[0]).to(layer[0].A.dtype)
            applied = [d + residual[name].to(exact) for d in applied]
        error[name] = max(float(torch.linalg.norm(exact - d)) for d in applied)
        for site_dict, f in zip(per_site, new, strict=True):
            site_dict[name] = f
    if method != "flexlora":
        per_site = [per_site[0]] * len(sites)
    return LoraAggregate(per_site, residual, error)


def exact_update(sites: list[Site], weights: list[float]) -> dict[str, Tensor]:
    """Σ p_k s_k B_k A_k per layer (mixed ranks allowed): the update every method approximates.

    FlexLoRA's server holds exactly this full-rank ΔW (sites only get its truncations), so
    it is also what a server-side evaluation of the FlexLoRA global model folds in.
    """
    p = _normalised(weights, len(sites))
    names = _check_sites(sites, same_rank=False)
    return {name: _exact_delta([site[name] for site in sites], p) for name in names}


def fedit_error(sites: list[Site], weights: list[float]) -> dict[str, float]:
    """‖Σp s B A − s·mean(B)·mean(A)‖_F per layer: how much plain FedIT averaging loses."""
    p = _normalised(weights, len(sites))
    errors = {}
    for name in _check_sites(sites, same_rank=True):
        layer = [site[name] for site in sites]
        exact = _wmean([f.delta() for f in layer], p)
        errors[name] = float(torch.linalg.norm(exact - _averaged(layer, p).delta().to(exact)))
    return errors


def _lora_layers(model: nn.Module, adapter: str) -> dict[str, LoraLayer]:
    """peft module name -> LoRA-wrapped layer holding ``adapter`` (linear layers only)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if module.lora_A[adapter].weight.ndim != 2:
                raise ValueError(f"layer {name!r}: only linear LoRA layers are supported")
            layers[name] = module
    return layers


def lora_factors(model: nn.Module, adapter: str = "default") -> Site:
    """Detached copies of every adapted layer's (A, B, scaling) in a peft model."""
    return {
        name: LoraFactors(
            layer.lora_A[adapter].weight.detach().clone(),
            layer.lora_B[adapter].weight.detach().clone(),
            float(layer.scaling[adapter]),
        )
        for name, layer in _lora_layers(model, adapter).items()
    }


def load_lora_factors(model: nn.Module, factors: Site, adapter: str = "default") -> None:
    """Copy factors into the model in place, all-or-nothing: every layer is checked first.

    peft fixes each layer's rank when the adapter is created, so FlexLoRA factors of another
    rank need a model built with that r rather than a silent reshape.
    """
    layers = _lora_layers(model, adapter)
    if set(layers) != set(factors):
        missing, unknown = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
        raise ValueError(f"LoRA layers differ: missing {missing}, unknown {unknown}")
    pairs = {n: (m.lora_A[adapter].weight, m.lora_B[adapter].weight) for n, m in layers.items()}
    for name, f in factors.items():
        (a, b), s = pairs[name], float(layers[name].scaling[adapter])
        if f.A.shape != a.shape or f.B.shape != b.shape:
            raise ValueError(
                f"layer {name!r}: A {tuple(f.A.shape)}, B {tuple(f.B.shape)} do not fit the model's "
                f"A {tuple(a.shape)}, B {tuple(b.shape)}; a rank change needs a model with r={f.rank}"
            )
        if not math.isclose(f.scaling, s, rel_tol=1e-9):
            raise ValueError(f"layer {name!r}: scaling {f.scaling} != the model's {s}")
    with torch.no_grad():
        for name, f in factors.items():
            pairs[name][0].copy_(f.A)
            pairs[name][1].copy_(f.B)


def fold_residual(model: nn.Module, residual: dict[str, Tensor], adapter: str = "default") -> None:
    """Add FedEx-LoRA residuals ([out, in]) into the frozen base weights in place.

    The residual is full rank, so it cannot live in the adapter; the base weight is the only
    place where the exact average survives the next round of LoRA training.
    """
    layers = _lora_layers(model, adapter)
    targets = {}
    for name, r in residual.items():
        if name not in layers:
            raise ValueError(f"residual for unknown LoRA layer {name!r}")
        weight = layers[name].get_base_layer().weight
        r = r.T if getattr(layers[name], "fan_in_fan_out", False) else r  # GPT-2 style Conv1D
        if r.shape != weight.shape:
            raise ValueError(
                f"layer {name!r}: residual {tuple(r.shape)} != base {tuple(weight.shape)}"
            )
        targets[name] = (weight, r)
    with torch.no_grad():
        for weight, r in targets.values():
            weight.add_(r.to(weight))
