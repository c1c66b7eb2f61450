"""Instruction generation: generic over datasets, deterministic, and never answers without a label.

The main fixture is a hand-built dataset with names unlike the synthetic one's: a task
whose name contains one of its class names (``room_type`` / ``room``), and a class whose
name contains another (``very_agitated`` / ``agitated``), so label recovery is exercised.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fed_iotlm.data.dataset import DatasetMeta, Split
from fed_iotlm.data.modalities import ModalitySpec, TaskSpec
from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic
from fed_iotlm.llm.instructions import (
    FOLLOW_UPS,
    PRESENCE_QUESTIONS,
    TASK_QUESTIONS,
    TEMPLATE_SETS,
    answer_to_class,
    build_instructions,
    describe_present,
    load_jsonl,
    task_examples,
)

N = 80
ROOM = TaskSpec("room_type", ("room", "hall_way", "lab"))
MOOD = TaskSpec("mood", ("calm", "agitated", "very_agitated"))


def toy_meta() -> DatasetMeta:
    return DatasetMeta(
        name="toy",
        modalities={
            "wrist": ModalitySpec("wrist", "imu"),
            "ceiling_cam": ModalitySpec("ceiling_cam", "image"),
            "env": ModalitySpec("env", "tabular"),
        },
        tasks={"room_type": ROOM, "mood": MOOD},
    )


def toy_split(n: int = N, seed: int = 0) -> Split:
    """Random masks (row 0 has no modality) and labels with ~30% unlabelled per task."""
    rng = np.random.default_rng(seed)
    mask = {m: rng.random(n) < 0.6 for m in ("wrist", "ceiling_cam", "env")}
    for m in mask.values():
        m[0] = False
    y = {}
    for task, k in (("room_type", 3), ("mood", 3)):
        labels = rng.integers(0, k, n)
        labels[rng.random(n) < 0.3] = -1
        y[task] = labels.astype(np.int64)
    x = {
        "wrist": np.zeros((n, 8, 3), np.float32),
        "ceiling_cam": np.zeros((n, 1, 4, 4), np.float32),
        "env": np.zeros((n, 4), np.float32),
    }
    return Split(x=x, mask=mask, y=y)


def present_of(split: Split, i: int) -> tuple[str, ...]:
    return tuple(m for m in ("wrist", "ceiling_cam", "env") if split.mask[m][i])


def test_deterministic_given_seed() -> None:
    meta, split = toy_meta(), toy_split()
    a = build_instructions(meta, split, per_sample=3, seed=5)
    assert a == build_instructions(meta, split, per_sample=3, seed=5)
    assert a != build_instructions(meta, split, per_sample=3, seed=6)


def test_template_sets_disjoint_and_all_used() -> None:
    for table in (TASK_QUESTIONS, PRESENCE_QUESTIONS, FOLLOW_UPS):
        assert set(table) == set(TEMPLATE_SETS)
        assert not set(table["train"]) & set(table["heldout"])
    assert len(TASK_QUESTIONS["train"]) >= 6 and len(TASK_QUESTIONS["heldout"]) >= 3
    meta, split = toy_meta(), toy_split()
    questions = {}
    for ts in TEMPLATE_SETS:
        exs = build_instructions(meta, split, templates=ts, kinds=("task",), per_sample=4)
        assert all(e.template.split(":")[1] == ts for e in exs)
        used = {int(e.template.rsplit(":", 1)[1]) for e in exs}
        assert used == set(range(len(TASK_QUESTIONS[ts])))
        questions[ts] = {e.turns[0].question for e in exs}
        pres = build_instructions(meta, split, templates=ts, kinds=("presence",), per_sample=3)
        assert {e.template for e in pres} == {
            f"presence:{ts}:{j}" for j in range(len(PRESENCE_QUESTIONS[ts]))
        }
    assert not questions["train"] & questions["heldout"]


def test_task_answers_name_the_class_and_map_back() -> None:
    meta, split = toy_meta(), toy_split()
    forms = set()
    for ts in TEMPLATE_SETS:
        for e in build_instructions(meta, split, templates=ts, kinds=("task",), per_sample=5):
            spec = meta.tasks[e.task]
            assert e.label == split.y[e.task][e.index] >= 0
            assert len(e.turns) == 1 and spec.words(e.label) in e.turns[0].answer
            assert answer_to_class(e.turns[0].answer, spec) == e.label
            forms.add(e.turns[0].answer == spec.words(e.label))
            assert "{" not in e.turns[0].question
    assert forms == {True, False}  # both bare names and sentences are used


def test_unlabelled_samples_never_get_an_answer() -> None:
    meta, split = toy_meta(), toy_split()
    exs = build_instructions(meta, split, per_sample=6, seed=1)
    assert {e.kind for e in exs} == {"task", "presence", "dialog"}
    for e in exs:
        for turn in e.turns:
            for name, spec in meta.tasks.items():
                if split.y[name][e.index] < 0:
                    assert answer_to_class(turn.answer, spec) is None, (e, name)
    # with only task questions, rows unlabelled for every task give nothing
    none = np.flatnonzero((split.y["room_type"] < 0) & (split.y["mood"] < 0))
    assert none.size
    rows = {e.index for e in build_instructions(meta, split, kinds=("task", "dialog"))}
    assert not rows & set(none.tolist())


def test_presence_answers_match_mask_and_empty_rows_are_skipped() -> None:
    meta, split = toy_meta(), toy_split()
    exs = build_instructions(meta, split, kinds=("presence",), per_sample=2)
    assert 0 not in {e.index for e in exs}
    for e in exs:
        assert e.present == present_of(split, e.index)
        assert e.turns[0].answer == describe_present(e.present)
    assert describe_present(("a", "b", "c")) == "a, b and c"
    assert describe_present(["imu", "audio"]) == "imu and audio"


def test_dialogs_have_supervised_turns() -> None:
    meta, split = toy_meta(), toy_split()
    dialogs = build_instructions(meta, split, kinds=("dialog",), per_sample=2)
    assert {len(d.turns) for d in dialogs} == {2, 3}
    for d in dialogs:
        assert d.turns[0].answer == describe_present(d.present)
        spec = meta.tasks[d.task]
        assert answer_to_class(d.turns[1].answer, spec) == split.y[d.task][d.index]
        if len(d.turns) == 3:
            other = next(t for t in meta.tasks if t != d.task)
            label = split.y[other][d.index]
            assert answer_to_class(d.turns[2].answer, meta.tasks[other]) == label >= 0


def test_task_examples_one_per_labelled_present_sample() -> None:
    meta, split = toy_meta(), toy_split()
    exs = task_examples(meta, split, "mood", templates="heldout")
    want = [i for i in range(N) if split.y["mood"][i] >= 0 and present_of(split, i)]
    assert [e.index for e in exs] == want
    assert all(e.kind == "task" and e.task == "mood" for e in exs)
    sub = task_examples(meta, split, "mood", indices=want[:3])
    assert [e.index for e in sub] == want[:3]


def test_errors_are_loud() -> None:
    meta, split = toy_meta(), toy_split()
    with pytest.raises(ValueError, match="no present modality"):
        build_instructions(meta, split, indices=[0])
    with pytest.raises(ValueError, match="unknown task"):
        build_instructions(meta, split, tasks=["colour"])
    with pytest.raises(ValueError, match="templates"):
        build_instructions(meta, split, templates="test")
    with pytest.raises(ValueError, match="kinds"):
        build_instructions(meta, split, kinds=("external",))
    with pytest.raises(ValueError, match="out of range"):
        build_instructions(meta, split, indices=[N])


def test_answer_to_class_edge_cases() -> None:
    assert answer_to_class("The mood is CALM.", MOOD) == 0
    assert answer_to_class("no idea", MOOD) is None
    assert answer_to_class("", MOOD) is None
    assert answer_to_class("calmness", MOOD) is None  # whole words only
    assert answer_to_class("agitated, not calm", MOOD) == 1  # earliest wins
    assert answer_to_class("calm, not agitated", MOOD) == 0
    assert answer_to_class("very agitated", MOOD) == 2  # longest on ties
    assert answer_to_class("Very-Agitated!", MOOD) == 2
    assert answer_to_class("It is the hall way.", ROOM) == 1  # underscores == spaces
    assert answer_to_class("hall-way", ROOM) == 1


def test_load_jsonl(tmp_path) -> None:
    good = tmp_path / "good.jsonl"
    rows = [
        {"index": 2, "question": "Q?", "answer": "A."},
        {"index": 0, "question": "q", "answer": "a", "task": "mood", "present": ["env"]},
    ]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    exs = load_jsonl(good, split_len=3)
    assert [(e.index, e.kind, e.task, e.present) for e in exs] == [
        (2, "external", None, ()),
        (0, "external", "mood", ("env",)),
    ]
    cases = [
        ('{"index": 5, "question": "q", "answer": "a"}', "key 'index'"),
        ('{"index": "1", "question": "q", "answer": "a"}', "key 'index'"),
        ('{"index": 1, "answer": "a"}', "key 'question'"),
        ('{"index": 1, "question": "q", "answer": ""}', "key 'answer'"),
        ('{"index": 1, "question": "q", "answer": "a", "tsak": "x"}', "key 'tsak'"),
        ('{"index": 1, "question": "q", "answer": "a", "present": "env"}', "key 'present'"),
        ("not json", "invalid JSON"),
    ]
    for line, key in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: {key}"):
            load_jsonl(bad, split_len=3)


def test_synthetic_dataset_smoke() -> None:
    ds = make_synthetic(SyntheticConfig(num_train=12, num_test=4, audio_len=64))
    exs = build_instructions(ds.meta, ds.train, per_sample=2)
    assert len(exs) == 24
    for e in exs:
        if e.kind == "task":
            assert answer_to_class(e.turns[-1].answer, ds.meta.tasks[e.task]) == e.label


def test_dialogs_without_presence_turns_open_with_their_task() -> None:
    meta, split = toy_meta(), toy_split()
    dialogs = build_instructions(
        meta, split, kinds=("task", "dialog"), per_sample=3, presence_turns=False
    )
    assert {d.kind for d in dialogs} == {"task", "dialog"}
    for d in dialogs:
        assert all(t.answer != describe_present(d.present) for t in d.turns)
        assert answer_to_class(d.turns[0].answer, meta.tasks[d.task]) == split.y[d.task][d.index]
