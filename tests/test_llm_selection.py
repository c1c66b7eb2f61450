"""Issue 13 item 2: the LM stage makes every choice on its validation questions.

Run the whole stage twice on the same rows, the second time with the test split's labels
permuted: the choice (conditioning, scoring) and every validation figure must be
identical, only test figures may move.  Plus option log-likelihood scoring checked
against a direct teacher-forced computation, and the controls' building blocks.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fed_iotlm.data.dataset import Split
from fed_iotlm.llm.evaluation import majority_accuracy, shuffled_sensors
from fed_iotlm.llm.features import FUSED, SensorFeatures
from fed_iotlm.llm.instructions import Example, Turn
from fed_iotlm.llm.loading import TINY_MODEL, load_lm
from fed_iotlm.llm.sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from fed_iotlm.llm.sequences import IGNORE, SequenceBuilder

NAMES = ["imu", "audio", FUSED]


def test_permuting_test_labels_changes_no_choice(tmp_path):
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import load_bundle, save_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.llm.recipe import stage_data
    from fed_iotlm.llm.stage import run_stage
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.settings import compose

    data_args = ["data.num_train=120", "data.num_test=40"]
    spec = model_spec(compose(data_args))
    torch.manual_seed(0)
    save_bundle(tmp_path / "bundle", state_to_numpy(MultisensoryModel(spec)), spec, {})
    cfg = compose(
        [*data_args, f"llm.bundle={tmp_path / 'bundle'}", f"llm.model={TINY_MODEL}",
         "llm.steps=2", "llm.batch_size=4", "llm.train_samples=16", "llm.eval_samples=8",
         "llm.val_samples=8", "llm.max_new_tokens=3", "llm.controls=[majority,head]",
         "llm.adapter.layers=2", "mlflow.enabled=false"]
    )  # fmt: skip
    data = stage_data(cfg, load_bundle(tmp_path / "bundle")[0])
    # a permutation of the test labels: shuffled across rows and each class renamed to the
    # next one (an untrained head that answers one class scores the same on merely
    # shuffled labels, so shuffling alone could leave every test figure unchanged)
    rng = np.random.default_rng(1)
    n_classes = {t: int(v.max()) + 1 for t, v in data.test.y.items()}
    labels = {
        t: np.where(v >= 0, (rng.permutation(v) + 1) % n_classes[t], -1)
        for t, v in data.test.y.items()
    }
    permuted = replace(data, test=Split(x={}, mask=data.test.mask, y=labels))
    a = json.loads(run_stage(cfg, tmp_path / "a", data).read_text())
    b = json.loads(run_stage(cfg, tmp_path / "b", permuted).read_text())
    assert a["selection"] == b["selection"] and a["selection"]["chosen_on"] == "val"
    assert a["val"] == b["val"]
    for kind, rep in a["llm"]["conditioning"].items():
        assert rep["val"] == b["llm"]["conditioning"][kind]["val"]
    # ... while the test figures did see the new labels
    test_a = json.dumps({k: v for k, v in a["llm"].items() if k != "selection"}, sort_keys=True)
    test_b = json.dumps({k: v for k, v in b["llm"].items() if k != "selection"}, sort_keys=True)
    assert test_a != test_b


def _model(kind: str):
    lm = load_lm(TINY_MODEL)
    cond = ConditioningSettings(kind, 2, 2, names=NAMES, tasks=["state"], feature_dim=8)
    torch.manual_seed(0)
    model = SensorLM(lm, LoraSettings(r=4, alpha=8), cond)
    if model.adapter is not None:
        with torch.no_grad():
            model.adapter.gates.fill_(0.7)  # open, so the sensors matter
    return model.eval(), SequenceBuilder(lm.tokenizer, NAMES, ["state"], 2, kind)


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_option_scores_equal_teacher_forced_log_likelihood(kind):
    model, builder = _model(kind)
    g = torch.Generator().manual_seed(0)
    feats = SensorFeatures(
        NAMES, {m: torch.randn(3, 8, generator=g) for m in NAMES}, torch.ones(3, 3).bool(), {}
    )
    questions = ["What is the state?", "Which state is it now, please?", "State?"]
    exs = [
        Example(i, ("imu", "audio")[: 1 + i % 2], (Turn(q, ""),), "task", "state", 0, "t")
        for i, q in enumerate(questions)
    ]
    options = ["calm", "very busy indeed", "idle"]
    batch = builder.collate([builder.encode(ex, prompt_only=True) for ex in exs], left_pad=True)
    with torch.no_grad():
        got = model.option_scores(
            batch, feats, [builder.answer_ids(o) for o in options], builder.pad_id
        )
        for i, ex in enumerate(exs):
            for c, option in enumerate(options):
                full = replace(ex, turns=(Turn(ex.turns[0].question, option),))
                enc = builder.encode(full)
                enc.labels = enc.labels[: len(enc.labels) - 1]  # drop the trailing newline
                enc.ids = enc.ids[: len(enc.labels)]
                for key in ("slot_sample", "slot_mod", "slot_j"):
                    setattr(enc, key, getattr(enc, key)[: len(enc.labels)])
                one = builder.collate([enc])
                emb = model._inputs(one, feats)
                hidden = model.decoder(inputs_embeds=emb, attention_mask=one.attn).last_hidden_state
                logp = torch.log_softmax(model.lm_head(hidden[0, :-1]).float(), -1)
                target = one.labels[0, 1:]
                sel = target != IGNORE
                want = logp[sel].gather(-1, target[sel][:, None]).sum()
                assert torch.allclose(got[i, c], want, atol=1e-4), (kind, i, option)


def test_shuffled_sensors_move_readings_only_within_the_same_sensor_set():
    present = torch.tensor([[1, 0, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 0, 1], [0, 1, 1]])
    present = present.bool()
    ids = torch.arange(6).float()[:, None].repeat(1, 4)
    feats = SensorFeatures(NAMES, {m: ids.clone() for m in NAMES}, present, {})
    out = shuffled_sensors(feats, [0, 1, 2, 3, 4, 5], seed=0)
    moved = out.feats["imu"][:, 0].long().tolist()
    assert sorted(moved) == list(range(6)) and moved != list(range(6))
    assert torch.equal(out.present, present)  # every row keeps a reading of its own sensor set
    assert moved[5] == 5  # alone in its group


def test_majority_uses_training_labels_only():
    train = Split(x={}, mask={}, y={"state": np.array([2, 2, 1, -1, -1, -1, 0])})
    exs = [Example(i, ("imu",), (), "task", "state", lab, "t") for i, lab in enumerate([2, 0])]
    assert majority_accuracy(train, [0, 1, 2, 3, 4, 5, 6], exs)["accuracy"] == 0.5


def test_choice_follows_validation_even_when_test_disagrees():
    from fed_iotlm.llm.stage import choose_on_validation

    val = {
        "prefix": {"generation": {"accuracy": 0.6}, "loglik": {"accuracy": 0.7}},
        "adapter": {"generation": {"accuracy": 0.9}, "loglik": {"accuracy": 0.4}},
    }
    assert choose_on_validation(val) == ("adapter", "generation")
    tie = {"prefix": {"loglik": {"accuracy": 0.5}}, "adapter": {"loglik": {"accuracy": 0.5}}}
    assert choose_on_validation(tie) == ("prefix", "loglik")
    with pytest.raises(ValueError, match="llm.conditioning"):
        choose_on_validation({})
