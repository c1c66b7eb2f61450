"""Issue 13 build 2: the gated adapter set up properly and compared fairly (equal LoRA
coverage, keys/values through the layer's input norm, per-head gates with their own
learning rate, depth as a knob, logged gates) and task routing by the question."""

from __future__ import annotations

import pytest
import torch

from fed_iotlm.llm.features import FUSED, SensorFeatures
from fed_iotlm.llm.instructions import Example, Turn
from fed_iotlm.llm.loading import TINY_MODEL, load_lm
from fed_iotlm.llm.sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from fed_iotlm.llm.sequences import SequenceBuilder

NAMES = ["imu", FUSED]


def _cond(kind: str, layers: int = 2, tasks=("state",)) -> ConditioningSettings:
    return ConditioningSettings(
        kind, 2, adapter_layers=layers, names=NAMES, tasks=list(tasks), feature_dim=8
    )


@pytest.mark.parametrize("top_layers", [None, 1])
def test_prefix_and_adapter_get_lora_on_the_same_modules_and_layers(top_layers):
    """One llm.lora.top_layers for every conditioning on a shared base (the first version
    gave the adapter LoRA in its own layers only and prefix in all)."""
    base = load_lm(TINY_MODEL)
    lora = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"), top_layers=top_layers)
    coverage = {}
    for kind in ("prefix", "adapter", "names"):
        model = SensorLM(base, lora, _cond(kind, layers=1), adapter_name=kind)
        base.model = model.peft
        coverage[kind] = model.lora_coverage()
    want_layers = [0, 1] if top_layers is None else [1]
    assert coverage["prefix"] == {
        "layers": want_layers,
        "modules": ["q_proj", "v_proj"],
        "adapted": 2 * len(want_layers),
    }
    assert coverage["adapter"] == coverage["prefix"] == coverage["names"]


def test_lora_coverage_refuses_the_old_auto_and_out_of_range_depths():
    lm = load_lm(TINY_MODEL)
    with pytest.raises(ValueError, match=r"llm.lora.top_layers='auto'.*same for every"):
        SensorLM(lm, LoraSettings(top_layers="auto"), _cond("adapter"))
    with pytest.raises(ValueError, match=r"top_layers=3: the LM has 2 decoder layers"):
        SensorLM(lm, LoraSettings(top_layers=3), _cond("prefix"))


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapter(layers: int = 2, dtype=None):
    """An adapter model whose LoRA is not a no-op (B random), and a 2-sample batch."""
    lm = load_lm(TINY_MODEL) if dtype is None else load_lm(TINY_MODEL, dtype=dtype)
    torch.manual_seed(0)
    model = SensorLM(
        lm, LoraSettings(r=4, alpha=8, target_modules=ALL_LINEAR), _cond("adapter", layers)
    )
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    builder = SequenceBuilder(lm.tokenizer, NAMES, ["state"], 2, "adapter")
    exs = [
        Example(i, ("imu",), (Turn("What is the state?", c),), "task", "state", i, "t")
        for i, c in enumerate(("calm", "busy"))
    ]
    g = torch.Generator().manual_seed(1)
    feats = SensorFeatures(
        NAMES, {m: torch.randn(2, 8, generator=g) for m in NAMES}, torch.ones(2, 2).bool(), {}
    )
    return model, builder, builder.collate([builder.encode(ex) for ex in exs]), feats, exs


def _layer_outputs(model, batch, feats, sensors: bool = True) -> list[torch.Tensor]:
    """Every decoder layer's output hidden states for one pass (sensors: adapter context)."""
    outs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in model.decoder.layers
    ]
    try:
        with torch.no_grad():
            emb = model._inputs(batch, feats, sensors=sensors)
            model.decoder(inputs_embeds=emb, attention_mask=batch.attn)
    finally:
        for h in handles:
            h.remove()
        model.adapter.clear_context()
    return outs


def test_gates_are_per_head_with_their_own_learning_rate_and_queries_start_unit_normal():
    from fed_iotlm.llm.tuning import TuneSettings, make_optimizer

    model, *_ = _adapter()
    assert model.adapter.gates.shape == (2, 4)  # [layers, heads] of the tiny Llama
    assert bool((model.adapter.gates == 0).all())
    assert 0.9 < float(model.adapter.queries.detach().std()) < 1.1  # N(0, 1), the norm's own scale
    opt = make_optimizer(model, TuneSettings(lr=1e-3, sensor_lr=3e-3, gate_lr=0.05))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["gates"]["lr"] == 0.05 and groups["gates"]["params"] == [model.adapter.gates]
    assert groups["sensor"]["lr"] == 3e-3 and groups["lora"]["lr"] == 1e-3
    others = [p for n in ("lora", "sensor") for p in groups[n]["params"]]
    assert all(p is not model.adapter.gates for p in others)
    assert any(p is model.adapter.queries for p in groups["sensor"]["params"])


@pytest.mark.parametrize("layers", [1, 2])
def test_adapter_depth_adapts_exactly_the_last_n_layers(layers):
    model, _, batch, feats, _ = _adapter(layers)
    assert model.adapter.layer_indices == list(range(2 - layers, 2))
    assert model.adapter.gates.shape == (layers, 4)
    with torch.no_grad():
        model.adapter.gates.fill_(1.0)
    plain = _layer_outputs(model, batch, feats, sensors=False)
    adapted = _layer_outputs(model, batch, feats)
    changed = [not torch.equal(a, p) for a, p in zip(adapted, plain, strict=True)]
    assert changed == [i >= 2 - layers for i in range(2)]


def test_adapter_depth_beyond_the_lm_is_refused():
    with pytest.raises(ValueError, match=r"llm.adapter.layers=3: LlamaForCausalLM has 2 decoder"):
        _adapter(3)


def test_closed_gates_give_exactly_the_base_plus_lora_model():
    model, _, batch, feats, _ = _adapter()
    plain = _layer_outputs(model, batch, feats, sensors=False)[-1]
    assert torch.equal(_layer_outputs(model, batch, feats)[-1], plain)
    with torch.no_grad():
        model.adapter.gates[1, 2] = 0.3  # one head of one layer open
    assert not torch.equal(_layer_outputs(model, batch, feats)[-1], plain)


def test_adapter_prompt_goes_through_the_layers_input_norm():
    """Queries and sensor tokens 100x larger give (almost) the same output: each adapted
    layer RMS-normalises the prompt before its k/v projections."""
    model, _, batch, feats, _ = _adapter()
    with torch.no_grad():
        model.adapter.gates.fill_(0.8)
        before = _layer_outputs(model, batch, feats)[-1]
        plain = _layer_outputs(model, batch, feats, sensors=False)[-1]
        model.adapter.queries.mul_(100)
        model.adapter.sensors.scale.mul_(100)
        after = _layer_outputs(model, batch, feats)[-1]
    moved = (before - plain).abs().max()
    assert moved > 1e-2  # the adapter does change the output
    assert (after - before).abs().max() < 1e-3 * moved


def test_tuning_log_has_gates_and_adapter_to_attention_ratio_per_layer(tmp_path):
    from fed_iotlm.llm.tuning import TuneSettings, tune

    model, builder, _, feats, exs = _adapter()
    settings = TuneSettings(steps=2, batch_size=2, warmup=0, gate_lr=0.05, log_every=1)
    rows = []
    hist = tune(
        model, builder, exs, feats, settings, tmp_path / "ck", log=lambda *a: rows.append(a[3])
    )
    assert rows == hist and [h["step"] for h in hist] == [1, 2]
    first, second = hist
    assert first["adapter_attention_ratio"] == [0.0, 0.0]  # step 1 ran with closed gates
    assert all(r > 0 for r in second["adapter_attention_ratio"])
    assert len(second["gates_tanh"]) == 2 and any(g != 0 for g in second["gates_tanh"])
    # the gates moved at gate_lr (Adam's first step is ~lr per element; the cosine over 2
    # steps halves the second), not at sensor_lr (3e-3)
    assert 0.045 < float(model.adapter.gates.detach().abs().max()) <= 0.0751


def _tiny(config_cls, model_cls, **extra):
    """A random model of an installed transformers architecture, built from a config."""
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
        bos_token_id=1, **extra,
    )  # fmt: skip
    return model_cls(config).eval()


def _bare_adapter(heads: int = 4):
    from fed_iotlm.llm.conditioning import GatedSensorAdapter

    return GatedSensorAdapter(NAMES, 8, 32, 2, 1.0, 1, 2, heads)


def test_adapter_refuses_a_fused_qkv_model_naming_its_class_and_what_is_missing():
    """Phi-3 (fused qkv_proj), built from its config in the installed transformers."""
    from transformers import Phi3Config, Phi3ForCausalLM

    phi3 = _tiny(Phi3Config, Phi3ForCausalLM)
    with pytest.raises(
        ValueError,
        match=r"Phi3ForCausalLM decoder layer 0 \(Phi3Attention\).*missing \['q_proj', 'k_proj', "
        r"'v_proj'\], found fused \['qkv_proj'\]; use llm.conditioning=\[prefix\]",
    ):
        _bare_adapter().install(phi3)


def test_adapter_on_a_model_with_qk_norms_uses_that_models_own_utilities():
    """Qwen3 (q/k norms, explicit head_dim): the hook takes rotary/repeat_kv from
    modeling_qwen3 and the layer's scaling, and a closed gate is still an exact no-op."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3 import modeling_qwen3

    from fed_iotlm.llm.conditioning import _attention_utils

    qwen = _tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=16)  # 4 heads × 16 ≠ hidden 32
    attn = qwen.model.layers[0].self_attn
    assert _attention_utils(attn) == (modeling_qwen3.apply_rotary_pos_emb, modeling_qwen3.repeat_kv)
    adapter = _bare_adapter()
    adapter.install(qwen)
    ids = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 9]])
    feats = {m: torch.randn(2, 8) for m in NAMES}
    with torch.no_grad():
        plain = qwen(input_ids=ids).logits
        adapter.set_context(feats, torch.ones(2, 2).bool(), torch.zeros(2, dtype=torch.long))
        assert torch.equal(qwen(input_ids=ids).logits, plain)
        adapter.gates.fill_(1.0)
        opened = qwen(input_ids=ids).logits
    assert torch.isfinite(opened).all() and not torch.allclose(opened, plain, atol=1e-4)


TASKS = ("activity", "location")
CLASSES = {"activity": ["walking", "cycling"], "location": ["kitchen", "office"]}


def test_router_picks_the_task_the_question_names_and_falls_back_with_a_notice(caplog):
    from fed_iotlm.llm.routing import TaskRouter

    router = TaskRouter(TASKS, CLASSES)
    assert router.route("What is the activity?") == 0
    assert router.route("One more thing: which location is it?") == 1
    assert router.route("Among kitchen, office, which is it?") == 1  # class names
    assert router.route("Walking or cycling, which is it?") == 0
    assert router.route("Which location? Options: walking, cycling.") == 1  # a name beats classes
    assert router.route("Anything unusual here?", default="location") == 1
    with caplog.at_level("WARNING", logger="fed_iotlm.llm.routing"):
        assert router.route("Anything unusual here?") == 0
    assert "names none of the tasks ['activity', 'location']" in caplog.text
    assert "first task's adapter queries (activity)" in caplog.text
    # one notice per router, however many such questions follow (each counted)
    with caplog.at_level("WARNING", logger="fed_iotlm.llm.routing"):
        assert [router.route(f"Which room, {i}?") for i in range(5)] == [0] * 5
    assert caplog.text.count("names none of the tasks") == 1 and router.unrouted == 6


def _turn_example(task, *questions) -> Example:
    turns = tuple(Turn(q, "x") for q in questions)
    return Example(0, ("imu",), turns, "dialog" if len(turns) > 1 else "external", task, None, "t")


def test_dialog_follow_ups_and_ask_reach_the_task_they_ask_about():
    """A dialog opened on activity whose follow-up asks the location is routed to location
    (the first version used the first task); an ``ask`` question (no task) by its words."""
    lm = load_lm(TINY_MODEL)
    builder = SequenceBuilder(lm.tokenizer, NAMES, list(TASKS), 2, "adapter", classes=CLASSES)
    dialog = _turn_example("activity", "What is the activity?", "What about the location?")
    assert builder.encode(dialog).task_id == 1
    assert builder.encode(_turn_example(None, "Is this the kitchen?")).task_id == 1
    assert builder.encode(_turn_example(None, "Which activity is it?")).task_id == 0


def test_the_routed_tasks_queries_are_the_ones_the_adapter_uses():
    lm = load_lm(TINY_MODEL)
    torch.manual_seed(0)
    model = SensorLM(lm, LoraSettings(r=4, alpha=8), _cond("adapter", tasks=TASKS))
    builder = SequenceBuilder(lm.tokenizer, NAMES, list(TASKS), 2, "adapter", classes=CLASSES)
    assert model.adapter.queries.shape[1] == 2  # one set per task, no "general" slot
    feats = SensorFeatures(
        NAMES, {m: torch.randn(1, 8) for m in NAMES}, torch.ones(1, 2).bool(), {}
    )
    ask = builder.collate([builder.encode(_turn_example(None, "Which location is it?"))])
    with torch.no_grad():
        model.adapter.gates.fill_(1.0)
        before = _layer_outputs(model, ask, feats)[-1]
        model.adapter.queries[:, 0].add_(1.0)  # activity's queries: not this question's
        assert torch.equal(_layer_outputs(model, ask, feats)[-1], before)
        model.adapter.queries[:, 1].add_(1.0)  # location's
        assert not torch.allclose(_layer_outputs(model, ask, feats)[-1], before, atol=1e-5)


# --- per-token routing: a dialog's turns and in-context examples -----------------------


def _routed_model():
    lm = load_lm(TINY_MODEL)
    torch.manual_seed(0)
    model = SensorLM(lm, LoraSettings(r=4, alpha=8), _cond("adapter", tasks=TASKS))
    builder = SequenceBuilder(lm.tokenizer, NAMES, list(TASKS), 2, "adapter", classes=CLASSES)
    g = torch.Generator().manual_seed(3)
    feats = SensorFeatures(
        NAMES, {m: torch.randn(3, 8, generator=g) for m in NAMES}, torch.ones(3, 2).bool(), {}
    )
    with torch.no_grad():
        model.adapter.gates.fill_(1.0)
    return model, builder, feats


def _sample(index: int, question: str, answer: str, task: str = "location") -> Example:
    return Example(index, ("imu",), (Turn(question, answer),), "task", task, 0, "t")


def test_each_turn_and_each_example_is_routed_on_its_own_tokens():
    """The tables the adapter routes by: a dialog's turns by their own questions, and
    in-context examples as segments whose recordings are their own."""
    _, builder, _ = _routed_model()
    dialog = builder.encode(
        _turn_example("activity", "What is the activity?", "What about the location?")
    )
    assert dialog.segmented() and dialog.task_id == 1
    first, second = dialog.token_task.index(0), dialog.token_task.index(1)
    assert first == 0 and set(dialog.token_task[:second]) == {0}
    assert set(dialog.token_task[second:]) == {1} and set(dialog.token_segment) == {0}
    shots = [
        _sample(1, "Which location is it?", "kitchen"),
        _sample(2, "Which location?", "office"),
    ]
    enc = builder.encode(_sample(0, "Which location is it?", ""), shots, prompt_only=True)
    assert enc.samples == [1, 2, 0] and enc.sample_segment == [0, 1, 2]
    assert sorted(set(enc.token_segment)) == [0, 1, 2] and enc.token_segment[-1] == 2
    plain = builder.encode(_sample(0, "Which location is it?", "kitchen"))
    assert not plain.segmented()
    assert builder.collate([plain]).token_task is None  # the per-sequence path, unchanged


def test_per_token_routing_with_one_task_and_segment_equals_the_per_sequence_path():
    model, builder, feats = _routed_model()
    batch = builder.collate([builder.encode(_sample(0, "Which location is it?", "kitchen"))])
    plain = _layer_outputs(model, batch, feats)[-1]
    t = batch.ids.shape[1]
    batch.token_task = torch.full((1, t), 1)
    batch.token_segment = torch.zeros(1, t, dtype=torch.long)
    batch.samples, batch.sample_segment = batch.sample[:, None], torch.zeros(1, 1, dtype=torch.long)
    routed = _layer_outputs(model, batch, feats)[-1]
    assert torch.allclose(routed, plain, atol=1e-6)


def test_an_in_context_example_reads_only_its_own_recording():
    """The question's readings never reach the example's tokens and the example's reach
    the question's only through the LM's own attention (the first version put every
    recording of a sequence in one unordered set, so shots were refused)."""
    model, builder, feats = _routed_model()
    shot = _sample(1, "Which location is it?", "kitchen")
    enc = builder.encode(_sample(0, "Which location is it?", ""), [shot], prompt_only=True)
    batch = builder.collate([enc])
    in_shot = torch.tensor(enc.token_segment) == 0
    before = _layer_outputs(model, batch, feats)[-1][0]
    moved = SensorFeatures(NAMES, {m: v.clone() for m, v in feats.feats.items()}, feats.present, {})
    for m in NAMES:
        moved.feats[m][0] += 1.0  # the question's recording (row 0) only
    after = _layer_outputs(model, batch, moved)[-1][0]
    assert torch.equal(after[in_shot], before[in_shot])
    assert not torch.allclose(after[~in_shot], before[~in_shot], atol=1e-5)


def test_a_dialogs_first_answer_uses_its_own_tasks_queries():
    """Turn 1 asks the activity, turn 2 the location: location's queries reach turn 2's
    tokens only (the sequence used to take the last question's set for every turn)."""
    model, builder, feats = _routed_model()
    dialog = _turn_example("activity", "What is the activity?", "What about the location?")
    enc = builder.encode(dialog)
    batch = builder.collate([enc])
    first_turn = torch.tensor(enc.token_task) == 0
    before = _layer_outputs(model, batch, feats)[-1][0]
    with torch.no_grad():
        model.adapter.queries[:, 1].add_(1.0)  # location's
    after = _layer_outputs(model, batch, feats)[-1][0]
    assert torch.equal(after[first_turn], before[first_turn])
    assert not torch.allclose(after[~first_turn], before[~first_turn], atol=1e-5)
