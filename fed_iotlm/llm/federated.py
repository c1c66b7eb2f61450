"""Federated LoRA rounds: what a site trains and what the server keeps between rounds.

One round, server → every site k → server (a site that fails or misses the deadline is
left out of that round's aggregate; :mod:`server.lora_step`):

* down: the LoRA factors site k loads (rank r_k; one shared pair per layer except for
  FlexLoRA), the sensor projector/adapter state and, for FedEx, the **cumulative** residual
  C_{t-1} = Σ_{q<t} R_q with ``version`` t−1 (the number of rounds folded into it), as
  stacked factors (rank (N+1)·r per round folded in, never a dense [out, in] matrix);
  FFA-LoRA sends B only: A is regenerated on the site from the shared seed;
* up: the trained factors (FFA: B only), the projector state, n_k and the mean loss.

Sites are stateless: each round they build the model on the *pristine* base weights W0,
add C_{t-1} beside them in fp32 (:func:`prepare_site`), load the factors, and train.  The
cumulative residual costs t·(N+1)·r·(out+in) floats per layer in round t+1, more than the
round's own R_t, but it cannot double- or under-fold when a site restarts or misses a
round; for the default 3 rounds it stays far below one dense [out, in] matrix.  Its
``version`` counts the rounds aggregated, so after a skipped round it is below t−1.

A round aggregates the sites that answered (N is their number that round): the new
factors, residual and projector go to every site, those that were absent too (FlexLoRA:
each absent site gets the new global ΔW truncated to its own rank).

FedEx exactness: sites start round t from W0 + C_{t-1} + s·B̄A̅ and return (A_k, B_k); the
exact federated model is W0 + C_{t-1} + E_t with E_t = Σ p_k s B_k A_k.  The server sets
C_t = C_{t-1} + (E_t − s·B̄_t A̅_t), so W0 + C_t + s·B̄_t A̅_t equals it exactly.

The sensor projector is plain FedAvg (weighted by n_k); it is small and dense, so the
LoRA-specific aggregation only concerns the factors.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from fed_iotlm.config_schema import section

from .features import SensorFeatures
from .fedlora import (
    METHODS,
    LoraFactors,
    Site,
    aggregate_lora,
    exact_update,
    factored_norm,
    fedit_error,
    fold_residual,
    load_lora_factors,
    lora_factors,
    round_update_norm,
    stack,
    truncate_to,
)
from .instructions import Example
from .sensor_lm import SensorLM
from .sequences import SequenceBuilder
from .tuning import TuneSettings, tune


@dataclass(frozen=True)
class FederatedSettings:
    """``llm.federated``: the aggregation method, rounds, local steps, per-site ranks, and
    how a round treats sites that fail or stay silent (``min_sites``, ``round_timeout_s``,
    as ``strategy.min_nodes``/``round_timeout_s`` do for the federation)."""

    method: str = "fedit"
    rounds: int = 3
    local_steps: int = 50
    ranks: tuple[int, ...] | None = None  # per partition id (flexlora); None: llm.lora.r
    dense_diagnostics: bool = False  # also measure errors on dense [out, in] matrices
    min_sites: int | None = None  # fewest replies a round aggregates; None: every site
    round_timeout_s: float = 3600.0  # how long a round waits for the sites' replies

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"llm.federated.method={self.method!r}; choose one of {METHODS}")
        if self.rounds < 1 or self.local_steps < 1:
            raise ValueError("llm.federated.rounds and local_steps must be at least 1")
        if self.ranks is not None and any(r < 1 for r in self.ranks):
            raise ValueError(f"llm.federated.ranks must be positive, got {list(self.ranks)}")
        if self.min_sites is not None and (isinstance(self.min_sites, bool) or self.min_sites < 1):
            raise ValueError(f"llm.federated.min_sites must be at least 1, got {self.min_sites!r}")
        if not math.isfinite(self.round_timeout_s) or self.round_timeout_s <= 0:
            raise ValueError(
                f"llm.federated.round_timeout_s must be > 0 and finite, got {self.round_timeout_s!r}"
            )

    def min_replies(self, num_sites: int) -> int:
        """Fewest replies a round aggregates among ``num_sites`` (more than exist: an error)."""
        if self.min_sites is None:
            return num_sites
        if self.min_sites > num_sites:
            raise ValueError(
                f"llm.federated.min_sites={self.min_sites} but the run has {num_sites} sites"
            )
        return self.min_sites

    def site_ranks(self, num_sites: int, default: int) -> list[int]:
        """r_k per partition id; only FlexLoRA can aggregate different ranks."""
        if self.ranks is None:
            return [default] * num_sites
        if len(self.ranks) != num_sites:
            raise ValueError(
                f"llm.federated.ranks has {len(self.ranks)} ranks for {num_sites} sites"
            )
        if self.method != "flexlora" and len(set(self.ranks)) > 1:
            raise ValueError(
                f"{self.method} needs one rank on every site; only flexlora mixes ranks"
            )
        return list(self.ranks)


def federated_settings(lc: Mapping) -> FederatedSettings:
    """From the ``llm`` config block (missing keys take the schema's defaults)."""
    fc = section("llm.federated", lc.get("federated"))  # absent: the schema's
    ranks = fc["ranks"]
    return FederatedSettings(
        method=str(fc["method"]),
        rounds=int(fc["rounds"]),
        local_steps=int(fc["local_steps"]),
        ranks=None if ranks is None else tuple(int(r) for r in ranks),
        dense_diagnostics=bool(fc["dense_diagnostics"]),
        min_sites=None if fc["min_sites"] is None else int(fc["min_sites"]),
        round_timeout_s=float(fc["round_timeout_s"]),
    )


# ----------------------------------------------------------------------------- site


@dataclass
class SitePayload:
    """What the server sends a site for one round (see the module docstring)."""

    factors: Site
    sensor: dict[str, Tensor]
    residual: dict[str, LoraFactors] = field(default_factory=dict)  # cumulative C_{t-1}
    version: int = 0  # rounds folded into ``residual``
    freeze_a: bool = False  # FFA-LoRA


@dataclass
class SiteUpdate:
    """What a site sends back: its trained factors and projector, n_k and mean loss."""

    factors: Site
    sensor_state: dict[str, Tensor]
    n: int
    loss: float


def freeze_lora_a(model: SensorLM, adapter: str = "default") -> None:
    """FFA-LoRA: A stays at the shared init, which makes averaging B exact.

    ``tune`` builds its optimiser from ``requires_grad`` parameters only, so a frozen A
    gets no update, no momentum and no weight decay; ``lora_a_frozen`` keeps ``tune``'s
    :meth:`~fed_iotlm.llm.sensor_lm.SensorLM.set_lora_trainable` from unfreezing it."""
    if adapter == model.adapter_name:
        model.lora_a_frozen = True
    for name, param in model.peft.named_parameters():
        if f".lora_A.{adapter}." in name:
            param.requires_grad_(False)


def site_tune_settings(
    base: TuneSettings, local_steps: int, rnd: int, rounds: int, site: int, seed: int
) -> TuneSettings:
    """Round ``rnd``'s (1-based) local training settings: ``local_steps`` steps that continue
    one warm-up + cosine schedule over ``rounds × local_steps`` global steps, so round r
    starts at global step (r − 1) × local_steps instead of restarting warm-up each round."""
    if not 1 <= rnd <= rounds:
        raise ValueError(f"round {rnd} outside 1..{rounds}")
    total = rounds * local_steps
    return replace(
        base,
        steps=local_steps,
        warmup=min(base.warmup, total),
        schedule_start=(rnd - 1) * local_steps,
        schedule_steps=total,
        log_every=local_steps,
        seed=seed * 1_000_003 + rnd * 1_009 + site,
    )


def prepare_site(model: SensorLM, payload: SitePayload) -> None:
    """Turn a freshly built model (pristine base, any LoRA init) into this round's start."""
    fold_residual(model.peft, payload.residual)
    load_lora_factors(model.peft, payload.factors)
    model.load_sensor_state(payload.sensor)
    if payload.freeze_a:
        freeze_lora_a(model)


def train_site(
    model: SensorLM,
    builder: SequenceBuilder,
    examples: Sequence[Example],
    feats: SensorFeatures,
    settings: TuneSettings,
    device: torch.device | str = "cpu",
) -> SiteUpdate:
    """Local LoRA + projector training (``settings.steps`` steps); the model is trained in place.

    Frozen LoRA factors (FFA) are checked to come back bit-identical, since a silently
    moved A would make the server's FFA aggregation raise or, worse, be inexact."""
    frozen = {
        n: p.detach().clone()
        for n, p in model.peft.named_parameters()
        if "lora_" in n and not p.requires_grad
    }
    with tempfile.TemporaryDirectory() as tmp:  # tune always checkpoints its last step
        hist = tune(
            model, builder, examples, feats, replace(settings, checkpoint_every=10**9),
            Path(tmp) / "ckpt", device=device,
        )  # fmt: skip
    params = dict(model.peft.named_parameters())
    moved = [
        n for n, before in frozen.items() if not torch.equal(params[n].detach().to(before), before)
    ]
    if moved:
        raise RuntimeError(f"frozen LoRA factors changed during local training: {moved[:3]}")
    factors = {
        n: LoraFactors(f.A.cpu(), f.B.cpu(), f.scaling) for n, f in lora_factors(model.peft).items()
    }
    steps = [h["loss"] for h in hist]
    loss = sum(steps) / len(steps) if steps else float("nan")
    sensor = {k: v.clone() for k, v in model.sensor_state().items()}  # CPU: no copy otherwise
    return SiteUpdate(factors, sensor, len(examples), loss)


# --------------------------------------------------------------------------- server


@dataclass
class RoundReport:
    """One aggregation: losses and how far the applied update is from the exact one.

    Errors are Frobenius norms over all adapted layers together (√Σ_layers ‖·‖²);
    ``exact_norm`` is ‖Σ p s B A‖ on the same layers (the whole adapter so far) and
    ``update_norm`` ‖Σ p (s B A − s B⁰A⁰)‖, how far this round moved ΔW from what the sites
    loaded; ``rel_error`` = agg_error / update_norm is the figure to compare across rounds.
    ``dense_error`` is agg_error measured on dense matrices (``dense_diagnostics`` only)."""

    round: int
    loss: float
    agg_error: float
    fedit_error: float | None  # what plain FedIT would have lost on the same replies
    exact_norm: float
    sites: dict[str, dict[str, float]]
    update_norm: float = 0.0
    rel_error: float = 0.0
    dense_error: float | None = None


def _total(per_layer: Mapping[str, float]) -> float:
    return math.sqrt(sum(v * v for v in per_layer.values()))


def average_states(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """FedAvg of state dicts weighted by n_k; non-float entries are taken from the first."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(
                float(w) / total * s[key].float() for s, w in zip(states, weights, strict=True)
            ).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def initial_factors(template: Site, rank: int, alpha: float, seed: int) -> Site:
    """peft's default init at ``rank``: A Kaiming-uniform, B = 0, so ΔW starts at 0 on every site."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, f in sorted(template.items()):
        bound = 1.0 / math.sqrt(f.A.shape[1])  # kaiming_uniform_(a=√5) on [rank, in]
        a = (torch.rand(rank, f.A.shape[1], generator=g) * 2 - 1) * bound
        out[name] = LoraFactors(
            a.to(f.A.dtype), torch.zeros(f.B.shape[0], rank, dtype=f.B.dtype), alpha / rank
        )
    return out


class LoraServerState:
    """The server's memory between rounds: per-site factors, projector, FedEx residual.

    ``factors[k]`` is what site k loads next round (the same dict for every site except
    with FlexLoRA), ``residual`` the cumulative FedEx residual C_t with ``version`` t, and
    ``exact`` the last round's exact update Σ p s B A (FlexLoRA's full-rank global ΔW).
    """

    def __init__(
        self,
        method: str,
        factors: dict[int, Site],
        sensor: dict[str, Tensor],
        dense_diagnostics: bool = False,
        a_seed: int | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        self.method = method
        self.factors = factors
        self.sensor = sensor
        self.residual: dict[str, LoraFactors] = {}
        self.version = 0
        self.exact: dict[str, LoraFactors] = {}
        self.dense_diagnostics = dense_diagnostics
        self.a_seed = a_seed  # FFA: the seed every site regenerates the frozen A from

    @classmethod
    def start(
        cls,
        method: str,
        template: Site,
        sensor: dict[str, Tensor],
        ranks: Mapping[int, int],
        alpha: float,
        seed: int = 0,
        dense_diagnostics: bool = False,
    ) -> LoraServerState:
        """Round-0 state: every site starts from the same ΔW = 0 (shared A for all but FlexLoRA).

        FFA's A comes from :func:`initial_factors` with ``seed``, so a site rebuilds it
        bit-identically from the seed and A never travels."""
        rank = next(iter(template.values())).rank
        a_seed = None
        if method == "flexlora":
            factors = {k: initial_factors(template, r, alpha, seed + r) for k, r in ranks.items()}
        else:
            if any(r != rank for r in ranks.values()):
                raise ValueError(f"{method} needs rank {rank} on every site, got {dict(ranks)}")
            if method == "ffa":
                a_seed = seed
                template = initial_factors(template, rank, alpha, a_seed)
            factors = {k: template for k in ranks}
        sensor = {k: v.clone() for k, v in sensor.items()}
        return cls(method, factors, sensor, dense_diagnostics, a_seed)

    def payload(self, site: int) -> SitePayload:
        return SitePayload(
            self.factors[site], self.sensor, self.residual, self.version, self.method == "ffa"
        )

    def aggregate(self, rnd: int, updates: Mapping[int, SiteUpdate]) -> RoundReport:
        """Aggregate round ``rnd``'s replies (keyed by partition id; the sites that
        answered, at least one) and advance the state of every site.

        The report is the round's, handed out: the round's record keeps it
        (:mod:`server.lora_step`), this state keeps only what the next round needs."""
        unknown = sorted(set(updates) - set(self.factors))
        if unknown or not updates:
            raise ValueError(
                f"round {rnd}: replies from sites {sorted(updates)}, expected a non-empty "
                f"subset of {sorted(self.factors)}"
            )
        order = sorted(updates)
        sites = [updates[k].factors for k in order]
        weights = [float(updates[k].n) for k in order]
        agg = aggregate_lora(sites, weights, self.method, self.dense_diagnostics)
        self.exact = exact_update(sites, weights)
        same_rank = len({f.rank for s in sites for f in s.values()}) == 1
        fedit = _total(fedit_error(sites, weights)) if same_rank else None
        moved = round_update_norm(sites, [self.factors[k] for k in order], weights)
        new = dict(zip(order, agg.per_site, strict=True))
        for k in sorted(set(self.factors) - set(new)):  # absent this round: the new global too
            new[k] = (
                truncate_to(self.exact, self.factors[k])
                if self.method == "flexlora"
                else agg.per_site[0]
            )
        self.factors = new
        for name, r in agg.residual.items():
            self.residual[name] = stack([self.residual[name], r]) if name in self.residual else r
        if self.method == "fedex":
            self.version += 1
        self.sensor = average_states([updates[k].sensor_state for k in order], weights)
        agg_error = _total(agg.error)
        return RoundReport(
            round=rnd,
            loss=sum(w * updates[k].loss for k, w in zip(order, weights, strict=True))
            / sum(weights),
            agg_error=agg_error,
            fedit_error=fedit,
            exact_norm=_total({n: factored_norm(d) for n, d in self.exact.items()}),
            update_norm=moved,
            rel_error=agg_error / moved if moved > 0 else 0.0,
            dense_error=_total(agg.dense_error) if agg.dense_error else None,
            sites={
                str(k): {
                    "loss": updates[k].loss,
                    "n": updates[k].n,
                    "rank": next(iter(s.values())).rank,
                }
                for k, s in zip(order, sites, strict=True)
            },
        )


def load_global(model: SensorLM, state: LoraServerState) -> None:
    """The server's global model on a freshly built model (pristine base, template rank).

    FedIT/FFA/FedEx: the shared factors (plus C_t for FedEx).  FlexLoRA's server holds the
    full-rank ΔW = Σ p s B A, which no single LoRA rank can carry, so it goes beside the
    base weights (stacked factors, fp32) with the adapter zeroed."""
    if state.method == "flexlora":
        zero = {
            n: LoraFactors(f.A, torch.zeros_like(f.B), f.scaling)
            for n, f in lora_factors(model.peft).items()
        }
        load_lora_factors(model.peft, zero)
        fold_residual(model.peft, state.exact)
    else:
        fold_residual(model.peft, state.residual)
        load_lora_factors(model.peft, next(iter(state.factors.values())))
    model.load_sensor_state(state.sensor)
