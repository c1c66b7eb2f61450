"""Issue 13 build 4: the knobs that may make a held-out task answerable, each tested.

Options in the question, classes described in words (from meta.json or a fallback),
more training phrasings, in-context examples with their own sensor tokens (prefix) and
the adapters' refusal of them; the whole stage with a task held out; and the transfer
study's choice, made on validation figures only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fed_iotlm.data.dataset import DatasetMeta, Split
from fed_iotlm.data.exchange import DatasetFormatError, load_meta
from fed_iotlm.data.modalities import ModalitySpec, TaskSpec
from fed_iotlm.llm.instructions import (
    FOLLOW_UPS,
    MORE_TASK_QUESTIONS,
    TASK_QUESTIONS,
    Phrasing,
    build_instructions,
    phrasing_of,
    task_examples,
)

N = 60


def meta(descriptions: tuple[str, ...] = ()) -> DatasetMeta:
    return DatasetMeta(
        "toy",
        {"imu": ModalitySpec("imu", "imu"), "audio": ModalitySpec("audio", "audio")},
        {
            "gait": TaskSpec("gait", ("shuffle", "stride", "limp")),
            "room": TaskSpec("room", ("attic", "cellar"), descriptions=descriptions),
        },
    )


def split(seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(
        x={},
        mask={"imu": np.ones(N, bool), "audio": rng.random(N) < 0.5},
        y={"gait": rng.integers(0, 3, N), "room": rng.integers(0, 2, N)},
    )


def questions(examples) -> list[tuple[str, str]]:
    """(question, the task it asks about) of every turn; a dialog's follow-up asks about
    the other task."""
    out = []
    for ex in examples:
        for t, turn in enumerate(ex.turns):
            task = ex.task if t == 0 else next(x for x in ("gait", "room") if x != ex.task)
            out.append((turn.question, task))
    return out


# ---------------------------------------------------------------- options in the question


def test_options_end_every_question_with_its_own_tasks_classes() -> None:
    ph = Phrasing(options=True)
    exs = build_instructions(
        meta(), split(), kinds=("task", "dialog"), phrasing=ph, seed=3, presence_turns=False
    )
    exs += task_examples(meta(), split(), "room", templates="heldout", phrasing=ph)
    asked = questions(exs)
    assert any(len(ex.turns) > 1 for ex in exs)  # follow-ups are covered
    for q, task in asked:
        want = {"gait": "shuffle, stride, limp", "room": "attic, cellar"}[task]
        assert q.endswith(f" Answer with one of: {want}."), q


def test_options_off_leaves_the_questions_as_they_were() -> None:
    plain = build_instructions(meta(), split(), kinds=("task", "dialog"), seed=3)
    off = build_instructions(meta(), split(), kinds=("task", "dialog"), seed=3, phrasing=Phrasing())
    assert plain == off
    assert not any("Answer with one of" in q for q, _ in questions(plain))


# ---------------------------------------------------------------- classes described in words


def test_descriptions_from_meta_else_class_and_task_name() -> None:
    m = meta(descriptions=("the room under the roof", ""))
    ph = Phrasing(options=True, descriptions=True)
    q = task_examples(m, split(), "room", phrasing=ph)[0].turns[0].question
    assert q.endswith("Answer with one of: the room under the roof, cellar (room).")
    q = task_examples(m, split(), "gait", phrasing=ph)[0].turns[0].question
    assert q.endswith("Answer with one of: shuffle (gait), stride (gait), limp (gait).")


def test_descriptions_need_options() -> None:
    with pytest.raises(ValueError, match="llm.fewshot.options=true"):
        Phrasing(descriptions=True)
    assert phrasing_of({"options": True, "descriptions": True}) == Phrasing(True, True)
    assert phrasing_of(None) == Phrasing()


def write_meta(tmp_path, task: dict) -> None:
    doc = {"name": "d", "modalities": {"imu": {"kind": "imu"}}, "tasks": {"room": task}}
    (tmp_path / "meta.json").write_text(json.dumps(doc))


def test_meta_json_descriptions_are_read_checked_and_written_back(tmp_path) -> None:
    write_meta(tmp_path, {"classes": ["attic", "cellar"], "descriptions": {"cellar": "below"}})
    spec = load_meta(tmp_path).tasks["room"]
    assert spec.descriptions == ("", "below")
    assert [spec.description(i) for i in range(2)] == ["attic (room)", "below"]
    assert spec.to_json()["descriptions"] == {"cellar": "below"}
    write_meta(tmp_path, {"classes": ["attic"]})
    assert "descriptions" not in load_meta(tmp_path).tasks["room"].to_json()
    for bad, match in (
        ({"celar": "below"}, r"not class name\(s\) \['celar'\]"),
        ({"cellar": ""}, r"non-empty string for class\(es\) \['cellar'\]"),
        (["below"], "expected an object"),
    ):
        write_meta(tmp_path, {"classes": ["attic", "cellar"], "descriptions": bad})
        with pytest.raises(DatasetFormatError, match=match):
            load_meta(tmp_path)


# ---------------------------------------------------------------- instruction diversity


def test_diversity_draws_from_a_larger_pool_and_held_out_stays_held_out() -> None:
    def used(ph: Phrasing, templates: str = "train") -> set[str]:
        exs = build_instructions(meta(), split(), kinds=("task",), per_sample=20, seed=1,
                                 templates=templates, phrasing=ph)  # fmt: skip
        return {ex.turns[0].question for ex in exs}

    filled = lambda t: {  # noqa: E731
        t.format(task=task, options=", ".join(s.classes), sensors=sensors)
        for task, s in meta().tasks.items()
        for sensors in ("imu", "imu and audio")
    }
    plain, more = used(Phrasing()), used(Phrasing(diversity=True))
    heldout = set().union(*(filled(t) for t in TASK_QUESTIONS["heldout"]))
    extra = set().union(*(filled(t) for t in MORE_TASK_QUESTIONS))
    assert plain <= set().union(*(filled(t) for t in TASK_QUESTIONS["train"]))
    assert more & extra and not plain & extra  # the larger pool is drawn from, only with the knob
    assert not (more | plain) & heldout
    assert used(Phrasing(diversity=True), "heldout") == used(Phrasing(), "heldout")
    pools = set(TASK_QUESTIONS["train"]) | set(MORE_TASK_QUESTIONS) | set(FOLLOW_UPS["train"])
    assert not pools & (set(TASK_QUESTIONS["heldout"]) | set(FOLLOW_UPS["heldout"]))


# ---------------------------------------------------------------- in-context examples


def test_shots_are_seeded_distinct_and_never_the_question_itself() -> None:
    from fed_iotlm.llm.stage import draw_shots

    pool = task_examples(meta(), split(), "room")
    evals = pool  # every sample asked: with k = 3 of 60 one would draw itself by chance
    a, b = draw_shots(pool, evals, 3, seed=0), draw_shots(pool, evals, 3, seed=0)
    assert a == b and a != draw_shots(pool, evals, 3, seed=1)
    for ex, shots in a.items():
        assert len(shots) == 3 and len({s.index for s in shots}) == 3
        assert ex.index not in {s.index for s in shots}
    with pytest.raises(ValueError, match="only 3 answered examples"):
        draw_shots(pool[:3], evals, 3, seed=0)


def test_prefix_shots_carry_their_own_sensor_tokens() -> None:
    from fed_iotlm.llm.loading import TINY_MODEL, load_lm
    from fed_iotlm.llm.sequences import SequenceBuilder

    tok = load_lm(TINY_MODEL).tokenizer
    builder = SequenceBuilder(tok, ["imu", "audio"], ["gait"], 2, "prefix")
    pool = task_examples(meta(), split(), "room")
    enc = builder.encode(pool[0], shots=pool[1:3], prompt_only=True)
    rows = {r for r in enc.slot_sample if r >= 0}
    assert rows == {pool[0].index, pool[1].index, pool[2].index}


# ---------------------------------------------------------------- the stage, a task held out


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import save_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.llm.loading import TINY_MODEL
    from fed_iotlm.llm.stage import run_stage
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.settings import compose

    tmp = tmp_path_factory.mktemp("transfer")
    data_args = ["data.num_train=120", "data.num_test=40"]
    spec = model_spec(compose(data_args))
    torch.manual_seed(0)
    save_bundle(tmp / "bundle", state_to_numpy(MultisensoryModel(spec)), spec, {})
    cfg = compose(
        [*data_args, f"llm.bundle={tmp / 'bundle'}", f"llm.model={TINY_MODEL}",
         "llm.steps=2", "llm.batch_size=4", "llm.train_samples=16", "llm.eval_samples=8",
         "llm.val_samples=8", "llm.max_new_tokens=3", "llm.controls=[majority,head]",
         "llm.adapter.layers=2", "llm.seed_adapter.layers=2", "mlflow.enabled=false",
         "llm.conditioning=[prefix,adapter,seed_adapter]",
         "llm.fewshot.task=location", "llm.fewshot.k=2", "llm.fewshot.options=true",
         "llm.fewshot.descriptions=true", "llm.fewshot.diversity=true"]
    )  # fmt: skip
    return json.loads(run_stage(cfg, tmp / "out").read_text())


def test_the_held_out_task_is_reported_on_val_and_test_with_and_without_shots(held_out_run):
    llm = held_out_run["llm"]
    assert llm["task_classes"] == {"activity": llm["task_classes"]["activity"]}  # not tuned
    fs = llm["conditioning"]["prefix"]["fewshot"]
    assert fs["task"] == "location" and fs["k"] == 2 and fs["shots_refused"] is None
    assert fs["phrasing"] == {"options": True, "descriptions": True, "diversity": True}
    assert fs["chance"] == 0.25 and 0.0 <= fs["majority"]["accuracy"] <= 1.0
    for part in ("val", "test"):
        for shots in ("zero_shot", "few_shot"):
            assert set(fs[part][shots]) == {"generation", "loglik"}
            assert set(fs[part][shots]["loglik"]["by_task"]) == {"location"}
    assert fs["few_shot"] == fs["test"]["few_shot"]["generation"]["accuracy"]


def test_the_adapter_answers_with_shots_and_the_seed_adapter_refuses_naming_why(held_out_run):
    """The gated adapter routes per token, so each example keeps its own readings; the
    seed adapter adds one output per sequence and answers zero-shot only, saying why."""
    conds = held_out_run["llm"]["conditioning"]
    fs = conds["adapter"]["fewshot"]
    assert fs["shots_refused"] is None
    for part in ("val", "test"):
        assert set(fs[part]["few_shot"]) == {"generation", "loglik"}
    seed = conds["seed_adapter"]["fewshot"]
    assert seed["few_shot"] is None and seed["test"]["few_shot"] is None
    assert "one output for the whole sequence" in seed["shots_refused"]
    assert "prefix or adapter" in seed["shots_refused"]
    assert set(seed["val"]["zero_shot"]) == {"generation", "loglik"}


def test_a_held_out_task_the_data_lacks_is_refused_before_tuning() -> None:
    from fed_iotlm.llm.stage import check_held_out

    with pytest.raises(ValueError, match="llm.fewshot.task='place'"):
        check_held_out("place", ["activity", "location"], 4, ["prefix"])
    with pytest.raises(ValueError, match="nothing left to tune"):
        check_held_out("location", ["location"], 4, ["prefix"])
    check_held_out(None, ["activity"], 4, ["adapter"])


# ---------------------------------------------------------------- the study


def fake_run(seed: int, val: dict, test: float, kind: str = "prefix") -> dict:
    """A results.json as the stage writes it, held-out part only: ``val`` maps
    (shots, scoring) to a validation accuracy; every test figure is ``test``."""

    def part(figs):
        return {
            "zero_shot": {s: {"accuracy": figs("zero_shot", s), "answered": 1.0}
                          for s in ("generation", "loglik")},
            "few_shot": None if kind != "prefix" else {
                s: {"accuracy": figs("few_shot", s), "answered": 1.0}
                for s in ("generation", "loglik")},
        }  # fmt: skip

    fs = {
        "val": part(lambda shots, s: val.get((shots, s), 0.1)),
        "test": part(lambda shots, s: test),
        "shots_refused": None if kind == "prefix" else "refused: one unordered set",
        "majority": {"accuracy": 0.3},
        "chance": 0.25,
    }
    return {"seed": seed, "test": {"accuracy": 0.6}, "code_version": {"commit": "abc1234", "dirty": False},
            "llm": {"conditioning": {kind: {"fewshot": fs}}}}  # fmt: skip


def test_the_study_chooses_on_validation_only_and_names_its_code_version() -> None:
    from simulations.transfer_study import choose, markdown, one_code_version, table, val_cells

    good = {("few_shot", "loglik"): 0.6}
    runs = {
        ("baseline", "prefix"): [fake_run(0, {}, test=0.9)],  # best on test, not on val
        ("+options", "prefix"): [fake_run(0, good, test=0.2)],
    }
    chosen = choose(val_cells(runs))
    assert chosen == ("+options", "few_shot", "loglik")
    runs[("+options", "prefix")] = [fake_run(0, good, test=0.95)]  # test moves: no change
    assert choose(val_cells(runs)) == chosen
    runs[("+options", "adapter")] = [fake_run(0, {}, test=0.3, kind="adapter")]
    assert ("+options", "few_shot", "loglik") in val_cells(runs)
    assert {k[1] for k in val_cells(runs, "adapter")} == {"zero_shot"}  # shots refused
    every = [r for rs in runs.values() for r in rs]
    doc = markdown(table(runs, "location", 4), chosen, "location", one_code_version(every),
                   {"majority": [0.3], "chance": 0.25}, "python -m simulations.transfer_study")  # fmt: skip
    assert "code `abc1234`" in doc and "refused" in doc
    from tests.test_doc_tables import VERSION, tables

    for t in tables(doc, "transfer.md"):
        assert VERSION.search(t.caption), t.caption
