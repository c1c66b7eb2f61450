"""Federated LoRA round mechanics without a model: the lr schedule across rounds and
what FFA-LoRA and FedEx-LoRA put on the wire."""

from __future__ import annotations

import math

import pytest
import torch

from fed_iotlm.llm.federated import initial_factors, site_tune_settings
from fed_iotlm.llm.fedlora import LoraFactors, aggregate_lora
from fed_iotlm.llm.lora_wire import pack, unpack
from fed_iotlm.llm.tuning import TuneSettings, lr_factor, make_scheduler


def _lrs(settings: TuneSettings) -> list[float]:
    """The lr each of this call's optimiser steps uses, read from the real scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    sched = make_scheduler(opt, settings)
    out = []
    for _ in range(settings.steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_the_lr_schedule_continues_across_rounds():
    """Round r starts at global step (r−1)·local_steps of one warm-up + cosine schedule."""
    base = TuneSettings(lr=1e-3, warmup=4)
    rounds, local = 3, 10
    per_round = [
        _lrs(site_tune_settings(base, local, r, rounds, site=0, seed=0)) for r in (1, 2, 3)
    ]
    joined = [lr for lrs in per_round for lr in lrs]
    want = [1e-3 * lr_factor(g, 4, rounds * local) for g in range(rounds * local)]
    assert joined == pytest.approx(want, rel=1e-12)
    # round 2 starts past the warm-up, on the cosine: not at 0 as a restarted warm-up would
    total = rounds * local
    assert per_round[1][0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 6 / (total - 4))))
    assert per_round[2][-1] < per_round[1][-1] < per_round[0][-1]
    assert per_round[0][0] == 0.0  # warm-up only at the start of the federation
    s = site_tune_settings(base, local, 2, rounds, site=1, seed=0)
    assert (s.steps, s.schedule_start, s.schedule_steps) == (local, local, total)
    with pytest.raises(ValueError, match="round 4 outside 1..3"):
        site_tune_settings(base, local, 4, rounds, site=0, seed=0)
    with pytest.raises(ValueError, match="runs past"):
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                       TuneSettings(steps=5, schedule_start=8, schedule_steps=10))  # fmt: skip


def _template() -> dict[str, LoraFactors]:
    """Square and non-square layers, as in an attention block (q: 64→64, v: 64→16)."""
    return {
        "q": LoraFactors(torch.zeros(4, 64), torch.zeros(64, 4), 2.0),
        "v": LoraFactors(torch.zeros(4, 64), torch.zeros(16, 4), 2.0),
    }


def test_ffa_sends_b_only_and_the_site_rebuilds_a_from_the_seed():
    server = initial_factors(_template(), 4, 8.0, seed=5)
    site = initial_factors(_template(), 4, 8.0, seed=5)  # built independently on the site
    assert all(torch.equal(server[n].A, site[n].A) for n in server)
    trained = {n: LoraFactors(f.A, torch.randn_like(f.B), f.scaling) for n, f in server.items()}
    full, b_only = pack(trained), pack(trained, b_only=True)
    assert set(b_only) == {"B|q", "B|v"}
    full_bytes = sum(a.nbytes for a in full.values())
    b_bytes = sum(a.nbytes for a in b_only.values())
    assert b_bytes == 4 * 4 * (64 + 16)  # float32 B's only
    assert b_only["B|q"].nbytes * 2 == full["A|q"].nbytes + full["B|q"].nbytes  # square: halves
    assert b_bytes < 0.5 * full_bytes  # v's A is wider than its B
    got, _, _ = unpack(b_only, 8.0, shared_a=site)
    assert all(
        torch.equal(got[n].A, site[n].A) and torch.equal(got[n].B, trained[n].B) for n in got
    )
    assert all(got[n].scaling == 2.0 for n in got)


def test_fedex_downlink_is_factors_not_a_dense_matrix():
    torch.manual_seed(0)
    sites = [{"q": LoraFactors(torch.randn(4, 512), torch.randn(512, 4), 2.0)} for _ in range(3)]
    agg = aggregate_lora(sites, [1.0, 2.0, 3.0], "fedex")
    wire = pack(agg.per_site[0], residual=agg.residual)
    assert set(wire) == {"A|q", "B|q", "resA|q", "resB|q"}
    assert wire["resA|q"].shape == (16, 512) and wire["resB|q"].shape == (512, 16)
    res_bytes = wire["resA|q"].nbytes + wire["resB|q"].nbytes
    assert res_bytes == 16 * (512 + 512) * 4  # (N+1)·r·(out+in) floats
    assert res_bytes * 16 == 512 * 512 * 4  # a dense residual: out·in floats
    _, _, residual = unpack(wire, 8.0)
    assert torch.allclose(residual["q"].delta(), agg.residual["q"].delta())
