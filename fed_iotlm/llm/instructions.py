"""Instruction data for tuning a causal LM on sensor recordings (IoT-LM, arXiv 2407.09801).

Questions are generated from ``meta`` alone (task names, class names, modality names),
so any dataset in the exchange format gets instructions without hand-written prompts.
Each task has a *train* template set and a disjoint, differently worded *heldout* set:
training on one and evaluating on the other measures whether the LM learned the task or
only the phrasing.  Task and class names appear in words (``walking_upstairs`` ->
"walking upstairs", :func:`fed_iotlm.data.modalities.in_words`), and every answer names
its class, so :func:`answer_to_class` maps generated text back to a label and
accuracy is computed like a classifier's.

A sample with no present modality has nothing to ask about and yields no example; a
sample unlabelled for a task (``y == -1``) is never given an answer for that task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_iotlm.data.dataset import DatasetMeta, Split
from fed_iotlm.data.modalities import TaskSpec, find_name, in_words, name_key

TEMPLATE_SETS = ("train", "heldout")
KINDS = ("task", "presence", "dialog")

# {task}: the task's title (meta.json tasks.<t>.title, else its name in words); {options}: class names; {sensors}: present modalities
TASK_QUESTIONS: dict[str, tuple[str, ...]] = {
    "train": (
        "What is the {task}?",
        "Which {task} does this recording show?",
        "Classify the {task} from the sensor data.",
        "Using the {sensors} data, what is the {task}?",
        "What is the {task}? Options: {options}.",
        "Pick the {task} from {options}.",
        "Identify the {task} in this recording.",
    ),
    "heldout": (
        "Could you tell me the {task} here?",
        "Judging by the {sensors} readings, which {task} is it?",
        "Among {options}, which best describes the {task}?",
    ),
}
PRESENCE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "train": (
        "Which sensors are available for this recording?",
        "What modalities does this sample include?",
        "List the sensors present in this recording.",
        "Which sensor streams were captured here?",
    ),
    "heldout": (
        "Tell me which devices recorded this sample.",
        "What kinds of sensor data do we have here?",
    ),
}
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "train": ("And what is the {task}?", "What about the {task}?", "Now tell me the {task}."),
    "heldout": ("One more thing: which {task} is it?", "Can you also give the {task}?"),
}
# llm.fewshot.diversity: more training phrasings, drawn with the seven above (worded
# unlike the held-out set, which stays as it is and stays held out)
MORE_TASK_QUESTIONS: tuple[str, ...] = (
    "What {task} is this?",
    "Name the {task} of this sample.",
    "From this sample, determine the {task}.",
    "What {task} do the {sensors} signals indicate?",
    "Give the {task} for this sample.",
    "Report the {task}.",
    "Which of {options} is the {task}?",
    "Label this recording's {task}.",
    "What would you say the {task} is?",
    "Predict the {task}.",
    "Infer the {task} from the {sensors} signals.",
    "Select the {task}: {options}.",
    "Decide the {task} of this recording.",
    "State the {task} shown by the sensors.",
)
MORE_FOLLOW_UPS: tuple[str, ...] = (
    "Also, what is the {task}?",
    "Next, the {task}?",
    "And the {task}?",
)
ANSWER_FORMS = ("{cls}", "The {task} is {cls}.", "It looks like {cls}.")
_JSONL_KEYS = ("index", "question", "answer", "task", "present")


@dataclass(frozen=True)
class Phrasing:
    """How classification questions are worded (``llm.fewshot.*``; all off: as before).

    ``options``: every classification question ends with the task's classes, "Answer
    with one of: a, b, c.", so the LM learns to pick from a list it is given rather than
    from the classes of the task it was tuned on; ``descriptions``: that list describes
    each class in words (:meth:`TaskSpec.description`); ``diversity``: training
    questions are drawn from a larger pool of phrasings (held-out ones stay held out)."""

    options: bool = False
    descriptions: bool = False
    diversity: bool = False

    def __post_init__(self) -> None:
        if self.descriptions and not self.options:
            raise ValueError(
                "llm.fewshot.descriptions describes the listed classes: set "
                "llm.fewshot.options=true too"
            )

    def questions(self, templates: str) -> tuple[str, ...]:
        """The task-question pool of a template set."""
        more = MORE_TASK_QUESTIONS if self.diversity and templates == "train" else ()
        return TASK_QUESTIONS[templates] + more

    def follow_ups(self, templates: str) -> tuple[str, ...]:
        more = MORE_FOLLOW_UPS if self.diversity and templates == "train" else ()
        return FOLLOW_UPS[templates] + more

    def suffix(self, spec: TaskSpec) -> str:
        """What follows the question: the class list, or nothing."""
        if not self.options:
            return ""
        n = range(spec.num_classes)
        named = [spec.description(i) for i in n] if self.descriptions else list(spec.class_words)
        return f" Answer with one of: {', '.join(named)}."


def phrasing_of(fewshot: dict | None) -> Phrasing:
    """The ``llm.fewshot`` block's wording knobs (absent: all off)."""
    fs = fewshot or {}
    return Phrasing(
        bool(fs.get("options", False)),
        bool(fs.get("descriptions", False)),
        bool(fs.get("diversity", False)),
    )


@dataclass(frozen=True)
class Turn:
    """One question and its supervised answer."""

    question: str
    answer: str


@dataclass(frozen=True)
class Example:
    """One instruction example for sample ``index``; the loss is on every turn's answer."""

    index: int
    present: tuple[str, ...]
    turns: tuple[Turn, ...]
    kind: str
    task: str | None
    label: int | None
    template: str
    # question types beyond classification (questions.py); the defaults are a
    # classification question about the one sample ``index``
    qtype: str = "classification"
    samples: tuple[int, ...] = ()  # every recording asked about, in slot order
    presents: tuple[tuple[str, ...], ...] = ()  # the present modalities of each recording
    tasks: tuple[str, ...] = ()  # the tasks the answer names (two_tasks) or compares/counts
    labels: tuple[int, ...] = ()  # per task (two_tasks) or per recording (comparison, count)
    target: int | None = None  # the scored answer: 1 yes / 0 no (comparison), the count

    @property
    def rows(self) -> tuple[int, ...]:
        """The sample rows whose readings the question needs (one for classification)."""
        return self.samples or (self.index,)

    @property
    def row_presents(self) -> tuple[tuple[str, ...], ...]:
        """The present modalities of each of :attr:`rows`."""
        return self.presents or (self.present,)


def describe_present(present: Sequence[str]) -> str:
    """``("imu", "audio", "depth")`` -> ``"imu, audio and depth"``: how prompts and answers
    name sensors, in words (``watch_acceleration`` -> "watch acceleration")."""
    names = [in_words(m) for m in present]
    if not names:
        return "no sensors"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def answer_to_class(text: str, task: TaskSpec) -> int | None:
    """The class named earliest in ``text`` (longest name on ties), or None if none is named.

    Whole-word matching keeps ``"walking"`` from matching inside ``"sleepwalking"``; the
    earliest mention wins because answers state the class first and may mention others,
    and at one position the longest name wins, so "walking upstairs" is
    ``walking_upstairs``, not ``walking``.  Names are compared in words
    (:func:`~fed_iotlm.data.modalities.name_key`): ``in pocket`` and ``in_pocket`` alike.
    """
    norm = name_key(text or "")
    best: tuple[int, int, int] | None = None
    for idx, cls in enumerate(task.classes):
        found = find_name(norm, cls)
        if found and (best is None or (found.start(), -len(found.group()), idx) < best):
            best = (found.start(), -len(found.group()), idx)
    return None if best is None else best[2]


def _present(meta: DatasetMeta, split: Split, i: int) -> tuple[str, ...]:
    """Modalities present for row ``i``, in meta order (a modality absent from the split is absent)."""
    return tuple(m for m in meta.modalities if m in split.mask and bool(split.mask[m][i]))


def _pick(rng: np.random.Generator, items: Sequence) -> tuple[int, Any]:
    """A seeded uniform choice and its position (the position names the template)."""
    j = int(rng.integers(len(items)))
    return j, items[j]


def _task_turn(
    rng: np.random.Generator,
    questions: Sequence[str],
    spec: TaskSpec,
    label: int,
    present: tuple[str, ...],
    phrasing: Phrasing = Phrasing(),
) -> tuple[int, Turn]:
    """A question about ``spec`` and an answer naming class ``label`` so it can be recovered."""
    task, words = spec.title, spec.class_words
    j, q = _pick(rng, questions)
    fill = {"task": task, "options": ", ".join(words), "sensors": describe_present(present)}
    _, form = _pick(rng, ANSWER_FORMS)
    answer = form.format(task=task, cls=words[label])
    if answer_to_class(answer, spec) != label:  # e.g. the task name contains a class name
        answer = words[label]
    return j, Turn(q.format(**fill) + phrasing.suffix(spec), answer)


def _presence_turn(
    rng: np.random.Generator, templates: str, present: tuple[str, ...]
) -> tuple[int, Turn]:
    """A sensor-availability question; its answer comes from the mask, never from labels."""
    j, q = _pick(rng, PRESENCE_QUESTIONS[templates])
    return j, Turn(q, describe_present(present))


def _example(
    rng: np.random.Generator,
    meta: DatasetMeta,
    split: Split,
    i: int,
    present: tuple[str, ...],
    kind: str,
    labelled: list[str],
    templates: str,
    presence: bool = True,
    phrasing: Phrasing = Phrasing(),
) -> Example:
    """One example of ``kind`` for row ``i``; ``labelled`` are the tasks answerable for it.
    Without ``presence`` a dialog opens with its task question (a sensor-availability
    turn is answered by the prompt itself, so it teaches nothing about the readings)."""
    if kind == "presence":
        j, turn = _presence_turn(rng, templates, present)
        return Example(i, present, (turn,), kind, None, None, f"presence:{templates}:{j}")
    _, task = _pick(rng, labelled)
    label = int(split.y[task][i])
    spec = meta.tasks[task]
    q, turn = _task_turn(rng, phrasing.questions(templates), spec, label, present, phrasing)
    if kind == "task":
        return Example(i, present, (turn,), kind, task, label, f"{task}:{templates}:{q}")
    if presence:
        p, first = _presence_turn(rng, templates, present)
        turns, ids = [first, turn], f"{p}.{q}"
    else:
        turns, ids = [turn], f"{q}"
    others = [t for t in labelled if t != task]
    if others:  # a follow-up about another task the sample is labelled for
        _, other = _pick(rng, others)
        f, follow = _task_turn(
            rng, phrasing.follow_ups(templates), meta.tasks[other], int(split.y[other][i]),
            present, phrasing,
        )  # fmt: skip
        turns, ids = [*turns, follow], f"{ids}.{f}"
    return Example(i, present, tuple(turns), "dialog", task, None, f"dialog:{templates}:{ids}")


def _check(
    meta: DatasetMeta,
    split: Split,
    templates: str,
    tasks: Sequence[str] | None,
    kinds: Sequence[str],
    per_sample: int,
) -> list[str]:
    """Validate arguments up front so a typo fails loudly instead of yielding no examples."""
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates must be one of {TEMPLATE_SETS}, got {templates!r}")
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
    if per_sample < 1:
        raise ValueError(f"per_sample must be >= 1, got {per_sample}")
    names = list(meta.tasks) if tasks is None else list(tasks)
    for t in names:
        if t not in meta.tasks:
            raise ValueError(f"unknown task {t!r}; the dataset's tasks are {list(meta.tasks)}")
        if t not in split.y:
            raise ValueError(f"the split has no labels for task {t!r}")
    return names


def _rows(split: Split, indices: Sequence[int] | None) -> list[int]:
    n = len(split)
    rows = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in rows if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices {bad[:5]} out of range for a split of {n} samples")
    return rows


def build_instructions(
    meta: DatasetMeta,
    split: Split,
    *,
    templates: str = "train",
    tasks: Sequence[str] | None = None,
    kinds: Sequence[str] = KINDS,
    per_sample: int = 1,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    presence_turns: bool = True,
    phrasing: Phrasing = Phrasing(),
) -> list[Example]:
    """``per_sample`` seeded draws per sample: a kind uniformly, then a task among those labelled.
    ``presence_turns=False``: dialogs open with their task question instead of a sensor
    question (whose answer the prompt itself gives away).

    Samples without any present modality, or with nothing answerable for ``kinds``, give
    no example; if that leaves no example at all, ValueError says why.
    """
    names = _check(meta, split, templates, tasks, kinds, per_sample)
    rng, out, rows, no_sensor = np.random.default_rng(seed), [], _rows(split, indices), 0
    for i in rows:
        present = _present(meta, split, i)
        if not present:
            no_sensor += 1
            continue
        labelled = [t for t in names if split.y[t][i] >= 0]
        usable = [k for k in kinds if k == "presence" or labelled]
        for _ in range(per_sample if usable else 0):
            _, kind = _pick(rng, usable)
            out.append(
                _example(
                    rng,
                    meta,
                    split,
                    i,
                    present,
                    kind,
                    labelled,
                    templates,
                    presence_turns,
                    phrasing,
                )  # fmt: skip
            )
    if not out:
        raise ValueError(
            f"no instruction examples from {len(rows)} samples: {no_sensor} have no present "
            f"modality (nothing to ask about), the rest have no labels for tasks {names} "
            f"and kinds {tuple(kinds)} need them"
        )
    return out


def task_examples(
    meta: DatasetMeta,
    split: Split,
    task: str,
    *,
    templates: str = "train",
    seed: int = 0,
    indices: Sequence[int] | None = None,
    phrasing: Phrasing = Phrasing(),
) -> list[Example]:
    """Exactly one single-turn example per labelled sample with a present modality (for evaluation)."""
    return build_instructions(
        meta, split, templates=templates, tasks=[task], kinds=("task",), seed=seed,
        indices=indices, phrasing=phrasing,
    )  # fmt: skip


def _bad(where: str, key: str, problem: str) -> ValueError:
    return ValueError(f"{where}: key {key!r}: {problem}")


def _parse_line(where: str, line: str, split_len: int) -> Example:
    """One JSONL line -> an external Example, checking every key so typos are not ignored."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON: {exc.msg}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in _JSONL_KEYS:
            raise _bad(where, key, f"unknown key (allowed: {', '.join(_JSONL_KEYS)})")
    for key in ("index", "question", "answer"):
        if key not in obj:
            raise _bad(where, key, "missing")
    index = obj["index"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise _bad(where, "index", f"expected an integer, got {type(index).__name__}")
    if not 0 <= index < split_len:
        raise _bad(where, "index", f"{index} out of range for a split of {split_len} samples")
    for key in ("question", "answer"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise _bad(where, key, "expected a non-empty string")
    task, present = obj.get("task"), obj.get("present", [])
    if task is not None and not isinstance(task, str):
        raise _bad(where, "task", f"expected a string, got {type(task).__name__}")
    if not isinstance(present, list) or not all(isinstance(m, str) for m in present):
        raise _bad(where, "present", "expected a list of modality names")
    turn = Turn(obj["question"], obj["answer"])
    return Example(index, tuple(present), (turn,), "external", task, None, "external")


def load_jsonl(path: str | os.PathLike[str], split_len: int) -> list[Example]:
    """External instructions, one JSON object per line (blank lines skipped).

    ``present`` is whatever the file says (empty if absent): the loader has no mask, so
    callers that condition on sensors should take presence from the split instead.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        out = [
            _parse_line(f"{path}:{n}", ln, split_len) for n, ln in enumerate(fh, 1) if ln.strip()
        ]
    if not out:
        raise ValueError(f"{path}: no instructions (the file is empty)")
    return out
