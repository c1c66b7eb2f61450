"""Federated LoRA aggregation against hand-computed exact updates on tiny peft Llama models."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fed_iotlm.llm.fedlora import (
    METHODS,
    RESIDUAL_ATTR,
    LoraFactors,
    aggregate_lora,
    effective_weight,
    factored_norm,
    fedit_error,
    fold_residual,
    load_lora_factors,
    lora_factors,
)

WEIGHTS = [3.0, 1.0, 2.0]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def peft_site(base: LlamaForCausalLM, seed: int, r: int = 4):
    """A site: its own copy of the shared base with randomly initialised A and B (B ≠ 0)."""
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(copy.deepcopy(base), cfg).eval()


@pytest.fixture(scope="module")
def sites(base) -> list[dict[str, LoraFactors]]:
    return [lora_factors(peft_site(base, seed)) for seed in (1, 2, 3)]


def exact_delta(sites, weights, name) -> torch.Tensor:
    """Σ p_k s_k B_k A_k, written out the slow, obvious way."""
    p = [w / sum(weights) for w in weights]
    return sum(pk * s[name].scaling * s[name].B @ s[name].A for pk, s in zip(p, sites, strict=True))


def effective(model, name) -> torch.Tensor:
    layer = model.get_submodule(name)
    return (
        layer.get_base_layer().weight
        + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )


def test_lora_factors_reads_peft_layers(base, sites):
    names = sorted(sites[0])
    assert len(names) == 4  # q_proj and v_proj in each of 2 layers
    assert names[0] == "base_model.model.model.layers.0.self_attn.q_proj"
    q, v = sites[0][names[0]], sites[0][names[1]]
    assert (q.A.shape, q.B.shape, q.rank, q.scaling) == ((4, 32), (32, 4), 4, 2.0)
    assert v.B.shape == (16, 4)  # 2 kv heads × head_dim 8
    assert q.B.abs().sum() > 0
    assert not torch.equal(sites[0][names[0]].A, sites[1][names[0]].A)


def test_round_trip_changes_the_model(base, sites):
    model = peft_site(base, 9)
    ids = torch.arange(8)[None]
    before = model(ids).logits
    load_lora_factors(model, sites[1])
    back = lora_factors(model)
    for name, f in sites[1].items():
        assert torch.equal(back[name].A, f.A) and torch.equal(back[name].B, f.B)
        assert torch.allclose(
            effective(model, name) - model.get_submodule(name).get_base_layer().weight, f.delta()
        )
    assert not torch.allclose(model(ids).logits, before)


def test_fedit_is_inexact_and_reports_its_loss(sites):
    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    errors = fedit_error(sites, WEIGHTS)
    agg = aggregate_lora(sites, WEIGHTS, "fedit")
    assert agg.residual == {}
    assert all(d is agg.per_site[0] for d in agg.per_site)
    for name in sites[0]:
        a = sum(pk * s[name].A for pk, s in zip(p, sites, strict=True))
        b = sum(pk * s[name].B for pk, s in zip(p, sites, strict=True))
        assert torch.allclose(agg.per_site[0][name].A, a, atol=1e-6)
        assert torch.allclose(agg.per_site[0][name].B, b, atol=1e-6)
        want = float(torch.linalg.norm(exact_delta(sites, WEIGHTS, name) - 2.0 * b @ a))
        assert errors[name] > 1e-4
        assert errors[name] == pytest.approx(want, rel=1e-4)
        assert agg.error[name] == pytest.approx(errors[name], rel=1e-4)


def test_fedex_residual_makes_the_update_exact(base, sites):
    agg = aggregate_lora(sites, WEIGHTS, "fedex")
    model = peft_site(base, 7)
    load_lora_factors(model, agg.per_site[0])
    fedit_only = {name: effective(model, name).detach().clone() for name in sites[0]}
    fold_residual(model, agg.residual)
    merged = copy.deepcopy(base)
    for name in sites[0]:
        want = base.get_submodule(name.removeprefix(PREFIX)).weight + exact_delta(
            sites, WEIGHTS, name
        )
        assert torch.allclose(effective_weight(model, name), want, atol=1e-5)
        assert not torch.allclose(fedit_only[name], want, atol=1e-5)
        assert agg.error[name] < 1e-5
        with torch.no_grad():
            merged.get_submodule(name.removeprefix(PREFIX)).weight.copy_(want)
    ids = torch.arange(10)[None]
    assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-5)


def test_ffa_exact_with_shared_a_and_rejects_drifted_a(sites):
    shared = [{n: LoraFactors(sites[0][n].A, f.B, f.scaling) for n, f in s.items()} for s in sites]
    agg = aggregate_lora(shared, WEIGHTS, "ffa")
    for name in sites[0]:
        assert torch.equal(agg.per_site[0][name].A, sites[0][name].A)
        assert agg.error[name] < 1e-5
        assert torch.allclose(
            agg.per_site[0][name].delta(), exact_delta(shared, WEIGHTS, name), atol=1e-6
        )
    with pytest.raises(ValueError, match=r"shared frozen A.*site 1"):
        aggregate_lora(sites, WEIGHTS, "ffa")


def test_flexlora_refactorises_to_each_sites_rank(base):
    models = [peft_site(base, 4, r=2), peft_site(base, 5, r=4)]
    sites = [lora_factors(m) for m in models]
    agg = aggregate_lora(sites, [1.0, 1.0], "flexlora")
    for name in sites[0]:
        exact = exact_delta(sites, [1.0, 1.0], name)
        s = torch.linalg.svdvals(exact)
        assert agg.per_site[0][name].rank == 2 and agg.per_site[1][name].rank == 4
        assert agg.per_site[0][name].scaling == 4.0 and agg.per_site[1][name].scaling == 2.0
        for k, r in enumerate((2, 4)):
            got = float(torch.linalg.norm(exact - agg.per_site[k][name].delta()))
            assert got == pytest.approx(float(s[r:].norm()), rel=1e-3, abs=1e-5)
        assert agg.error[name] == pytest.approx(float(s[2:].norm()), rel=1e-3)
        assert agg.error[name] > 1e-3
    for model, factors in zip(models, agg.per_site, strict=True):
        load_lora_factors(model, factors)
    with pytest.raises(ValueError, match="rank change.*r=4"):
        load_lora_factors(models[0], agg.per_site[1])


def test_flexlora_is_exact_when_true_rank_fits(base):
    sites = [lora_factors(peft_site(base, 4, r=2)), lora_factors(peft_site(base, 5, r=4))]
    sites[1] = {n: LoraFactors(f.A, torch.zeros_like(f.B), f.scaling) for n, f in sites[1].items()}
    agg = aggregate_lora(sites, [1.0, 3.0], "flexlora")
    for name in sites[0]:
        assert agg.error[name] < 1e-5
        assert torch.allclose(
            agg.per_site[0][name].delta(), 0.25 * sites[0][name].delta(), atol=1e-6
        )


def test_bad_inputs_raise_clear_errors(base, sites):
    with pytest.raises(ValueError, match=r"'fedavg'.*fedit.*flexlora"):
        aggregate_lora(sites, WEIGHTS, "fedavg")
    with pytest.raises(ValueError, match="2 weights for 3 sites"):
        aggregate_lora(sites, [1.0, 1.0], "fedit")
    for bad in ([1.0, 0.0, 1.0], [1.0, -2.0, 1.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="positive"):
            aggregate_lora(sites, bad, "fedex")
    name = sorted(sites[0])[0]
    missing = [sites[0], {n: f for n, f in sites[1].items() if n != name}]
    with pytest.raises(ValueError, match=rf"site 1 layers differ.*{name}"):
        aggregate_lora(missing, [1.0, 1.0], "fedit")
    wide = dict(sites[1])
    wide[name] = LoraFactors(torch.zeros(4, 16), torch.zeros(32, 4), 2.0)
    with pytest.raises(ValueError, match=rf"layer '{name}', site 1: ΔW shape"):
        aggregate_lora([sites[0], wide], [1.0, 1.0], "flexlora")
    with pytest.raises(ValueError, match=rf"layer '{name}', site 1: rank 2"):
        aggregate_lora(
            [
                sites[0],
                {**sites[1], name: LoraFactors(torch.zeros(2, 32), torch.zeros(32, 2), 2.0)},
            ],
            [1, 1],
            "fedit",
        )
    model = peft_site(base, 8)
    with pytest.raises(ValueError, match=f"missing.*{name}"):
        load_lora_factors(model, {n: f for n, f in sites[0].items() if n != name})
    with pytest.raises(ValueError, match="unknown LoRA layer"):
        fold_residual(model, {"nope": torch.zeros(32, 32)})
    assert METHODS == ("fedit", "ffa", "fedex", "flexlora")


def test_fedex_residual_is_stacked_factors_of_the_exact_gap(sites):
    """The residual travels as [p_k s B_k …, −s B̄] and [A_k …; Ā]: rank (N+1)·r, not [out, in]."""
    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    agg = aggregate_lora(sites, WEIGHTS, "fedex")
    for name, res in agg.residual.items():
        f = sites[0][name]
        assert res.A.shape == (4 * f.rank, f.A.shape[1]) and res.B.shape == (
            f.B.shape[0],
            4 * f.rank,
        )
        a = sum(pk * s[name].A for pk, s in zip(p, sites, strict=True))
        b = sum(pk * s[name].B for pk, s in zip(p, sites, strict=True))
        want = exact_delta(sites, WEIGHTS, name) - f.scaling * b @ a
        assert torch.allclose(res.delta(), want, atol=1e-6)
        assert factored_norm(res) == pytest.approx(float(torch.linalg.norm(want)), rel=1e-6)


def test_errors_come_from_factors_and_dense_diagnostics_are_opt_in(sites):
    for method in ("fedit", "fedex"):
        agg = aggregate_lora(sites, WEIGHTS, method)
        assert agg.dense_error == {}
        dense = aggregate_lora(sites, WEIGHTS, method, dense_check=True)
        for name in sites[0]:
            assert dense.error[name] == pytest.approx(dense.dense_error[name], rel=1e-4, abs=1e-6)


def test_residual_stays_fp32_beside_a_bf16_base():
    """A residual below half a bf16 ulp would vanish if added into the bf16 weight; kept
    in an fp32 side buffer, the effective weight is the fp32 reference to fp32 precision."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(model, lora)
    name = next(iter(lora_factors(model)))
    base = model.get_submodule(name).get_base_layer()
    with torch.no_grad():
        base.weight.fill_(1.0)  # bf16 ulp at 1.0 is 2^-7
    before = base.weight.detach().clone()
    res = LoraFactors(
        torch.full((1, 32), 1.0037e-3), torch.full((32, 1), 1.0), 1.0
    )  # < 2^-8; bf16 itself stores it 3.4e-6 off
    assert torch.equal((before + res.delta().to(torch.bfloat16)), before)  # the old fold: lost
    fold_residual(model, {name: res})
    assert torch.equal(base.weight, before)  # base untouched
    layer = model.get_submodule(name)
    lora_part = layer.scaling["default"] * (
        layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
    )
    want = before.float() + res.delta() + lora_part
    assert torch.allclose(effective_weight(model, name), want, rtol=0, atol=1e-6)
    side = getattr(base, RESIDUAL_ATTR)
    assert side.A.dtype == side.B.dtype == torch.float32


def _trained(template: dict[str, LoraFactors], rank: int) -> dict[str, LoraFactors]:
    """A site's reply at ``rank``: random A and B (B ≠ 0), scaling α/r with α = 8."""
    return {
        n: LoraFactors(torch.randn(rank, f.A.shape[1]), torch.randn(f.B.shape[0], rank), 8.0 / rank)
        for n, f in template.items()
    }


@pytest.mark.parametrize("method", ["fedit", "flexlora"])
def test_a_round_aggregates_the_sites_that_answered_and_every_site_gets_the_result(method):
    """Site 1 did not answer round 5: the round is the weighted aggregate of sites 0 and 2,
    and site 1 gets the new adapter too (FlexLoRA: the new ΔW's best rank-r_1 share)."""
    from fed_iotlm.llm.federated import LoraServerState, SiteUpdate

    torch.manual_seed(0)
    template = {n: LoraFactors(torch.randn(4, 12), torch.zeros(10, 4), 2.0) for n in ("a", "b")}
    ranks = {0: 2, 1: 4, 2: 8} if method == "flexlora" else {0: 4, 1: 4, 2: 4}
    state = LoraServerState.start(method, template, {"w": torch.zeros(3)}, ranks, 8.0)
    replies = {k: _trained(template, ranks[k]) for k in (0, 2)}
    updates = {
        0: SiteUpdate(replies[0], {"w": torch.ones(3)}, 3, 1.0),
        2: SiteUpdate(replies[2], {"w": torch.full((3,), 3.0)}, 1, 2.0),
    }
    report = state.aggregate(5, updates)
    assert report.round == 5 and set(report.sites) == {"0", "2"}
    assert report.loss == pytest.approx((3 * 1.0 + 1 * 2.0) / 4)
    assert torch.allclose(state.sensor["w"], torch.full((3,), 1.5))
    for name in template:
        exact = exact_delta([replies[0], replies[2]], [3.0, 1.0], name)
        if method == "flexlora":
            u, s, vh = torch.linalg.svd(exact.double())
            best4 = (u[:, :4] * s[:4]) @ vh[:4]
            assert state.factors[1][name].rank == 4
            assert torch.allclose(state.factors[1][name].delta().double(), best4, atol=1e-5)
        else:
            assert state.factors[1][name] is state.factors[0][name]
    with pytest.raises(ValueError, match="round 6: replies from sites \\[7\\]"):
        state.aggregate(6, {7: updates[0]})
