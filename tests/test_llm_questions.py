"""Issue 13 build 3: question types beyond classification (two tasks at once, comparison of
two recordings, counting over n recordings).

Generated from masks and labels only (the splits here carry no inputs at all): answers
correct by construction, yes/no exactly balanced, every recording of a question from the
pool it was asked to draw from; parsing and scoring by hand-made answers; two recordings
in one sequence for prefix slots and the adapter's prompt; and one tiny stage run end to
end with every type switched on.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from fed_iotlm.data.dataset import Split
from fed_iotlm.llm.features import FUSED, SensorFeatures
from fed_iotlm.llm.instructions import TEMPLATE_SETS, Example, Turn, describe_present
from fed_iotlm.llm.loading import TINY_MODEL, load_lm
from fed_iotlm.llm.question_eval import baselines, metrics, options, parse
from fed_iotlm.llm.questions import (
    COMPARISON_QUESTIONS,
    COUNT_QUESTIONS,
    TWO_TASK_QUESTIONS,
    check_types,
    comparison_examples,
    count_examples,
    parse_count,
    parse_two_tasks,
    parse_yes_no,
    two_task_examples,
)
from fed_iotlm.llm.sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from fed_iotlm.llm.sequences import SequenceBuilder
from tests.test_llm_instructions import MOOD, ROOM, N, present_of, toy_meta, toy_split

TASKS = ["room_type", "mood"]


def labels_only(split: Split) -> Split:
    """What the centre holds under llm.data=nodes: masks and labels, no inputs."""
    return Split(x={}, mask=split.mask, y=split.y)


def test_two_tasks_answer_both_labels_on_either_template_set() -> None:
    meta, split = toy_meta(), labels_only(toy_split())
    rows = list(range(40))
    both = [i for i in rows if present_of(split, i) and all(split.y[t][i] >= 0 for t in TASKS)]
    groups = {}
    for ts in TEMPLATE_SETS:
        exs = two_task_examples(meta, split, rows, TASKS, templates=ts, seed=3, offset=100)
        assert [e.index - 100 for e in exs] == both  # one per row labelled for both tasks
        for e in exs:
            i = e.index - 100
            assert e.qtype == "two_tasks" and e.tasks == ("room_type", "mood")
            assert e.labels == (split.y["room_type"][i], split.y["mood"][i])
            assert e.present == present_of(split, i)
            assert parse_two_tasks(e.turns[0].answer, ROOM, MOOD) == e.labels
            sensors = describe_present(e.present)
            asked = {
                q.format(a="room type", b="mood", sensors=sensors) for q in TWO_TASK_QUESTIONS[ts]
            }
            assert e.turns[0].question in asked
        # both answer forms occur, and the sentence one still maps back ("room type"
        # contains the class "room": task names are taken out before matching)
        assert {e.turns[0].answer.startswith("The ") for e in exs} == {True, False}
        groups[ts] = [(e.index, e.labels) for e in exs]
    assert groups["train"] == groups["heldout"]  # the same rows, other words
    with pytest.raises(ValueError, match="two tasks"):
        two_task_examples(meta, split, rows, ["mood"])


def test_comparison_is_balanced_and_stays_in_its_pool() -> None:
    meta, split = toy_meta(), labels_only(toy_split())
    pool = list(range(10, 60))
    exs = comparison_examples(meta, split, pool, TASKS, 41, templates="heldout", seed=1)
    assert len(exs) == 40  # rounded down to even: exactly half yes
    assert Counter(e.target for e in exs) == {1: 20, 0: 20}
    assert {e.turns[0].answer.split(",")[0].lower() for e in exs} <= {"yes", "no"}
    for e in exs:
        a, b = e.rows
        assert a != b and a in pool and b in pool  # both from the pool asked about
        (t,) = e.tasks
        assert e.labels == (split.y[t][a], split.y[t][b]) and min(e.labels) >= 0
        assert e.target == int(e.labels[0] == e.labels[1])
        assert parse_yes_no(e.turns[0].answer) == e.target
        assert e.row_presents == (present_of(split, a), present_of(split, b))
        assert all(e.row_presents)
        assert e.turns[0].question in {
            q.format(task=t.replace("_", " ")) for q in COMPARISON_QUESTIONS["heldout"]
        }
    again = comparison_examples(meta, split, pool, TASKS, 41, templates="train", seed=1)
    assert [(e.rows, e.target) for e in again] == [(e.rows, e.target) for e in exs]
    assert {e.turns[0].question for e in again}.isdisjoint({e.turns[0].question for e in exs})
    with pytest.raises(ValueError, match="two rows"):
        comparison_examples(meta, split, [1, 2], TASKS, 4)


def test_count_answers_are_the_count_and_spread_over_every_value() -> None:
    meta, split = toy_meta(), labels_only(toy_split())
    pool = list(range(1, N))
    exs = count_examples(meta, split, pool, TASKS, 200, 3, templates="train", seed=2, offset=7)
    assert len(exs) == 200
    seen = Counter(e.target for e in exs)
    assert set(seen) == {0, 1, 2, 3} and min(seen.values()) > 30  # uniform over 0..3
    for e in exs:
        rows = [r - 7 for r in e.rows]
        assert len(set(rows)) == 3 and set(rows) <= set(pool)
        (t,) = e.tasks
        assert e.labels == tuple(split.y[t][r] for r in rows) and min(e.labels) >= 0
        assert e.target == sum(lab == e.label for lab in e.labels)  # the asked class
        assert meta.tasks[t].words(e.label) in e.turns[0].question
        assert parse_count(e.turns[0].answer) == e.target
        assert e.turns[0].question in {
            q.format(n=3, task=t.replace("_", " "), cls=meta.tasks[t].words(e.label))
            for q in COUNT_QUESTIONS["train"]
        }
    with pytest.raises(ValueError, match="count_recordings"):
        count_examples(meta, split, pool, TASKS, 5, 1)
    with pytest.raises(ValueError, match="no task"):
        count_examples(meta, split, [1, 2], TASKS, 5, 3)


def test_question_types_are_checked() -> None:
    assert check_types(["classification", "count"]) == ["classification", "count"]
    with pytest.raises(ValueError, match="must include classification"):
        check_types(["count"])
    with pytest.raises(ValueError, match="unknown"):
        check_types(["classification", "regression"])
    with pytest.raises(ValueError, match="repeated"):
        check_types(["classification", "count", "count"])


def test_parsing() -> None:
    assert parse_yes_no("Yes, the same activity.") == 1
    assert parse_yes_no("no") == 0
    assert parse_yes_no("Not the same; no.") == 0  # "not" is not "no"
    assert parse_yes_no("nobody knows") is None
    assert parse_count("2") == 2 and parse_count("Three of them.") == 3
    assert parse_count("there are 0") == 0 and parse_count("none") is None
    assert parse_count("10 recordings") == 10 and parse_count("1.5") is None
    assert parse_two_tasks(
        "The room type is hall way and the mood is very agitated.", ROOM, MOOD
    ) == (1, 2)
    assert parse_two_tasks("lab, calm", ROOM, MOOD) == (2, 0)
    assert parse_two_tasks("calm", ROOM, MOOD) == (None, 0)


def _ex(qtype: str, **kw) -> Example:
    return Example(0, ("wrist",), (Turn("q", "a"),), qtype, kw.pop("task", None), kw.pop("label", None), "t", qtype=qtype, **kw)  # fmt: skip


def test_scoring_and_baselines() -> None:
    meta = toy_meta()
    two = [
        _ex("two_tasks", tasks=("room_type", "mood"), labels=lab)
        for lab in [(0, 1), (2, 2), (1, 1)]
    ]
    preds = [
        parse(e, t, meta)
        for e, t in zip(two, ["room, agitated", "lab, calm", "hall way"], strict=True)
    ]
    got = metrics(two, preds)
    assert got["accuracy"] == pytest.approx(1 / 3)  # both right only in the first
    assert got["by_task"] == {"room_type": 1.0, "mood": pytest.approx(1 / 3)}
    assert got["answered"] == pytest.approx(2 / 3)
    texts, meaning = options(two[0], meta)
    assert len(texts) == 9 and meaning[texts.index("lab, very agitated")] == (2, 2)

    count = [_ex("count", task="mood", target=k, samples=(1, 2, 3)) for k in (0, 3, 2, 2)]
    got = metrics(count, [0, 1, None, 2])
    assert got["accuracy"] == 0.5 and got["mae"] == pytest.approx(2 / 3)
    assert got["answered"] == 0.75
    assert options(count[0], meta) == (["0", "1", "2", "3"], [0, 1, 2, 3])
    train = [_ex("count", task="mood", target=k, samples=(1, 2, 3)) for k in (2, 2, 1)]
    base = baselines(train, count, meta)
    assert base["majority"]["accuracy"] == 0.5  # always 2
    assert base["majority"]["mae"] == pytest.approx((2 + 1 + 0 + 0) / 4)
    assert base["chance"]["accuracy"] == 0.25
    assert base["chance"]["mae"] == pytest.approx(np.mean([1.5, 1.5, 1.0, 1.0]))

    comp = [_ex("comparison", task="mood", target=t, samples=(1, 2)) for t in (1, 0, 0, 1)]
    assert metrics(comp, [1, 1, 0, None])["accuracy"] == 0.5
    base = baselines(comp, comp, meta)
    assert base["chance"]["accuracy"] == 0.5 and base["majority"]["accuracy"] == 0.5


NAMES = ["imu", "audio", FUSED]


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_two_recordings_in_one_sequence(kind) -> None:
    lm = load_lm(TINY_MODEL)
    cond = ConditioningSettings(kind, 2, 2, names=NAMES, tasks=["state"], feature_dim=8)
    torch.manual_seed(0)
    model = SensorLM(lm, LoraSettings(r=4, alpha=8), cond).eval()
    builder = SequenceBuilder(lm.tokenizer, NAMES, ["state"], 2, kind)
    if model.adapter is not None:
        with torch.no_grad():
            model.adapter.gates.fill_(0.7)
    g = torch.Generator().manual_seed(0)
    feats = SensorFeatures(
        NAMES, {m: torch.randn(4, 8, generator=g) for m in NAMES}, torch.ones(4, 3).bool(), {}
    )
    turn = (Turn("Do these two recordings show the same state?", "yes"),)
    pair = Example(0, ("imu",), turn, "comparison", "state", None, "t", qtype="comparison",
                   samples=(0, 2), presents=(("imu",), ("imu", "audio")), tasks=("state",), target=1)  # fmt: skip
    single = Example(1, ("audio",), (Turn("What is the state?", "calm"),), "task", "state", 0, "t")
    enc = builder.encode(pair)
    if kind == "prefix":  # recording 1: imu + fused slots of row 0; recording 2: all of row 2
        slots = [(s, m) for s, m in zip(enc.slot_sample, enc.slot_mod, strict=True) if s >= 0]
        want = [(0, 0), (0, 0), (0, 2), (0, 2), (2, 0), (2, 0), (2, 1), (2, 1), (2, 2), (2, 2)]
        assert slots == want
        assert "Recording 2:" in builder.tok.decode(enc.ids)
    else:
        assert "recording 2: imu and audio" in builder.tok.decode(enc.ids)
    batch = builder.collate([enc, builder.encode(single)])
    assert batch.samples.tolist() == [[0, 2], [1, -1]]

    def hidden(f: SensorFeatures, b=batch) -> torch.Tensor:
        with torch.no_grad():
            emb = model._inputs(b, f)
            return model.decoder(inputs_embeds=emb, attention_mask=b.attn).last_hidden_state

    base = hidden(feats)
    moved = SensorFeatures(NAMES, {m: v.clone() for m, v in feats.feats.items()}, feats.present, {})
    for m in NAMES:
        moved.feats[m][2] += 1.0  # only the second recording of the pair
    other = hidden(moved)
    assert not torch.allclose(other[0], base[0], atol=1e-4)  # the pair reads recording 2
    n = len(builder.encode(single).ids)
    alone = hidden(feats, builder.collate([builder.encode(single)]))
    assert torch.allclose(base[1, :n], alone[0], atol=1e-5)  # padding adds no recording
    assert torch.allclose(other[1, :n], alone[0], atol=1e-5)


def test_stage_reports_every_question_type(tmp_path) -> None:
    """A tiny stage run with all four types: each is asked on validation and test, scored
    both ways per conditioning, and reported for the chosen one with its baselines."""
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import load_bundle, save_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.llm.recipe import stage_data, stage_questions
    from fed_iotlm.llm.stage import run_stage
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.settings import compose

    data_args = ["data.num_train=120", "data.num_test=40"]
    spec = model_spec(compose(data_args))
    torch.manual_seed(0)
    save_bundle(tmp_path / "bundle", state_to_numpy(MultisensoryModel(spec)), spec, {})
    common = [*data_args, f"llm.bundle={tmp_path / 'bundle'}", f"llm.model={TINY_MODEL}",
              "llm.steps=2", "llm.batch_size=4", "llm.train_samples=16", "llm.eval_samples=12",
              "llm.val_samples=8", "llm.max_new_tokens=4", "llm.adapter.layers=2",
              "mlflow.enabled=false"]  # fmt: skip
    types = "llm.question_types=[classification,two_tasks,comparison,count]"
    cfg = compose([*common, types, "llm.controls=[majority,head,shuffled_sensors,train_templates]"])
    data = stage_data(cfg, load_bundle(tmp_path / "bundle")[0])
    assert data.source["raw_samples_at_centre"] == 0 and not data.train.x and not data.test.x
    plain = stage_questions(data, compose(common)["llm"], 0, ["activity", "location"])
    assert plain.types == {}  # the default asks classification only
    qs = stage_questions(data, cfg["llm"], 0, ["activity", "location"])
    assert len(qs.train) == 4 * len(plain.train) and qs.train[: len(plain.train)] == plain.train
    off = data.test_offset
    for qt, parts in qs.types.items():
        assert all(off <= r for ex in parts["test"] for r in ex.rows)  # test rows only
        val_rows = set(np.setdiff1d(np.arange(len(data.train)), qs.fit_rows).tolist())
        assert all(r in val_rows for ex in parts["val"] for r in ex.rows), qt
        assert all(r in set(qs.fit_rows.tolist()) for ex in parts["train"] for r in ex.rows)
    doc = json.loads(run_stage(cfg, tmp_path / "run", data).read_text())
    table = doc["llm"]["question_types"]
    assert set(table) == {"two_tasks", "comparison", "count"}
    for qt, row in table.items():
        assert row["conditioning"] == doc["selection"]["conditioning"]
        for key in ("test", "val", "majority", "chance", "train_templates", "shuffled_sensors"):
            assert 0.0 <= row[key]["accuracy"] <= 1.0, (qt, key)
        assert set(row["by_scoring"]) == {"generation", "loglik"}
        assert row["by_scoring"]["loglik"]["answered"] == 1.0
    assert table["comparison"]["chance"]["accuracy"] == 0.5
    assert table["count"]["chance"]["accuracy"] == 0.25 and "mae" in table["count"]["test"]
    assert set(table["two_tasks"]["test"]["by_task"]) == {"activity", "location"}
    for rep in doc["llm"]["conditioning"].values():
        assert set(rep["question_types"]) == set(table)
