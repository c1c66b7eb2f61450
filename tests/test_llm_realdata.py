"""The LM stage on the real datasets' layouts (issue 12, build 4): class names in words,
questions routed to the right one of ExtraSensory's three tasks, masked sensors, and
``fed-iotlm tune`` + ``fed-iotlm ask`` end to end on the importers' release-layout
fixtures (the real folders are never read here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_iotlm.cli import main
from fed_iotlm.data.dataset import DatasetMeta, Split
from fed_iotlm.data.modalities import ModalitySpec, TaskSpec, in_words
from fed_iotlm.llm.evaluation import option_accuracy, with_options
from fed_iotlm.llm.instructions import Phrasing, answer_to_class, build_instructions
from fed_iotlm.llm.phases import caption_text
from fed_iotlm.llm.questions import count_examples, two_task_answer, two_task_examples
from fed_iotlm.llm.routing import TaskRouter
from tests.test_importers_realdata import (
    LABEL_COLUMNS,
    col,
    es_table,
    write_es_user,
    write_hapt,
)

# the imported datasets' tasks, as their importers name them
ACTIVITY = TaskSpec(
    "activity",
    ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying"),
)
PHONE = TaskSpec("phone_position", ("in_pocket", "in_hand", "in_bag", "on_table"))
MAIN = TaskSpec(
    "main_activity", ("lying", "sitting", "standing", "walking", "running", "bicycling")
)
INDOORS = TaskSpec("indoors", ("indoors", "outdoors"))


def meta_split(n: int = 60, seed: int = 0) -> tuple[DatasetMeta, Split]:
    """Two tasks with identifier class names, every row labelled and both sensors on."""
    rng = np.random.default_rng(seed)
    meta = DatasetMeta(
        "words",
        {
            "acc": ModalitySpec("acc", "tabular"),
            "watch_acceleration": ModalitySpec("watch_acceleration", "tabular"),
        },
        {"activity": ACTIVITY, "phone_position": PHONE},
    )
    x = {m: np.zeros((n, 2), np.float32) for m in meta.modalities}
    y = {
        "activity": rng.integers(0, 6, n).astype(np.int64),
        "phone_position": rng.integers(0, 4, n).astype(np.int64),
    }
    return meta, Split(x, {m: np.ones(n, bool) for m in x}, y)


# ------------------------------------------------------------- names in words, one mapping


def test_an_answer_in_words_scores_as_its_class_and_the_longer_name_wins():
    assert in_words("walking_upstairs") == "walking upstairs"
    assert answer_to_class("walking upstairs", ACTIVITY) == 1
    assert answer_to_class("It looks like walking downstairs.", ACTIVITY) == 2
    assert answer_to_class("walking", ACTIVITY) == 0  # the prefix alone is its own class
    assert answer_to_class("Walking, then walking upstairs", ACTIVITY) == 0  # earliest
    assert answer_to_class("The phone position is in pocket.", PHONE) == 0
    assert answer_to_class("on table", PHONE) == 3
    assert answer_to_class("in_bag", PHONE) == 2  # the identifier still reads back


def test_instructions_options_and_captions_use_words_never_identifiers():
    meta, split = meta_split()
    phrasing = Phrasing(options=True, diversity=True)
    examples = build_instructions(meta, split, kinds=("task", "dialog"), per_sample=3,
                                  presence_turns=False, phrasing=phrasing)  # fmt: skip
    texts = [t.question + " " + t.answer for ex in examples for t in ex.turns]
    identifiers = [c for spec in meta.tasks.values() for c in spec.classes if "_" in c]
    identifiers += ["phone_position", "watch_acceleration"]
    for text in texts:
        assert not [c for c in identifiers if c in text], text
    assert any("walking upstairs" in t for t in texts) and any("in pocket" in t for t in texts)
    assert any("acc and watch acceleration" in t for t in texts)  # sensors in words too
    for ex in examples:  # every supervised answer still maps back to its label
        turn = ex.turns[-1] if ex.kind == "task" else ex.turns[0]
        assert answer_to_class(turn.answer, meta.tasks[ex.task]) == split.y[ex.task][ex.index]
    assert "in pocket, in hand, in bag, on table" in phrasing.suffix(PHONE)
    described = Phrasing(options=True, descriptions=True).suffix(PHONE)
    assert "in pocket (phone position)" in described  # no meta description: words + task
    given = TaskSpec(
        "phone_position", PHONE.classes, descriptions=("in a trouser pocket",) + ("",) * 3
    )
    assert "in a trouser pocket" in Phrasing(options=True, descriptions=True).suffix(given)
    caption = caption_text(meta, ("acc", "watch_acceleration"), "phone_position", 0)
    assert caption == "Sensors: acc and watch acceleration. Phone position: in pocket."
    listed = with_options(examples[:1], meta)[0].turns[-1].question
    assert "_" not in listed.split("Answer with one of:")[1]


def test_two_task_and_count_questions_use_words():
    meta, split = meta_split()
    answer = two_task_answer(ACTIVITY, PHONE, 1, 3, "The {a} is {ca} and the {b} is {cb}.")
    assert answer == "The activity is walking upstairs and the phone position is on table."
    rows = list(range(len(split)))
    for ex in two_task_examples(meta, split, rows, ["activity", "phone_position"]):
        assert "_" not in ex.turns[0].answer
    for ex in count_examples(meta, split, rows, ["activity", "phone_position"], 10, 3):
        assert "_" not in ex.turns[0].question


# ------------------------------------------------------------------- a task's title

TITLED = TaskSpec("indoors", ("indoors", "outdoors"), given_title="indoor or outdoor setting")


def _indoors_meta_split(spec: TaskSpec, n: int = 40) -> tuple[DatasetMeta, Split]:
    """ExtraSensory's two tasks whose names are not how one asks about them."""
    meta = DatasetMeta(
        "titled", {"acc": ModalitySpec("acc", "tabular")}, {"indoors": spec, "main_activity": MAIN}
    )
    y = {"indoors": np.arange(n) % 2, "main_activity": np.arange(n) % 6}
    x = {"acc": np.zeros((n, 2), np.float32)}
    return meta, Split(x, {"acc": np.ones(n, bool)}, {t: v.astype(np.int64) for t, v in y.items()})


def test_questions_ask_about_a_task_by_its_title():
    meta, split = _indoors_meta_split(TITLED)
    examples = build_instructions(meta, split, tasks=["indoors"], kinds=("task",), per_sample=4)
    questions = [ex.turns[-1].question for ex in examples]
    assert all("indoor or outdoor setting" in q for q in questions)
    assert not any("the indoors" in q for q in questions)  # never "What is the indoors?"
    # "The indoor or outdoor setting is outdoors." reads back as outdoors, in every form
    assert {ex.turns[-1].answer for ex in examples if ex.label == 1} >= {
        "The indoor or outdoor setting is outdoors."
    }
    for ex in examples:
        assert answer_to_class(ex.turns[-1].answer, TITLED) == ex.label
    rows = list(range(len(split)))
    both = two_task_examples(meta, split, rows, ["indoors", "main_activity"])
    assert all("indoor or outdoor setting" in ex.turns[0].question for ex in both)
    counted = count_examples(meta, split, rows, ["indoors"], 4, 3)
    assert all("indoor or outdoor setting" in ex.turns[0].question for ex in counted)
    caption = caption_text(meta, ("acc",), "indoors", 1)
    assert caption == "Sensors: acc. Indoor or outdoor setting: outdoors."
    # untitled, the name in words as before
    plain, _ = _indoors_meta_split(INDOORS)
    assert plain.tasks["indoors"].title == "indoors"


def test_routing_reaches_a_task_asked_about_by_its_title():
    tasks = [MAIN, TITLED, PHONE]
    classes = {t.name: t.classes for t in tasks}
    titled = TaskRouter([t.name for t in tasks], classes, {t.name: t.title for t in tasks})
    assert titled.route("What is the indoor or outdoor setting?") == 1
    assert titled.route("Which indoor or outdoor setting does this recording show?") == 1
    assert titled.route("What is the main activity?") == 0  # names still route
    # without titles the question names no task and no class (falls back to the first)
    assert TaskRouter([t.name for t in tasks], classes).scores(
        "What is the indoor or outdoor setting?"
    )[1] == (0, 0)


def test_a_title_naming_a_class_is_refused():
    with pytest.raises(ValueError, match="title.*names the class"):
        TaskSpec("indoors", ("indoors", "outdoors"), given_title="indoors or outdoors")


def test_the_extrasensory_importer_titles_its_tasks(tmp_path):
    from fed_iotlm.data.exchange import load_meta
    from fed_iotlm.data.importers.extrasensory import import_extrasensory

    write_es_fixture(tmp_path / "src", minutes=20)
    import_extrasensory(tmp_path / "src", tmp_path / "es", gap_minutes=0)
    meta = load_meta(tmp_path / "es")  # read back through the exchange format's checks
    assert {t: s.title for t, s in meta.tasks.items()} == {
        "main_activity": "main activity",
        "indoors": "indoor or outdoor setting",
        "phone_position": "phone position",
    }
    raw = json.loads((tmp_path / "es" / "meta.json").read_text())
    assert raw["tasks"]["indoors"]["title"] == "indoor or outdoor setting"


class _Recording:
    """Stands in for the builder and the LM in option scoring: records the option texts
    and scores the option it is told is right highest."""

    def __init__(self, right: str):
        self.texts: list[str] = []
        self.right = right

    def answer_ids(self, text: str) -> list[int]:
        self.texts.append(text)
        return [len(self.texts)]

    def encode(self, ex, shots=(), prompt_only=False):
        return ex

    def collate(self, encs, left_pad=False):
        return self

    def to(self, device):
        return self

    pad_id = 0

    def option_scores(self, batch, feats, options, pad_id):
        scores = torch.zeros(1, len(options))
        scores[0, self.texts.index(self.right)] = 1.0
        return scores


def test_option_scoring_scores_the_words_the_lm_was_tuned_to_write():
    meta, split = meta_split()
    ex = next(e for e in build_instructions(meta, split, kinds=("task",), tasks=["activity"])
              if e.label == 1)  # fmt: skip
    fake = _Recording("walking upstairs")
    feats = type("F", (), {"present": torch.zeros(1)})()
    got = option_accuracy(fake, fake, feats, [ex], meta, batch_size=1)
    assert fake.texts == list(ACTIVITY.class_words)
    assert got["accuracy"] == 1.0  # "walking upstairs" is label 1, walking_upstairs


def test_classes_that_read_alike_are_refused(tmp_path):
    with pytest.raises(ValueError, match="read the same in words"):
        TaskSpec("phone_position", ("in_pocket", "in pocket"))
    from fed_iotlm.data.exchange import load_meta

    (tmp_path / "meta.json").write_text(
        json.dumps(
            {
                "name": "x",
                "modalities": {"acc": {"kind": "tabular"}},
                "tasks": {"t": {"classes": ["In-Pocket", "in_pocket"]}},
            }
        )
    )
    with pytest.raises(ValueError, match=r"meta.json.*read the same in words"):
        load_meta(tmp_path)


def test_routing_reaches_each_of_extrasensorys_three_tasks():
    tasks = [MAIN, INDOORS, PHONE]
    router = TaskRouter([t.name for t in tasks], {t.name: t.classes for t in tasks})
    assert router.route("What is the main activity?") == 0
    assert router.route("Is the person walking or sitting?") == 0
    assert router.route("Is this minute indoors or outdoors?") == 1
    assert router.route("Where is the phone: in pocket, in hand or in bag?") == 2
    assert router.route("What is the phone position while walking?") == 2  # task named wins


# ------------------------------------------------------ end to end on the release fixtures

TINY = ["llm.model=tiny-random-llama", "llm.steps=2", "llm.train_samples=24",
        "llm.eval_samples=6", "llm.val_samples=6", "llm.adapter.layers=2",
        "llm.scoring=[generation]", "llm.controls=[]", "llm.eval_batch=8",
        "mlflow.enabled=false"]  # fmt: skip
PHONE_COLUMNS = [c for _, c in (("in_pocket", "PHONE_IN_POCKET"), ("in_hand", "PHONE_IN_HAND"),
                                ("in_bag", "PHONE_IN_BAG"), ("on_table", "PHONE_ON_TABLE"))]  # fmt: skip


def write_es_fixture(root: Path, users: int = 2, minutes: int = 60) -> None:
    """The importer tests' ExtraSensory fixture with a phone position on every minute and
    the watch off every third minute (the release layout, NaN = sensor missing)."""
    root.mkdir(parents=True)
    for user in range(users):
        times, values = es_table(minutes, user)
        base = len(values[0]) - len(LABEL_COLUMNS)
        for i in range(minutes):
            values[i, base + LABEL_COLUMNS.index(PHONE_COLUMNS[(i + user) % 4])] = 1.0
        values[::3, col("watch_acceleration") : col("watch_acceleration", 1) + 1] = np.nan
        write_es_user(root / f"{user:02d}-ABCD.features_labels.csv.gz", times, values)


def save_random_bundle(cfg_overrides: list[str], path: Path) -> None:
    """A model bundle for the dataset's modalities and tasks (untrained: the stage's
    plumbing is under test, not the federation, which has its own tests)."""
    from fed_iotlm.data.federation import build_layout
    from fed_iotlm.data.preprocess import Standardizer
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import save_bundle, statistics_meta
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.models.multisensory import MultisensoryModel
    from fed_iotlm.settings import compose

    cfg = compose(cfg_overrides)
    spec = model_spec(cfg)
    # the pooled training statistics a federation's bundle carries (what ask standardises with)
    stats = statistics_meta(Standardizer.fit(build_layout(cfg).dataset.train))
    torch.manual_seed(0)
    save_bundle(path, state_to_numpy(MultisensoryModel(spec)), spec, {"method": "test", **stats})


def ask(run: Path, data: Path, index: int, question: str, capsys) -> str:
    capsys.readouterr()
    code = main(["ask", "--run", str(run), "--data", str(data), "--index", str(index), question])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def tune_tiny(experiment: str, data: Path, conditioning: str, tmp_path: Path) -> tuple[Path, dict]:
    """`fed-iotlm tune` at the tiny settings on a 2-node federation of ``data`` with a random
    bundle: the run folder and its results.json."""
    exp = [f"experiment={experiment}", f"data.path={data}", "partition.num_nodes=2"]
    save_random_bundle(exp, tmp_path / "bundle")
    run = tmp_path / "run"
    args = [*exp, *TINY, f"llm.bundle={tmp_path / 'bundle'}",
            f"llm.conditioning=[{conditioning}]", f"output_dir={run}"]  # fmt: skip
    assert main(["tune", *args]) == 0
    return run, json.loads((run / "results.json").read_text())


def test_extrasensory_tune_and_ask_a_minute_with_the_watch_missing(tmp_path, capsys):
    from fed_iotlm.data.exchange import load_meta, load_split
    from fed_iotlm.data.importers.extrasensory import import_extrasensory
    from fed_iotlm.data.preprocess import featurize_split
    from fed_iotlm.llm.ask import Assistant

    write_es_fixture(tmp_path / "src")
    data = tmp_path / "es"
    import_extrasensory(tmp_path / "src", data, gap_minutes=0)
    run, doc = tune_tiny("extrasensory_natural", data, "prefix", tmp_path)
    assert doc["llm"]["task_classes"]["phone_position"] == list(PHONE.classes)
    assert doc["llm"]["task_titles"]["indoors"] == "indoor or outdoor setting"  # ask routes by it
    assert set(doc["test"]["by_task"]) == {"main_activity", "indoors", "phone_position"}

    meta = load_meta(data)
    test = featurize_split(load_split(data, meta, "test"), meta.modalities)
    off = int(np.flatnonzero(~test.mask["watch_acceleration"])[0])
    out = ask(run, data, off, "Where is the phone: in pocket, in hand, in bag or on table?", capsys)
    assert "names: phone_position = " in out
    assert f"recorded phone_position of test row {off}: " in out
    assert "sensors missing (masked, no token): watch_acceleration" in out
    assert "watch_acceleration" not in out.split("sensors used: ")[1].split("\n")[0]
    assert "names: main_activity = " in ask(run, data, off, "What is the main activity?", capsys)
    assert "names: indoors = " in ask(run, data, off, "Indoors or outdoors?", capsys)

    # What the LM sees of a missing sensor does not depend on the values standing in for
    # it. Standardising zeroes them; past that (standardized=True), the fused token
    # (masked fusion) and the option scores are the same with garbage in their place.
    assistant = Assistant(run)
    raw = test.subset(np.arange(len(test)))
    raw.x["watch_acceleration"][off] = 1e3
    assert not assistant.scaler.transform(raw).x["watch_acceleration"][off].any()
    options = [assistant.builder.answer_ids(w) for w in PHONE.class_words]
    question = "Is the phone in pocket or on table?"

    def seen(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        batch, feats, _, task = assistant.prompt(split, off, question, standardized=True)
        assert task == "phone_position"
        scores = assistant.model.option_scores(batch, feats, options, assistant.builder.pad_id)
        return feats.feats["fused"], scores

    clean = assistant.scaler.transform(test)
    garbage = clean.subset(np.arange(len(clean)))
    garbage.x["watch_acceleration"][off] = 1e3
    (fused, scores), (fused_g, scores_g) = seen(clean), seen(garbage)
    assert torch.equal(fused, fused_g) and torch.equal(scores, scores_g)
    garbage.mask["watch_acceleration"][off] = True  # the same values, claimed present
    assert not torch.equal(fused, seen(garbage)[0])

    # the nodes' uploads (llm.data=nodes, what the stage trained on): a token row sent for
    # a missing minute is never read by the centre (fused embedding, head prediction)
    from fed_iotlm.llm.uploads import encode_split, features_from_rows

    rows = encode_split(assistant.encoder, clean)
    base = features_from_rows(assistant.encoder, rows)
    rows.tokens["watch_acceleration"][off] = 1e3
    noisy = features_from_rows(assistant.encoder, rows)
    assert torch.equal(base.feats["fused"], noisy.feats["fused"])
    assert all(torch.equal(base.head_pred[t], noisy.head_pred[t]) for t in base.head_pred)
    assert not bool(noisy.present[off, noisy.names.index("watch_acceleration")])


def test_hapt_tune_and_ask_a_window(tmp_path, capsys):
    from fed_iotlm.data.importers.hapt import import_hapt

    write_hapt(tmp_path / "src", users=(1, 2, 3))
    data = tmp_path / "hapt"
    import_hapt(tmp_path / "src", data, split="within", drop_unlabelled=True)
    run, doc = tune_tiny("hapt_fedmultimodal", data, "adapter", tmp_path)
    assert set(doc["test"]["by_task"]) == {"activity"}
    out = ask(run, data, 0, "Is this walking upstairs or walking downstairs?", capsys)
    assert "names: activity = " in out and "recorded activity of test row 0: " in out
    assert "sensors used: acc, gyro (adapter conditioning)" in out
    assert "sensors missing" not in out


def test_the_pipeline_asks_about_a_labelled_test_row():
    from simulations.pipeline import first_labelled

    assert first_labelled(np.array([-1, -1, 3, 0])) == 2  # ExtraSensory: unlabelled minutes first
    assert first_labelled(np.array([0, 1])) == 0
    with pytest.raises(RuntimeError, match="no test sample is labelled"):
        first_labelled(np.array([-1, -1]))
