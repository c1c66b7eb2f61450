"""Issue 13 build 2, the seed's own formulation and recipe: the adapter
y = W x + A_τ(E1 ⊕ … ⊕ Em) with add / concat fusion, phased training (align, then
instruct) and per-task loss weights, on the tiny offline Llama the LLM tests use."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fed_iotlm.data.dataset import Split
from fed_iotlm.data.modalities import TaskSpec
from fed_iotlm.llm.features import FUSED, SensorFeatures
from fed_iotlm.llm.instructions import Example, Turn
from fed_iotlm.llm.loading import TINY_MODEL, load_lm
from fed_iotlm.llm.phases import caption_examples, check_task_weights, phase_plan
from fed_iotlm.llm.sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from fed_iotlm.llm.sequences import IGNORE, SequenceBuilder

MODS = ["imu", "audio"]
NAMES = [*MODS, FUSED]
TASKS = ["activity", "location"]
CLASSES = {"activity": ["walking", "cycling"], "location": ["kitchen", "office"]}


def _model(kind="seed_adapter", fusion="add", layers=2, weights=None, lora_b=False):
    lm = load_lm(TINY_MODEL)
    cond = ConditioningSettings(
        kind, 2, adapter_layers=2, names=NAMES, tasks=TASKS, feature_dim=8,
        seed_fusion=fusion, seed_layers=layers, seed_rank=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SensorLM(lm, LoraSettings(r=4, alpha=8), cond)
    if lora_b:  # LoRA that is not a no-op, so a frozen LoRA would otherwise get gradients
        with torch.no_grad():
            for name, p in model.peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    builder = SequenceBuilder(
        lm.tokenizer, NAMES, TASKS, 2, kind, classes=CLASSES, task_weights=weights
    )
    return model, builder


def _feats(n=4, seed=0, present=None) -> SensorFeatures:
    g = torch.Generator().manual_seed(seed)
    pres = torch.ones(n, len(NAMES), dtype=torch.bool) if present is None else present
    return SensorFeatures(NAMES, {m: torch.randn(n, 8, generator=g) for m in NAMES}, pres, {})


def _ex(i, task="activity", answer="walking", present=("imu", "audio")) -> Example:
    return Example(i, present, (Turn(f"What is the {task}?", answer),), "task", task, 0, "t")


def _hidden(model, batch, feats, sensors=True) -> torch.Tensor:
    with torch.no_grad():
        emb = model._inputs(batch, feats, sensors=sensors)
        out = model.decoder(inputs_embeds=emb, attention_mask=batch.attn).last_hidden_state
    model.context_part.clear_context()
    return out


def _open(model, seed=3):
    """Give A_τ a non-zero output (V random), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.seed_adapter.up.copy_(torch.randn(model.seed_adapter.up.shape, generator=g))


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_seed_adapter_starts_as_the_plain_lm_and_is_heard_once_trained(fusion):
    model, builder = _model(fusion=fusion)
    batch = builder.collate([builder.encode(_ex(i)) for i in range(3)])
    feats = _feats()
    plain = _hidden(model, batch, feats, sensors=False)
    assert torch.equal(_hidden(model, batch, feats), plain)  # V = 0: exactly the plain LM
    _open(model)
    assert not torch.allclose(_hidden(model, batch, feats), plain, atol=1e-4)


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_a_masked_modality_changes_nothing(fusion):
    model, builder = _model(fusion=fusion)
    _open(model)
    present = torch.ones(4, len(NAMES), dtype=torch.bool)
    present[:, NAMES.index("audio")] = False
    feats = _feats(present=present)
    batch = builder.collate([builder.encode(_ex(i, present=("imu",))) for i in range(4)])
    before = _hidden(model, batch, feats)
    other = _feats(seed=9, present=present)
    other.feats.update({m: feats.feats[m] for m in NAMES if m != "audio"})
    other.feats["audio"] = torch.full_like(other.feats["audio"], float("nan"))  # never read
    assert torch.equal(_hidden(model, batch, other), before)
    # ... while marking audio present (same readings) does change the output: absence is
    # stated (add: left out of the sum; concat: its presence bit), not a zero reading
    seen = _feats(present=torch.ones(4, len(NAMES), dtype=torch.bool))
    assert not torch.allclose(_hidden(model, batch, seen), before, atol=1e-5)


def test_concat_represents_absence_by_a_zero_block_and_a_presence_bit():
    model, _ = _model(fusion="concat")
    sa = model.seed_adapter
    feats = {m: torch.randn(2, 8) for m in NAMES}
    present = torch.tensor([[True, False, True], [True, True, True]])
    zero = {m: torch.zeros(2, 8) if m == "audio" else v for m, v in feats.items()}
    with torch.no_grad():
        absent = sa.fuse(feats, present)
        # observed zeros are not absence: the bit and φ(0) = GELU(b) both differ
        observed_zero = sa.fuse(zero, torch.ones(2, 3, dtype=torch.bool))
    assert absent.shape == (2, 3 * 8 + 3)
    assert not torch.allclose(absent[0], observed_zero[0])
    assert torch.equal(absent[0, 8:16], torch.zeros(8))  # audio's block (names order)
    bits = absent[0, -3:]  # presence bits, RMS-scaled like the rest: [c, 0, c]
    assert bits[1] == 0 and bits[0] > 0 and torch.equal(bits[0], bits[2])
    assert bool((absent[1, -3:] > 0).all())


@pytest.mark.parametrize("fusion,width", [("add", 8), ("concat", 3 * 8 + 3)])
def test_add_and_concat_shapes(fusion, width):
    model, _ = _model(fusion=fusion, layers=1)
    sa = model.seed_adapter
    hidden = int(model.embed.weight.shape[1])
    assert sa.fused_dim == width
    assert sa.down.shape == (1, 2, 4, width) and sa.up.shape == (1, 2, hidden, 4)
    assert sa.fuse({m: torch.randn(5, 8) for m in NAMES}, torch.ones(5, 3).bool()).shape == (
        5,
        width,
    )
    assert sa.layer_indices == [1]  # depth 1: the last decoder layer only


@pytest.mark.parametrize("layers", [1, 2])
def test_seed_adapter_depth_changes_exactly_the_last_n_layers(layers):
    model, builder = _model(layers=layers)
    _open(model)
    batch = builder.collate([builder.encode(_ex(0))])
    feats = _feats(1)
    outs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in model.decoder.layers
    ]
    try:
        _hidden(model, batch, feats, sensors=False)
        plain, outs[:] = list(outs), []
        _hidden(model, batch, feats)
    finally:
        for h in handles:
            h.remove()
    changed = [not torch.equal(a, p) for a, p in zip(outs, plain, strict=True)]
    assert changed == [i >= 2 - layers for i in range(2)]


def test_seed_adapter_depth_and_fusion_are_checked():
    with pytest.raises(ValueError, match=r"llm.seed_adapter.layers=3: LlamaForCausalLM has 2"):
        _model(layers=3)
    with pytest.raises(ValueError, match=r"llm.seed_adapter.fusion='mean'"):
        _model(fusion="mean")


def test_the_routed_tasks_adapter_is_the_one_used():
    model, builder = _model()
    _open(model)
    batch = builder.collate([builder.encode(_ex(0, task="location", answer="kitchen"))])
    feats = _feats(1)
    before = _hidden(model, batch, feats)
    with torch.no_grad():
        model.seed_adapter.up[:, 0].add_(1.0)  # activity's A: not this question's
    assert torch.equal(_hidden(model, batch, feats), before)
    with torch.no_grad():
        model.seed_adapter.up[:, 1].add_(1.0)
    assert not torch.allclose(_hidden(model, batch, feats), before, atol=1e-5)


def test_option_scores_with_the_seed_adapter_equal_teacher_forcing():
    """The prompt's KV cache and the adapter's context are repeated per option."""
    model, builder = _model()
    _open(model)
    model.eval()
    feats = _feats(2)
    exs = [_ex(i, answer="") for i in range(2)]
    options = ["walking", "cycling fast"]
    batch = builder.collate([builder.encode(ex, prompt_only=True) for ex in exs], left_pad=True)
    with torch.no_grad():
        got = model.option_scores(
            batch, feats, [builder.answer_ids(o) for o in options], builder.pad_id
        )
        for i in range(len(exs)):
            for c, option in enumerate(options):
                enc = builder.encode(_ex(i, answer=option))
                cut = len(enc.ids) - 1  # drop the turn gap after the end of turn
                enc.ids, enc.labels = enc.ids[:cut], enc.labels[:cut]
                for key in ("slot_sample", "slot_mod", "slot_j"):
                    setattr(enc, key, getattr(enc, key)[:cut])
                one = builder.collate([enc])
                hidden = _hidden(model, one, feats)
                logp = torch.log_softmax(model.lm_head(hidden[0, :-1]).float(), -1)
                target = one.labels[0, 1:]
                sel = target != IGNORE
                want = logp[sel].gather(-1, target[sel][:, None]).sum()
                assert torch.allclose(got[i, c], want, atol=1e-4), (i, option)


@pytest.mark.parametrize("kind", ["seed_adapter", "prefix"])
def test_align_phase_trains_the_conditioning_alone_then_instruct_trains_lora(kind, tmp_path):
    from fed_iotlm.llm.tuning import TuneSettings, tune

    model, builder = _model(kind, lora_b=True)
    if kind == "seed_adapter":
        _open(model)
    feats = _feats(4)
    exs = [_ex(i, answer=("walking", "cycling")[i % 2]) for i in range(4)]
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    sensor0 = {k: v.clone() for k, v in model.sensor_state().items()}
    base0 = {n: p.detach().clone() for n, p in model.peft.named_parameters() if "lora_" not in n}
    align = TuneSettings(steps=2, batch_size=4, warmup=0, train_lora=False, log_every=1)
    tune(model, builder, exs, feats, align, tmp_path / "align")
    lora1 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora0 and all(torch.equal(v, lora1[n]) for n, v in lora0.items())  # LoRA untouched
    assert all(
        torch.equal(p, base0[n]) for n, p in model.peft.named_parameters() if "lora_" not in n
    )
    moved = [k for k, v in model.sensor_state().items() if not torch.equal(v, sensor0[k])]
    assert moved  # the conditioning did train
    instruct = TuneSettings(steps=1, batch_size=4, warmup=0, log_every=1)
    tune(model, builder, exs, feats, instruct, tmp_path / "instruct")
    assert any(not torch.equal(p, lora1[n]) for n, p in model.named_parameters() if "lora_" in n)


def test_phase_plan_spends_the_single_phase_steps_and_refuses_the_rest():
    assert phase_plan(["instruct"], None, 80) == [("instruct", 80)]
    assert phase_plan(["align", "instruct"], [30, 50], 80) == [("align", 30), ("instruct", 50)]
    with pytest.raises(ValueError, match=r"add up to 70, not llm.steps=80"):
        phase_plan(["align", "instruct"], [30, 40], 80)
    with pytest.raises(ValueError, match=r"encoders phase is the federation itself"):
        phase_plan(["encoders", "align", "instruct"], [1, 1, 78], 80)
    with pytest.raises(ValueError, match=r"align before instruct"):
        phase_plan(["instruct", "align"], [40, 40], 80)
    with pytest.raises(ValueError, match=r"give 2 positive step counts"):
        phase_plan(["align", "instruct"], None, 80)
    with pytest.raises(ValueError, match=r"one phase runs llm.steps=80"):
        phase_plan(["instruct"], [40, 40], 80)


def test_captions_name_the_sensors_and_the_label_from_fit_rows_only():
    meta = types.SimpleNamespace(
        modalities={"imu": None, "audio": None},
        tasks={t: TaskSpec(t, tuple(c)) for t, c in CLASSES.items()},
    )
    split = Split(
        x={},
        mask={"imu": np.array([1, 1, 0, 1]), "audio": np.array([1, 0, 0, 1])},
        y={"activity": np.array([0, 1, 0, -1]), "location": np.array([1, -1, 0, -1])},
    )
    caps = caption_examples(meta, split, [0, 1, 2], TASKS)  # row 3 is not a fit row
    got = [(c.index, c.task, c.turns[0].question, c.turns[0].answer) for c in caps]
    assert got == [
        (
            0,
            "activity",
            "Describe the activity in this recording.",
            "Sensors: imu and audio. Activity: walking.",
        ),
        (
            0,
            "location",
            "Describe the location in this recording.",
            "Sensors: imu and audio. Location: office.",
        ),
        (
            1,
            "activity",
            "Describe the activity in this recording.",
            "Sensors: imu. Activity: cycling.",
        ),
    ]  # fmt: skip  (row 2 has no sensor; row 1 is unlabelled for location)
    lm = load_lm(TINY_MODEL)
    builder = SequenceBuilder(lm.tokenizer, NAMES, TASKS, 2, "seed_adapter", classes=CLASSES)
    assert [builder.encode(c).task_id for c in caps] == [0, 1, 0]  # routed to its task


def test_task_weights_scale_each_examples_loss_by_its_task():
    weights = {"activity": 1.0, "location": 0.25}
    model, weighted = _model(weights=weights)
    _, plain = _model()
    exs = [_ex(0), _ex(1, "location", "The location is kitchen."), _ex(2, answer="cycling")]
    feats = _feats(3)
    wb, pb = (
        weighted.collate([weighted.encode(e) for e in exs]),
        plain.collate([plain.encode(e) for e in exs]),
    )
    assert wb.weight.tolist() == [1.0, 0.25, 1.0] and pb.weight is None
    with torch.no_grad():
        got, unweighted = model(wb, feats), model(pb, feats)
        hidden = _hidden(model, pb, feats)
    target = pb.labels[:, 1:]
    per = F.cross_entropy(
        model.lm_head(hidden[:, :-1]).float().transpose(1, 2), target, ignore_index=IGNORE,
        reduction="none",
    )  # fmt: skip
    mask = (target != IGNORE).float()
    row_w = torch.tensor([1.0, 0.25, 1.0])[:, None]
    want = (per * mask * row_w).sum() / mask.sum()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(unweighted, (per * mask).sum() / mask.sum(), atol=1e-5)
    assert not torch.allclose(got, unweighted, atol=1e-3)
    _, everything_half = _model(weights={"activity": 0.5, "location": 0.5})
    half = everything_half.collate([everything_half.encode(e) for e in exs])
    with torch.no_grad():
        assert torch.allclose(model(half, feats), 0.5 * unweighted, atol=1e-6)


def test_task_weights_refuse_unknown_tasks_and_bad_values():
    assert check_task_weights({"location": 0.5}, TASKS) == {"location": 0.5}
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['walking'\]; the tasks tuned here"):
        check_task_weights({"walking": 1.0}, TASKS)
    with pytest.raises(ValueError, match=r"llm.task_weights.location=-1.0: expected a finite"):
        check_task_weights({"location": -1.0}, TASKS)
    with pytest.raises(ValueError, match=r"every task weighted 0"):
        check_task_weights({"activity": 0, "location": 0}, TASKS)
    with pytest.raises(ValueError, match=r"unknown task"):
        _model(weights={"room": 2.0})


def test_stage_runs_the_seed_adapter_in_phases_with_task_weights(tmp_path):
    """Through selection on validation, scoring, controls and results.json like prefix
    and adapter, at equal LoRA coverage; the text-only control spends every step on
    instructions."""
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import save_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.llm.stage import run_stage
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.settings import compose

    data_args = ["data.num_train=120", "data.num_test=40"]
    spec = model_spec(compose(data_args))
    torch.manual_seed(0)
    save_bundle(tmp_path / "bundle", state_to_numpy(MultisensoryModel(spec)), spec, {})
    cfg = compose(
        [*data_args, f"llm.bundle={tmp_path / 'bundle'}", f"llm.model={TINY_MODEL}",
         "llm.steps=3", "llm.batch_size=4", "llm.train_samples=16", "llm.eval_samples=8",
         "llm.val_samples=8", "llm.max_new_tokens=3", "llm.log_every=1",
         "llm.controls=[text_lora,shuffled_sensors,majority,head]",
         "llm.conditioning=[seed_adapter]", "llm.seed_adapter.fusion=concat",
         "llm.seed_adapter.layers=1", "llm.phases=[align,instruct]", "llm.phase_steps=[1,2]",
         "+llm.task_weights.location=0.5", "mlflow.enabled=false"]
    )  # fmt: skip
    doc = json.loads(run_stage(cfg, tmp_path / "run").read_text())
    llm = doc["llm"]
    assert doc["selection"]["conditioning"] == "seed_adapter" and llm["best"] == "seed_adapter"
    assert set(llm["conditioning"]) == {"seed_adapter", "names"}
    seed, names = llm["conditioning"]["seed_adapter"], llm["conditioning"]["names"]
    assert seed["lora_coverage"] == names["lora_coverage"] and seed["lora_coverage"]["adapted"]
    assert seed["phases"] == [{"name": "align", "steps": 1}, {"name": "instruct", "steps": 2}]
    assert names["phases"] == [{"name": "instruct", "steps": 3}]
    assert seed["seed_adapter"]["fusion"] == "concat" and seed["seed_adapter"]["layers"] == [1]
    assert seed["seed_adapter"]["center"] is True  # the default, chosen on validation
    assert set(seed["val"]) == {"generation", "loglik"}
    assert set(llm["controls"]) == {"text_lora", "shuffled_sensors", "majority", "head"}
    rows = [h for h in doc["history"] if h["conditioning"] == "seed_adapter"]
    assert [(h["round"], h["phase"]) for h in rows] == [
        (1, "align"),
        (2, "instruct"),
        (3, "instruct"),
    ]
    assert all(len(h["seed_adapter_ratio"]) == 1 for h in rows)
    recipe = llm["recipe"]
    assert [p["name"] for p in recipe["phases"]] == ["encoders", "align", "instruct"]
    assert recipe["task_weights"] == {"location": 0.5} and recipe["align_examples"] > 0
    assert (tmp_path / "run" / "checkpoint-seed_adapter" / "sensor.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-seed_adapter-align" / "trainer.pt").is_file()

    # the probe reads the run back: per task, probes on the feature, z and each layer's U z
    from fed_iotlm.llm.seed_probe import probe_run

    probed = probe_run(tmp_path / "run")
    assert probed["layers"] == [1] and len(probed["output_ratio"]) == 1
    for task in ("activity", "location"):
        got = probed[task]
        assert set(got["probe"]) == {"fused_feature", "z", "Uz_per_layer"}
        assert len(got["probe"]["Uz_per_layer"]) == 1 and len(got["sample_spread"]) == 1
        assert all(0.0 <= a <= 1.0 for a in [got["probe"]["z"], *got["probe"]["Uz_per_layer"]])
        assert got["fit_rows"] > 0 and got["test_rows"] > 0


def test_probe_and_spread_measure_what_they_say():
    from fed_iotlm.llm.seed_probe import linear_probe, sample_spread

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    separable = np.eye(3)[y] * 5 + rng.normal(size=(300, 3)) * 0.1
    assert linear_probe(separable[:200], y[:200], separable[200:], y[200:]) == 1.0
    noise = rng.normal(size=(300, 3))
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.6
    constant = torch.ones(50, 8) * 3.0
    assert sample_spread(constant) == 0.0
    varied = constant + torch.randn(50, 8)
    assert 0.2 < sample_spread(varied) < 0.5  # ‖std‖ ≈ √8 against ‖mean‖ ≈ 3√8


def test_a_phase_warms_up_for_the_single_phase_runs_share_of_its_steps():
    from fed_iotlm.llm.stage import phase_warmup

    assert phase_warmup(10, 80, 80) == 10 and phase_warmup(10, 2, 2) == 10  # one phase: as before
    assert [phase_warmup(10, n, 80) for n in (20, 60)] == [2, 8]
    assert phase_warmup(10, 2, 80) == 1 and phase_warmup(0, 20, 80) == 0


def test_centring_removes_what_every_recording_shares_and_evaluates_with_the_running_mean():
    """llm.seed_adapter.center: in training z minus the batch's mean over held rows (the
    running mean follows), in evaluation minus the running mean; padding rows stay 0."""
    from fed_iotlm.llm.seed_adapter import CENTER_MOMENTUM, SeedAdapter

    torch.manual_seed(0)
    names, dim = ["imu", "audio"], 6
    plain = SeedAdapter(names, dim, hidden=8, num_tasks=1, num_layers=1, center=False)
    centred = SeedAdapter(names, dim, hidden=8, num_tasks=1, num_layers=1, center=True)
    centred.load_state_dict({**plain.state_dict(), "z_mean": torch.zeros(dim)})
    feats = {m: torch.randn(5, dim) + 3.0 for m in names}  # a large shared component
    present = torch.ones(5, 2, dtype=torch.bool)
    present[4] = False  # a padding row: no recording
    z = plain.fuse(feats, present)
    zc = centred.fuse(feats, present)  # training mode
    batch_mean = z[:4].mean(0)
    assert torch.allclose(zc[:4], z[:4] - batch_mean, atol=1e-6)
    assert torch.equal(zc[4], torch.zeros(dim))
    assert torch.allclose(centred.z_mean, CENTER_MOMENTUM * batch_mean, atol=1e-6)
    centred.eval()
    one = centred.fuse({m: v[:1] for m, v in feats.items()}, present[:1])
    assert torch.allclose(one, z[:1] - centred.z_mean, atol=1e-6)  # not its own mean (0)
    # what reaches A: the samples' spread relative to the shared part grows
    from fed_iotlm.llm.seed_probe import sample_spread

    assert sample_spread(zc[:4]) > 10 * sample_spread(z[:4])
