"""Issue 13 item 5 on CPU: a bf16 base with fp32 trainable parts, and a clear refusal of an
attention layout the gated adapter cannot reuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed_iotlm.llm.conditioning import check_attention
from fed_iotlm.llm.features import FUSED, SensorFeatures
from fed_iotlm.llm.instructions import Example, Turn
from fed_iotlm.llm.loading import TINY_MODEL, load_lm, resolve_dtype
from fed_iotlm.llm.sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from fed_iotlm.llm.sequences import SequenceBuilder

NAMES = ["imu", FUSED]


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_bf16_base_keeps_trainable_parts_fp32_and_trains(kind):
    lm = load_lm(TINY_MODEL, dtype=resolve_dtype("bfloat16", torch.device("cpu")))
    cond = ConditioningSettings(kind, 2, 2, names=NAMES, tasks=["state"], feature_dim=8)
    model = SensorLM(lm, LoraSettings(r=4, alpha=8), cond)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert frozen == {torch.bfloat16}
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable), [
        n for n, p in trainable if p.dtype != torch.float32
    ]
    builder = SequenceBuilder(lm.tokenizer, NAMES, ["state"], 2, kind)
    exs = [
        Example(i, ("imu",), (Turn("State?", "calm"),), "task", "state", 0, "t") for i in range(2)
    ]
    feats = SensorFeatures(
        NAMES, {m: torch.randn(2, 8) for m in NAMES}, torch.ones(2, 2).bool(), {}
    )
    if model.adapter is not None:
        with torch.no_grad():
            model.adapter.gates.fill_(0.5)
    loss = model(builder.collate([builder.encode(ex) for ex in exs]), feats)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)


def test_auto_dtype_and_bad_names():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="llm.dtype='fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_adapter_refuses_a_fused_qkv_attention():
    class FusedAttention(nn.Module):  # Phi-3 style: one projection for q, k and v
        def __init__(self):
            super().__init__()
            self.qkv_proj, self.o_proj, self.head_dim = nn.Linear(8, 24), nn.Linear(8, 8), 4

    with pytest.raises(ValueError, match=r"layer 3 \(FusedAttention\).*fused \['qkv_proj'\]"):
        check_attention(FusedAttention(), "layer 3")
    llama = load_lm(TINY_MODEL).model.model.layers[0].self_attn
    check_attention(llama, "layer 0")  # the supported layout passes


def test_step_flops_match_torch_flop_counter_with_the_head_at_answers_only():
    """The analytic count (benchmarks/llm_step.py's MFU numerator) against torch's own
    counter on a forward + backward step; eager attention so its matmuls are counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from fed_iotlm.llm.flops import train_step_flops

    lm = load_lm(TINY_MODEL)
    lm.model.set_attn_implementation("eager")
    cond = ConditioningSettings("prefix", 2, 2, names=NAMES, tasks=["state"], feature_dim=8)
    model = SensorLM(lm, LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")), cond)
    builder = SequenceBuilder(lm.tokenizer, NAMES, ["state"], 2, "prefix")
    answers = ["calm", "It looks like busy.", "idle", "The state is away."]
    exs = [
        Example(i, ("imu",), (Turn("What is the state of this recording?", a),), "task", "state", 0, "t")
        for i, a in enumerate(answers)
    ]  # fmt: skip
    feats = SensorFeatures(
        NAMES, {m: torch.randn(4, 8) for m in NAMES}, torch.ones(4, 2).bool(), {}
    )
    batch = builder.collate([builder.encode(ex) for ex in exs])
    with FlopCounterMode(display=False) as counter:
        model(batch, feats).backward()
    measured = counter.get_total_flops()
    counted = train_step_flops(model, batch)
    assert counted["answer_tokens"] < counted["tokens"] / 3  # most positions are prompt
    assert abs(counted["total"] - measured) <= 0.01 * measured, (counted, measured)


def test_turn_markers_come_from_the_tokenizers_chat_template():
    import copy

    from fed_iotlm.llm.loading import smollm2_tokenizer
    from fed_iotlm.llm.sequences import chat_markers

    tok = smollm2_tokenizer()
    assert chat_markers(tok) == (
        "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", "\n"
    )  # fmt: skip
    other = copy.deepcopy(tok)
    other.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]: {% endif %}"
    )
    assert chat_markers(other) == ("[user]: ", "<|endoftext|>[assistant]: ", "<|endoftext|>", "")
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="turn markers"):
        chat_markers(other)


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_generate_equals_a_plain_greedy_loop(kind):
    """transformers' generate on spliced embeddings (left padding, KV cache) gives the
    tokens a cache-free greedy loop over the same embeddings gives."""
    lm = load_lm(TINY_MODEL)
    cond = ConditioningSettings(kind, 2, 2, names=NAMES, tasks=["state"], feature_dim=8)
    torch.manual_seed(0)
    model = SensorLM(lm, LoraSettings(r=4, alpha=8), cond).eval()
    if model.adapter is not None:
        with torch.no_grad():
            model.adapter.gates.fill_(0.8)
    builder = SequenceBuilder(lm.tokenizer, NAMES, ["state"], 2, kind)
    qs = ["State?", "What is the state of this long recording, please?"]
    exs = [Example(i, ("imu",), (Turn(q, ""),), "task", "state", 0, "t") for i, q in enumerate(qs)]
    feats = SensorFeatures(
        NAMES, {m: torch.randn(2, 8) for m in NAMES}, torch.ones(2, 2).bool(), {}
    )
    got = model.generate(
        builder.collate([builder.encode(ex, prompt_only=True) for ex in exs], left_pad=True),
        feats,
        eos_id=builder.eos_id,
        max_new_tokens=5,
    )
    for i, ex in enumerate(exs):
        one = builder.collate([builder.encode(ex, prompt_only=True)])
        with torch.no_grad():
            emb = model._inputs(one, feats)
            want = []
            for _ in range(5):
                hidden = model.decoder(inputs_embeds=emb).last_hidden_state[:, -1]
                nxt = int(model.lm_head(hidden).argmax(-1))
                if nxt == builder.eos_id:
                    break
                want.append(nxt)
                emb = torch.cat([emb, model.embed(torch.tensor([[nxt]]))], 1)
            if model.adapter is not None:
                model.adapter.clear_context()
        assert got[i] == want, (kind, i)


def test_conditionings_share_one_base_with_their_own_lora_adapters(tmp_path):
    """No deep copy: the second conditioning adds a named adapter to the same PeftModel;
    tuning one leaves the other's outputs alone; a named adapter's checkpoint loads
    into a fresh model."""
    from fed_iotlm.llm.tuning import TuneSettings, load_weights, tune

    lm = load_lm(TINY_MODEL)
    feats = SensorFeatures(
        NAMES, {m: torch.randn(4, 8) for m in NAMES}, torch.ones(4, 2).bool(), {}
    )
    exs = [
        Example(i, ("imu",), (Turn("State?", "calm"),), "task", "state", 0, "t") for i in range(4)
    ]

    def make(kind: str, base):
        cond = ConditioningSettings(kind, 2, 2, names=NAMES, tasks=["state"], feature_dim=8)
        torch.manual_seed(0)
        model = SensorLM(base, LoraSettings(r=4, alpha=8), cond, adapter_name=kind)
        return model, SequenceBuilder(lm.tokenizer, NAMES, ["state"], 2, kind)

    prefix, pb = make("prefix", lm)
    lm.model = prefix.peft
    adapter, ab = make("adapter", lm)
    assert adapter.peft is prefix.peft and set(prefix.peft.peft_config) == {"prefix", "adapter"}
    batch = pb.collate([pb.encode(ex) for ex in exs])
    with torch.no_grad():
        before = prefix(batch, feats)
    settings = TuneSettings(steps=3, batch_size=4, lr=1e-2, sensor_lr=1e-2, warmup=0)
    tune(adapter, ab, exs, feats, settings, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(prefix(batch, feats), before)  # the other adapter is untouched
        trained = adapter(ab.collate([ab.encode(ex) for ex in exs]), feats)
    fresh_cond = ConditioningSettings("adapter", 2, 2, names=NAMES, tasks=["state"], feature_dim=8)
    fresh = SensorLM(load_lm(TINY_MODEL), LoraSettings(r=4, alpha=8), fresh_cond)
    load_weights(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh(ab.collate([ab.encode(ex) for ex in exs]), feats), trained)
