"""Aggregating peft LoRA adapters trained on several sites (federated LoRA).

Every adapted linear layer carries ΔW = s·B·A (A: [r, in], B: [out, r], s = lora_alpha/r).
The exact federated update is Σ p_k s_k B_k A_k with p_k = n_k/Σn, but that is a rank-Σr_k
matrix, not a LoRA pair, so each method trades exactness for staying in LoRA form:

- ``fedit``: average A and B separately. Inexact, because mean(B)·mean(A) ≠ mean(B·A):
  the product drops the cross terms B_j A_k (j ≠ k) mixing and the variance of the factors.
- ``ffa`` (FFA-LoRA): A stays frozen at a shared init, so ΔW is linear in B and averaging B
  is exact. Sites whose A differ break that premise, so they are rejected.
- ``fedex`` (FedEx-LoRA): FedIT plus the residual s·(Σp B A − mean(B)mean(A)) per layer,
  added beside the frozen base weight, which makes the whole update exact.  The residual
  is kept and shipped as *stacked factors* ([p_1 s B_1 … p_N s B_N, −s B̄] and
  [A_1; …; A_N; Ā], rank (N+1)·r), never as a dense [out, in] matrix.
- ``flexlora`` (FlexLoRA): form the exact ΔW, then truncated-SVD it back to each site's own
  rank r_k, so heterogeneous ranks can share one update; it loses the SVD tail beyond r_k.

Nothing here materialises an [out, in] matrix unless asked (``dense_check``): norms of
factored matrices come from their small Gram matrices and FlexLoRA's SVD from two QRs, so
an 8B all-linear set-up aggregates in the factors' memory, not the weights'.
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
    ``residual`` holds per-layer corrections beside the frozen base weight (fedex only) as
    stacked factors (``residual[n].delta()`` is the [out, in] correction) and ``error`` the
    Frobenius distance to the exact update Σ p_k s_k B_k A_k per layer, computed from the
    factors; for flexlora it is the worst site's (the smallest rank's) truncation error.
    ``dense_error`` is the same distance measured on materialised matrices (diagnostics).
    """

    per_site: list[Site]
    residual: dict[str, LoraFactors] = field(default_factory=dict)  # stacked, scaling 1
    error: dict[str, float] = field(default_factory=dict)
    dense_error: dict[str, float] = field(default_factory=dict)  # only with dense_check


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


def _stacked_exact(layer: list[LoraFactors], p: Tensor) -> LoraFactors:
    """Σ p_k s_k B_k A_k as one pair of concatenated factors (scaling 1; mixed ranks work)."""
    dt = _WORK.get(layer[0].A.dtype, layer[0].A.dtype)
    coef = [float(pk) * f.scaling for pk, f in zip(p, layer, strict=True)]
    big_b = torch.cat([c * f.B.to(dt) for c, f in zip(coef, layer, strict=True)], dim=1)
    big_a = torch.cat([f.A.to(dt) for f in layer], dim=0)
    return LoraFactors(big_a, big_b, 1.0)


def _exact_delta(layer: list[LoraFactors], p: Tensor) -> Tensor:
    """The dense Σ p_k s_k B_k A_k ([out, in]); only for diagnostics and small tests."""
    return _stacked_exact(layer, p).delta()


def stack(parts: list[LoraFactors], signs: list[float] | None = None) -> LoraFactors:
    """Σ_i sign_i s_i B_i A_i as one pair of concatenated factors (scaling 1)."""
    signs = signs or [1.0] * len(parts)
    dt = _WORK.get(parts[0].A.dtype, parts[0].A.dtype)
    big_b = torch.cat([g * f.scaling * f.B.to(dt) for g, f in zip(signs, parts, strict=True)], 1)
    return LoraFactors(torch.cat([f.A.to(dt) for f in parts], 0), big_b, 1.0)


def factored_norm(f: LoraFactors) -> float:
    """‖s·B·A‖_F from the Gram matrices (BᵀB ⊙ AAᵀ summed), never forming [out, in].

    float64, because a residual is a difference of nearly equal products."""
    a, b = f.A.double(), f.B.double()
    sq = float(((b.T @ b) * (a @ a.T)).sum()) * f.scaling**2
    return math.sqrt(max(sq, 0.0))


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


def _flexlora(
    name: str, layer: list[LoraFactors], exact: LoraFactors
) -> tuple[list[LoraFactors], float]:
    """Best rank-r_k approximation of the exact ΔW for each site, in that site's scaling,
    and the smallest rank's truncation error.

    The SVD of B·A comes from QR(B) = Q₁R₁, QR(Aᵀ) = Q₂R₂ and the small SVD of R₁R₂ᵀ,
    so the [out, in] product is never formed."""
    q1, r1 = torch.linalg.qr(exact.B.double())
    q2, r2 = torch.linalg.qr(exact.A.double().T)
    uu, s, vvh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    u, vh = q1 @ uu, vvh @ q2.T
    out = []
    for k, f in enumerate(layer):
        if f.rank > min(f.B.shape[0], f.A.shape[1]):
            raise ValueError(f"layer {name!r}, site {k}: rank {f.rank} > min(out, in)")
        keep = min(f.rank, s.numel())
        root = torch.zeros(f.rank, dtype=s.dtype)
        root[:keep] = (s[:keep] / f.scaling).sqrt()
        b = torch.zeros(f.B.shape[0], f.rank, dtype=s.dtype)
        a = torch.zeros(f.rank, f.A.shape[1], dtype=s.dtype)
        b[:, :keep], a[:keep] = u[:, :keep] * root[:keep], root[:keep, None] * vh[:keep]
        out.append(LoraFactors(a.to(f.A.dtype), b.to(f.B.dtype), f.scaling))
    smallest = min(f.rank for f in layer)
    return out, float(s[smallest:].norm())


def aggregate_lora(
    sites: list[Site], weights: list[float], method: str, dense_check: bool = False
) -> LoraAggregate:
    """Aggregate per-site LoRA factors with ``method`` (one of METHODS), weighted by n_k.

    ``dense_check`` also measures each error on materialised [out, in] matrices (off by
    default: for an 8B all-linear model that is the whole weight set in fp32)."""
    if method not in METHODS:
        raise ValueError(f"unknown LoRA aggregation method {method!r}; choose one of {METHODS}")
    p = _normalised(weights, len(sites))
    names = _check_sites(sites, same_rank=method != "flexlora")
    per_site: list[Site] = [{} for _ in sites]
    agg = LoraAggregate(per_site)
    for name in names:
        layer = [site[name] for site in sites]
        exact = _stacked_exact(layer, p)
        if method == "flexlora":
            new, agg.error[name] = _flexlora(name, layer, exact)
        else:
            if method == "ffa":
                _check_shared_a(name, layer)
            new = [_averaged(layer, p, keep_a=method == "ffa")] * len(sites)
            gap = stack([exact, new[0]], [1.0, -1.0])  # exact − s·B̄Ā, factored
            if method == "fedex":
                agg.residual[name] = gap
                agg.error[name] = 0.0  # applied = s·B̄Ā + gap = exact, by construction
            else:
                agg.error[name] = factored_norm(gap)
        if dense_check:
            dense = exact.delta()
            applied = [f.delta().to(dense) for f in new]
            if name in agg.residual:
                applied = [d + agg.residual[name].delta().to(dense) for d in applied]
            agg.dense_error[name] = max(float(torch.linalg.norm(dense - d)) for d in applied)
        for site_dict, f in zip(per_site, new, strict=True):
            site_dict[name] = f
    if method != "flexlora":
        agg.per_site = [per_site[0]] * len(sites)
    return agg


def truncate_to(exact: dict[str, LoraFactors], like: Site) -> Site:
    """FlexLoRA's share of the global ΔW (``exact``, :func:`exact_update`) for a site
    shaped like ``like`` (its rank and scaling): what :func:`aggregate_lora` gives an
    answering site, for a site that did not answer the round."""
    return {name: _flexlora(name, [like[name]], exact[name])[0][0] for name in sorted(like)}


def exact_update(sites: list[Site], weights: list[float]) -> dict[str, LoraFactors]:
    """Σ p_k s_k B_k A_k per layer (mixed ranks allowed) as stacked factors (scaling 1):
    the update every method approximates; ``.delta()`` gives the dense matrix.

    FlexLoRA's server holds exactly this full-rank ΔW (sites only get its truncations), so
    it is also what a server-side evaluation of the FlexLoRA global model adds."""
    p = _normalised(weights, len(sites))
    names = _check_sites(sites, same_rank=False)
    return {name: _stacked_exact([site[name] for site in sites], p) for name in names}


def round_update_norm(sites: list[Site], starts: list[Site], weights: list[float]) -> float:
    """‖Σ p_k (s B_k A_k − s B⁰_k A⁰_k)‖_F over all layers: how far this round moved ΔW.

    The aggregation error divided by this is meaningful round after round; divided by
    ‖Σ p s B A‖ (the whole adapter so far) it shrinks just because the adapter grows."""
    p = _normalised(weights, len(sites))
    total = 0.0
    for name in _check_sites(sites, same_rank=False):
        parts = [s[name] for s in sites] + [s[name] for s in starts]
        signs = [float(pk) for pk in p] + [-float(pk) for pk in p]
        total += factored_norm(stack(parts, signs)) ** 2
    return math.sqrt(total)


def fedit_error(sites: list[Site], weights: list[float]) -> dict[str, float]:
    """‖Σp s B A − s·mean(B)·mean(A)‖_F per layer: how much plain FedIT averaging loses."""
    p = _normalised(weights, len(sites))
    errors = {}
    for name in _check_sites(sites, same_rank=True):
        layer = [site[name] for site in sites]
        gap = stack([_stacked_exact(layer, p), _averaged(layer, p)], [1.0, -1.0])
        errors[name] = factored_norm(gap)
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


RESIDUAL_ATTR = "_fedex_residual"  # where a LoRA layer keeps its fp32 side residual


def _add_side_residual(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """Forward hook on a base layer: output + x·(B_res A_res)ᵀ computed in fp32.

    Autocast is switched off so a bf16 run cannot round the residual path; only the sum
    is cast to the output's dtype, like any other activation."""
    res: LoraFactors = getattr(module, RESIDUAL_ATTR)
    x = inputs[0]
    if res.A.device != x.device:
        res.A, res.B = res.A.to(x.device), res.B.to(x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        extra = (x.to(torch.float32) @ res.A.T) @ res.B.T
    return output + (res.scaling * extra).to(output.dtype)


def fold_residual(
    model: nn.Module, residual: dict[str, LoraFactors], adapter: str = "default"
) -> None:
    """Attach FedEx-LoRA residuals (stacked factors) beside the frozen base weights.

    The residual is full rank, so it cannot live in the adapter.  It is kept in fp32 on
    the base layer (a forward hook adds x·Rᵀ) and the base weight is never touched: added
    into a bf16 weight, a residual below half an ulp would vanish.  Calling again replaces
    the residual (the server always sends the cumulative one); :func:`effective_weight`
    gives the merged weight in fp32 for export."""
    layers = _lora_layers(model, adapter)
    targets = {}
    for name, r in residual.items():
        if name not in layers:
            raise ValueError(f"residual for unknown LoRA layer {name!r}")
        if not isinstance(r, LoraFactors):
            raise TypeError(f"layer {name!r}: residual must be stacked LoraFactors, not {type(r)}")
        base = layers[name].get_base_layer()
        shape = (base.out_features, base.in_features) if hasattr(base, "in_features") else None
        got = (r.B.shape[0], r.A.shape[1])
        if r.B.shape[1] != r.A.shape[0] or (shape is not None and got != shape):
            raise ValueError(
                f"layer {name!r}: residual A {tuple(r.A.shape)}, B {tuple(r.B.shape)} do not "
                f"make the base's [out, in] {shape}"
            )
        targets[name] = base
    for name, base in targets.items():
        r = residual[name]
        side = LoraFactors(
            r.A.detach().to(torch.float32), r.B.detach().to(torch.float32), r.scaling
        )
        setattr(base, RESIDUAL_ATTR, side)
        if not getattr(base, "_fedex_hooked", False):
            base.register_forward_hook(_add_side_residual)
            base._fedex_hooked = True


def effective_weight(model: nn.Module, name: str, adapter: str = "default") -> Tensor:
    """The layer's weight in peft's [out, in] orientation, in fp32: base + side residual +
    s·B·A (what the layer computes; what an export should write)."""
    layer = _lora_layers(model, adapter)[name]
    base = layer.get_base_layer()
    w = base.weight.detach().to(torch.float32)
    w = w.T if getattr(layer, "fan_in_fan_out", False) else w
    if (res := getattr(base, RESIDUAL_ATTR, None)) is not None:
        w = w + res.delta().to(w)
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return w + float(layer.scaling[adapter]) * (b.detach().float() @ a.detach().float())
