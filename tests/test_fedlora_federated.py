"""Federated LoRA through a real Flower simulation: 2 sites, 2 rounds, every method.

The sites are the federation's nodes: a random-weight bundle over a 2-node plan with
label fraction 0.5, whose nodes upload their tokens and labels (``llm.data=nodes``); site
k trains on node k's instructions only, and each reply's n_k is its node's example count.

One simulation runs all four methods in turn on the same virtual SuperNodes (one Ray
start).  An observer on the server keeps each round's replies and the server's state, so
the test can recompute the aggregation directly and check what the sites were sent; a
second hook keeps the round engine's records.  Two rounds fail on purpose (a client mod
makes a site's ClientApp raise): FFA's round 1 on partition 1 (``min_sites=1``: the round
aggregates partition 0 alone) and FedEx's round 2 on partition 0 (every site required:
the round is skipped; FedEx runs a third round so two are aggregated)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from fed_iotlm.federation.round_record import TRAIN, Participation
from fed_iotlm.llm.federated import (
    FederatedSettings,
    SitePayload,
    average_states,
    prepare_site,
    train_site,
)
from fed_iotlm.llm.fedlora import LoraFactors, aggregate_lora, effective_weight, lora_factors
from fed_iotlm.llm.loading import TINY_MODEL
from fed_iotlm.llm.lora_task import LoraTask, _base_lm, build_model, load_task_data
from fed_iotlm.llm.lora_wire import pack, unpack
from fed_iotlm.llm.tuning import TuneSettings
from server.lora_step import lora_comm, lora_rounds

TASK = LoraTask(
    model=TINY_MODEL,
    lora_r=4,
    lora_alpha=8,
    target_modules=("q_proj", "v_proj", "down_proj"),
    tune=TuneSettings(batch_size=8, lr=3e-3, sensor_lr=3e-3, warmup=0),
    toy_train=32,
    toy_eval=8,
    max_new_tokens=3,
)
NODE_DATA = [
    "data.num_train=70", "data.num_test=20", "partition.plan=[[imu,audio],[depth,thermal]]",
    "partition.label_fraction=0.5", "llm.eval_samples=4", "llm.val_samples=4",
]  # fmt: skip
FLEX_RANKS = (2, 4)
PLANS = [
    FederatedSettings("fedit", 2, 3),
    FederatedSettings("ffa", 2, 3, min_sites=1),
    FederatedSettings("fedex", 3, 3),
    FederatedSettings("flexlora", 2, 3, FLEX_RANKS),
]
FAILURES = {"ffa": {1: {1}}, "fedex": {2: {0}}}  # method -> round -> partitions that raise
AGGREGATED = {"fedit": [1, 2], "ffa": [1, 2], "fedex": [1, 3], "flexlora": [1, 2]}
PREFIX = "base_model.model."


def _snapshot(obj):
    return copy.deepcopy(obj)


@pytest.fixture(scope="module")
def node_task(tmp_path_factory) -> LoraTask:
    """TASK's LM and LoRA on the rows a 2-node federation uploads (random-weight bundle)."""
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import save_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.settings import compose

    bundle = tmp_path_factory.mktemp("bundle")
    spec = model_spec(compose(NODE_DATA))
    torch.manual_seed(0)
    save_bundle(bundle, state_to_numpy(MultisensoryModel(spec)), spec, {})
    cfg = compose([*NODE_DATA, f"llm.bundle={bundle}", f"llm.model={TINY_MODEL}"])
    task = replace(TASK, data="bundle", cfg_json=json.dumps(cfg, sort_keys=True), site_split="auto")
    assert task.site_split == "nodes"  # the default on the nodes' uploads
    return task


@pytest.fixture(scope="module")
def federation(tmp_path_factory, node_task):
    """(results.json, {method: [per-round {updates, factors, residual, version, sensor}]},
    {method: [RoundRecord]})."""
    from simulations.fedlora_study import run_lora_simulation
    from tests.client_mods import failing_train

    seen: dict[str, list[dict]] = {}
    records: dict[str, list] = {}

    def observe(method, rnd, updates, state):
        seen.setdefault(method, []).append(
            {
                "updates": _snapshot(dict(updates)),
                "factors": _snapshot(state.factors),
                "residual": _snapshot(state.residual),
                "version": state.version,
                "sensor": _snapshot(state.sensor),
                "exact": _snapshot(state.exact),
                "state": _snapshot(state),
            }
        )

    doc = run_lora_simulation(
        node_task, PLANS, 2, tmp_path_factory.mktemp("fedlora"), observe,
        client_mods=[failing_train(FAILURES)],
        on_record=lambda method, record: records.setdefault(method, []).append(record),
    )  # fmt: skip
    return doc, seen, records


def _equal(a: dict[str, LoraFactors], b: dict[str, LoraFactors]) -> bool:
    return set(a) == set(b) and all(
        torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, b[n].B) for n in a
    )


@pytest.mark.integration
def test_the_sites_are_the_federations_nodes(federation, node_task):
    """results.json says node sites ran, with each node's rows and examples, and every
    reply's n_k is its node's example count (not an IID share of the pool)."""
    from fed_iotlm.llm.lora_task import task_sites

    doc, seen, _ = federation
    split = task_sites(node_task, 2)
    assert doc["sites"] == split.report() and doc["sites"]["split"] == "nodes"
    assert doc["task"]["site_split"] == "nodes" and doc["num_sites"] == 2
    per_site = doc["sites"]["per_site"]
    assert [s["node"] for s in per_site] == [0, 1] and all(s["examples"] > 0 for s in per_site)
    assert all(s["labelled_rows"] < s["rows"] for s in per_site)  # label fraction 0.5
    assert abs(per_site[0]["examples"] - per_site[1]["examples"]) >= 2  # no IID deal's sizes
    train = load_task_data(node_task).train
    assert sum(s["examples"] for s in per_site) == len(train)
    for method, rounds in seen.items():
        for snap in rounds:
            for k, update in snap["updates"].items():
                assert update.n == per_site[k]["examples"], (method, k)


@pytest.mark.integration
def test_every_method_runs_and_reports(federation, node_task):
    doc, seen, _ = federation
    assert set(doc["methods"]) == {"fedit", "ffa", "fedex", "flexlora"}
    evals = len(load_task_data(node_task).evals)  # held-out test questions of all nodes
    for method, r in doc["methods"].items():
        assert [x["round"] for x in r["rounds"]] == AGGREGATED[method]
        assert len(seen[method]) == 2
        assert 0.0 <= r["accuracy"] <= 1.0 and r["eval"]["n"] == evals
        answered = [
            {"0"} if method == "ffa" and x["round"] == 1 else {"0", "1"} for x in r["rounds"]
        ]
        assert [set(x["sites"]) for x in r["rounds"]] == answered
        assert all(x["loss"] > 0 for x in r["rounds"])
        last = r["rounds"][-1]
        if method == "flexlora":
            assert last["fedit_error"] is None  # undefined across ranks
            assert set(r["eval"]["by_rank"]) == {"2", "4"}
        else:
            assert last["fedit_error"] > 0
    rel = {
        m: r["rounds"][-1]["agg_error"] / r["rounds"][-1]["exact_norm"]
        for m, r in doc["methods"].items()
    }
    assert rel["ffa"] < 1e-5 and rel["fedex"] < 1e-5  # exact by construction
    for r in doc["methods"].values():  # normalised by the round's own update, not the adapter
        x = r["rounds"][-1]
        assert x["update_norm"] > 0 and x["rel_error"] == pytest.approx(
            x["agg_error"] / x["update_norm"]
        )
        assert x["dense_error"] is None  # dense diagnostics are off by default
    comm = {m: r["comm"] for m, r in doc["methods"].items()}
    for way in ("up", "down"):  # FFA: B only both ways (q/v/down_proj: less than half)
        key = f"lora_bytes_{way}_per_site_round"
        assert comm["ffa"][key] < 0.5 * comm["fedit"][key]
    assert rel["fedit"] > 1e-4
    fedit = doc["methods"]["fedit"]["rounds"][-1]
    assert fedit["agg_error"] == pytest.approx(fedit["fedit_error"], rel=1e-4)
    json.dumps(doc)  # results.json is plain JSON


@pytest.mark.integration
def test_every_round_is_a_record_with_its_participation(federation):
    """The rounds run on the round engine: one frozen record per round, with who was sent
    it and who answered, the bytes, and the aggregation report; results.json's per-round
    blocks are views of those records."""
    doc, _, records = federation
    assert {m: [r.round for r in recs] for m, recs in records.items()} == {
        p.method: list(range(1, p.rounds + 1)) for p in PLANS
    }
    for method, recs in records.items():
        r = doc["methods"][method]
        assert lora_rounds(recs) == r["rounds"] and lora_comm(recs) == r["comm"]
        for rec in recs:
            p = rec.participation
            assert rec.phase == TRAIN and p.sent == rec.messages_down == 2 and rec.bytes_down > 0
            assert rec.messages_up == (0 if p.skipped else p.answered)
            assert (rec.bytes_up > 0) == (rec.messages_up > 0)
            assert rec.stats["nodes_answered"] == p.answered
            if not p.faulty:
                assert p == Participation(2, 2)
                assert {"loss", "agg_error", "update_norm", "site.0.n", "site.1.rank"} <= set(
                    rec.metrics
                )
                assert ("fedit_error" in rec.metrics) == (method != "flexlora")
    assert doc["methods"]["fedit"]["faults_by_round"] == {}


@pytest.mark.integration
def test_a_site_whose_clientapp_raises_is_recorded_and_the_run_goes_on(federation):
    doc, seen, records = federation
    # FFA round 1: partition 1 raised; min_sites=1, so partition 0 alone was aggregated
    failed = records["ffa"][0].participation
    assert (failed.sent, failed.answered, failed.skipped, failed.missing) == (2, 1, False, ())
    assert len(failed.failed) == 1 and failed.failed[0].startswith("partition 1 (node ")
    assert "injected failure: ffa round 1, partition 1" in failed.failed[0]
    snap = seen["ffa"][0]
    assert sorted(snap["updates"]) == [0]
    assert _equal(snap["factors"][1], snap["factors"][0])  # the absent site gets the new A, B
    assert records["ffa"][1].participation == Participation(2, 2)
    # FedEx round 2: partition 0 raised and every site is required: skipped, not a crash
    skipped = records["fedex"][1]
    p = skipped.participation
    assert p.skipped and (p.answered, len(p.failed)) == (1, 1)
    assert p.failed[0].startswith("partition 0 (node ") and skipped.metrics == {}
    assert doc["methods"]["fedex"]["faults_by_round"] == {"2": p.report()}
    assert doc["methods"]["ffa"]["faults_by_round"] == {"1": failed.report()}
    # ... and the run went on: round 3 continued from round 1's state (a residual of one
    # round, version 1, sent in round 3), and the next method ran
    assert [snap["version"] for snap in seen["fedex"]] == [1, 2]
    assert [r.participation for r in records["fedex"][::2]] == [Participation(2, 2)] * 2
    assert doc["methods"]["flexlora"]["rounds"][-1]["round"] == 2


@pytest.mark.integration
def test_the_study_report_shows_skipped_rounds_and_faults(federation, tmp_path):
    from simulations.fedlora_study import write_report

    doc, _, _ = federation
    central = {"steps": 6, "accuracy": 0.5, "eval": {"answered": 1.0}, "loss": 1.0}
    central |= {"train_s": 1.0, "eval_s": 1.0}
    study = doc | {
        "command": "python -m simulations.fedlora_study", "data": "toy", "rounds": 3,
        "local_steps": 3, "train_examples": 32, "eval_examples": 8, "json": "x.json",
        "reference": {"name": "nearest class mean", "accuracy": 1.0},
        "centralized": {"same_examples": central, "same_steps": central},
    }  # fmt: skip
    write_report(study, tmp_path / "fedlora.md")
    text = (tmp_path / "fedlora.md").read_text()
    fedex = next(line for line in text.splitlines() if line.startswith("| fedex | 0."))
    assert fedex.split(" | ")[2] == "skipped"  # round 2 of 3
    assert "failed or silent site: ffa: 1; fedex: 2." in text


@pytest.mark.integration
def test_server_state_equals_a_direct_aggregation_of_the_replies(federation):
    _, seen, _ = federation
    for method, rounds in seen.items():
        for snap in rounds:
            order = sorted(snap["updates"])
            sites = [snap["updates"][k].factors for k in order]
            weights = [float(snap["updates"][k].n) for k in order]
            agg = aggregate_lora(sites, weights, method)
            for i, k in enumerate(order):
                assert _equal(snap["factors"][k], agg.per_site[i]), (method, k)
            want = average_states([snap["updates"][k].sensor_state for k in order], weights)
            assert all(torch.allclose(snap["sensor"][n], v) for n, v in want.items())


@pytest.mark.integration
def test_ffa_sites_never_move_a(federation):
    _, seen, _ = federation
    rounds = seen["ffa"]
    a0 = {n: f.A for n, f in rounds[0]["factors"][0].items()}
    for snap in rounds:
        for k, update in snap["updates"].items():
            assert all(torch.equal(f.A, a0[n]) for n, f in update.factors.items()), k
            assert all(torch.equal(f.A, a0[n]) for n, f in snap["factors"][k].items())
    b_moved = any(
        not torch.equal(f.B, rounds[0]["factors"][0][n].B)
        for n, f in rounds[1]["factors"][0].items()
    )
    assert b_moved  # B trains


@pytest.mark.integration
def test_flexlora_sites_keep_their_own_ranks(federation):
    _, seen, _ = federation
    for snap in seen["flexlora"]:
        for k, rank in enumerate(FLEX_RANKS):
            assert {f.rank for f in snap["updates"][k].factors.values()} == {rank}
            assert {f.rank for f in snap["factors"][k].values()} == {rank}
            assert {f.scaling for f in snap["factors"][k].values()} == {TASK.lora_alpha / rank}


@pytest.mark.integration
def test_fedex_site_weights_are_base_plus_the_exact_average(federation, node_task):
    """After folding C_t, a site's W0 + C_t + s·B̄A̅ equals W0 + C_{t-1} + Σ p_k s B_k A_k."""
    _, seen, _ = federation
    rounds = seen["fedex"]
    assert [snap["version"] for snap in rounds] == [1, 2]
    base = _base_lm(TINY_MODEL).model
    data = load_task_data(node_task)
    for t, snap in enumerate(rounds):
        before = rounds[t - 1]["residual"] if t else {}
        order = sorted(snap["updates"])
        total = sum(snap["updates"][k].n for k in order)
        for k in order:  # what site k builds from its next payload, as the ClientApp does
            model, _ = build_model(node_task, data, TASK.lora_r)
            payload = snap["state"].payload(k)
            factors, sensor, residual = unpack(
                pack(payload.factors, payload.sensor, payload.residual), TASK.lora_alpha
            )
            prepare_site(model, type(payload)(factors, sensor, residual, payload.version))
            for name in snap["factors"][k]:
                got = effective_weight(model.peft, name)
                base_now = model.peft.get_submodule(name).get_base_layer().weight
                w0 = base.get_submodule(name.removeprefix(PREFIX)).weight
                assert torch.equal(base_now, w0)  # the residual lives beside the base
                exact = sum(
                    snap["updates"][j].n / total * f.scaling * f.B @ f.A
                    for j in order
                    for f in [snap["updates"][j].factors[name]]
                )
                want = w0 + (before[name].delta() if name in before else 0.0) + exact
                assert torch.allclose(got, want, atol=1e-5), (t, k, name)
        assert any(float(r.delta().abs().max()) > 1e-6 for r in snap["residual"].values())
        # stacked factors: rank (sites + 1) · r per round folded in, never [out, in]
        assert all(r.A.shape[0] == (t + 1) * 3 * TASK.lora_r for r in snap["residual"].values())


def test_settings_and_wire_format_reject_mistakes():
    with pytest.raises(ValueError, match="choose one of"):
        FederatedSettings("fedavg")
    with pytest.raises(ValueError, match="only flexlora mixes ranks"):
        FederatedSettings("fedit", ranks=(4, 8)).site_ranks(2, 8)
    with pytest.raises(ValueError, match="3 ranks for 2 sites"):
        FederatedSettings("flexlora", ranks=(4, 8, 16)).site_ranks(2, 8)
    with pytest.raises(ValueError, match="min_sites must be at least 1"):
        FederatedSettings("fedit", min_sites=0)
    with pytest.raises(ValueError, match="min_sites=3 but the run has 2 sites"):
        FederatedSettings("fedit", min_sites=3).min_replies(2)
    with pytest.raises(ValueError, match="round_timeout_s must be > 0"):
        FederatedSettings("fedit", round_timeout_s=0.0)
    assert FederatedSettings("fedit").min_replies(3) == 3  # default: every site
    factors = {"l": LoraFactors(torch.randn(2, 5), torch.randn(3, 2), 4.0)}
    res = {"l": LoraFactors(torch.randn(6, 5), torch.randn(3, 6), 1.0)}
    got, sensor, residual = unpack(pack(factors, {"w": torch.ones(2)}, res), 8)
    assert _equal(got, factors) and got["l"].scaling == 4.0
    assert torch.equal(sensor["w"], torch.ones(2)) and _equal(residual, res)
    with pytest.raises(KeyError, match="without A"):
        unpack(pack(factors, b_only=True), 8)
    with pytest.raises(KeyError, match="unexpected"):
        unpack({"C|l": torch.ones(1).numpy()}, 8)
    model, _ = build_model(TASK, load_task_data(TASK), TASK.lora_r)
    assert len(lora_factors(model.peft)) == 6  # 3 target kinds × 2 layers


@pytest.mark.parametrize("conditioning", ["adapter", "seed_adapter"])
def test_train_site_keeps_a_frozen_for_ffa_with_each_adapter(conditioning):
    """FFA-LoRA with the gated adapter and with the seed's adapter: A stays, B and the
    conditioning's own weights (what the server averages beside LoRA) train."""
    task = replace(
        TASK, conditioning=conditioning, adapter_layers=1, seed_layers=1, lora_top_layers=1
    )
    data = load_task_data(task)
    model, builder = build_model(task, data, task.lora_r)
    start = lora_factors(model.peft)
    sensor = {k: v.clone() for k, v in model.sensor_state().items()}
    prepare_site(model, SitePayload(start, sensor, freeze_a=True))
    settings = replace(task.tune, steps=2, warmup=0, log_every=1)
    update = train_site(model, builder, data.train[:8], data.feats, settings)
    assert update.n == 8 and update.loss > 0
    assert len(update.factors) == 3  # llm.lora.top_layers=1: LoRA only in the top layer
    for name, f in update.factors.items():
        assert torch.equal(f.A, start[name].A) and not torch.equal(f.B, start[name].B)
    assert any(not torch.equal(v, sensor[k]) for k, v in update.sensor_state.items())
    if conditioning == "seed_adapter":  # its per-task A = V U and the modality maps travel
        assert {"down", "up"} <= set(sensor) and any(k.startswith("phi.") for k in sensor)
