"""Question types beyond single-sample classification (issue 13, build 3).

Like :mod:`fed_iotlm.llm.instructions`, every question and answer is made from ``meta``
(task and class names), the modality masks and the labels the nodes upload; no raw
window is read, so the default ``llm.data=nodes`` stays free of raw samples.

* ``two_tasks``: one recording, "What is the activity and the location?"; the answer
  names both classes and is correct only when both are.
* ``comparison``: two recordings of the same split part, "Do these two recordings show
  the same activity?"; yes/no, exactly half yes by construction.
* ``count``: ``n`` recordings of the same split part, "How many of these 3 recordings show
  walking?"; an integer 0..n, drawn uniformly among the counts the rows can support, so
  always answering one number scores about 1/(n+1).  Built instead of a regression
  because the exchange format's tasks are all categorical: a count over labelled rows is
  the integer answer the data supports without raw data at the centre.

Group draws (which rows, which task, which class, yes or no) use their own seeded
generator, independent of the template set, so the same groups can be asked with the
training templates and the held-out ones and the phrasing gap measured on equal rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from fed_iotlm.data.dataset import DatasetMeta, Split
from fed_iotlm.data.modalities import TaskSpec, name_key

from .instructions import (
    TEMPLATE_SETS,
    Example,
    Turn,
    _present,
    answer_to_class,
    describe_present,
)

QUESTION_TYPES = ("classification", "two_tasks", "comparison", "count")
EXTRA_TYPES = QUESTION_TYPES[1:]

# {a}, {b}: the two tasks' titles; {sensors}: present modalities
TWO_TASK_QUESTIONS: dict[str, tuple[str, ...]] = {
    "train": (
        "What is the {a} and the {b}?",
        "Name the {a} and the {b} of this recording.",
        "Which {a} and which {b} does this recording show?",
        "Using the {sensors} data, give the {a} and the {b}.",
    ),
    "heldout": (
        "Could you tell me both the {a} and the {b} here?",
        "Judging by the readings, what are the {a} and the {b}?",
    ),
}
# the first form is the bare answer option log-likelihood scores
TWO_TASK_ANSWERS = ("{ca}, {cb}", "The {a} is {ca} and the {b} is {cb}.")
COMPARISON_QUESTIONS: dict[str, tuple[str, ...]] = {
    "train": (
        "Do these two recordings show the same {task}?",
        "Is the {task} the same in both recordings?",
        "Do recording 1 and recording 2 share their {task}?",
    ),
    "heldout": (
        "Would you say both recordings have one and the same {task}?",
        "Are these two recordings from the same {task}?",
    ),
}
COMPARISON_ANSWERS = {1: ("yes", "Yes, the same {task}."), 0: ("no", "No, the {task} differs.")}
COUNT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "train": (
        "How many of these {n} recordings show {cls} as the {task}?",
        "In how many of the {n} recordings is the {task} {cls}?",
        "Count the recordings whose {task} is {cls}.",
    ),
    "heldout": (
        "Out of these {n} recordings, how many have {task} {cls}?",
        "Tell me the number of recordings with {cls} as their {task}.",
    ),
}
COUNT_ANSWERS = ("{n}", "{n} of them.")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TYPE_SEED = {t: i for i, t in enumerate(QUESTION_TYPES)}


def check_types(types: Sequence[str]) -> list[str]:
    """``llm.question_types`` validated: known names, classification included (the stage
    chooses its conditioning on classification questions), no repeats."""
    types = list(types)
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown:
        raise ValueError(
            f"llm.question_types: unknown {unknown}; choose from {list(QUESTION_TYPES)}"
        )
    if "classification" not in types:
        raise ValueError(
            "llm.question_types must include classification: the stage chooses its "
            "conditioning and scoring on classification questions"
        )
    if len(set(types)) != len(types):
        raise ValueError(f"llm.question_types: repeated entries in {types}")
    return types


def _rngs(seed: int, qtype: str, templates: str):
    """(group generator, wording generator): groups do not depend on the template set."""
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates must be one of {TEMPLATE_SETS}, got {templates!r}")
    groups = np.random.default_rng([seed, _TYPE_SEED[qtype]])
    words = np.random.default_rng([seed, _TYPE_SEED[qtype], 1 + TEMPLATE_SETS.index(templates)])
    return groups, words


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _pool(meta: DatasetMeta, split: Split, rows: Sequence[int], tasks: Sequence[str]):
    """Rows with a present modality, their presents, and per task the labelled ones."""
    present = {int(i): _present(meta, split, int(i)) for i in rows}
    usable = [i for i, p in present.items() if p]
    for t in tasks:
        if t not in meta.tasks or t not in split.y:
            raise ValueError(f"unknown task {t!r}; the dataset's tasks are {list(meta.tasks)}")
    labelled = {t: [i for i in usable if int(split.y[t][i]) >= 0] for t in tasks}
    return present, usable, labelled


# ------------------------------------------------------------------ two tasks at once


def two_task_answer(spec_a: TaskSpec, spec_b: TaskSpec, ca: int, cb: int, form: str) -> str:
    """An answer naming class ``ca`` of ``spec_a`` and ``cb`` of ``spec_b`` in ``form``."""
    return form.format(a=spec_a.title, b=spec_b.title, ca=spec_a.words(ca), cb=spec_b.words(cb))


def parse_two_tasks(text: str, spec_a: TaskSpec, spec_b: TaskSpec) -> tuple[int | None, int | None]:
    """The class of each task named in ``text`` (None for a task it names no class of).
    The task names and titles are taken out first ("The room type is hall way" must not
    read as class ``room``), unless one is part of a class name itself."""
    norm = name_key(text or "")
    classes = [name_key(c) for c in (*spec_a.classes, *spec_b.classes)]
    names = dict.fromkeys(name_key(n) for s in (spec_a, spec_b) for n in (s.name, s.title))
    for name in names:
        if not any(name in c for c in classes):
            norm = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", " ", norm)
    return answer_to_class(norm, spec_a), answer_to_class(norm, spec_b)


def two_task_examples(
    meta: DatasetMeta,
    split: Split,
    rows: Sequence[int],
    tasks: Sequence[str],
    *,
    templates: str = "train",
    seed: int = 0,
    offset: int = 0,
) -> list[Example]:
    """One question per row labelled for at least two of ``tasks``, about a seeded pair
    of them (in ``tasks`` order).  ``offset`` is added to every row index (test rows sit
    after the training rows in the stage's feature table)."""
    if len(tasks) < 2:
        raise ValueError(f"two_tasks questions need at least two tasks, got {list(tasks)}")
    group_rng, word_rng = _rngs(seed, "two_tasks", templates)
    present, usable, _ = _pool(meta, split, rows, tasks)
    out = []
    for i in usable:
        have = [t for t in tasks if int(split.y[t][i]) >= 0]
        if len(have) < 2:
            continue
        picked = sorted(group_rng.choice(len(have), 2, replace=False))
        ta, tb = have[picked[0]], have[picked[1]]
        sa, sb = meta.tasks[ta], meta.tasks[tb]
        ca, cb = int(split.y[ta][i]), int(split.y[tb][i])
        j = int(word_rng.integers(len(TWO_TASK_QUESTIONS[templates])))
        q = TWO_TASK_QUESTIONS[templates][j].format(
            a=sa.title, b=sb.title, sensors=describe_present(present[i])
        )
        answer = two_task_answer(sa, sb, ca, cb, _choice(word_rng, TWO_TASK_ANSWERS))
        if parse_two_tasks(answer, sa, sb) != (ca, cb):  # a class name inside another's
            answer = two_task_answer(sa, sb, ca, cb, TWO_TASK_ANSWERS[0])
            if parse_two_tasks(answer, sa, sb) != (ca, cb):
                raise ValueError(
                    f"tasks {ta!r} and {tb!r}: the answer {answer!r} does not name its classes "
                    "unambiguously (a class name of one task contains another's)"
                )
        out.append(
            Example(
                i + offset, present[i], (Turn(q, answer),), "two_tasks", ta, None,
                f"two_tasks:{templates}:{j}", qtype="two_tasks", tasks=(ta, tb), labels=(ca, cb),
            )
        )  # fmt: skip
    return out


# ------------------------------------------------------------------ comparison


def parse_yes_no(text: str) -> int | None:
    """1 for an answer whose first yes/no word is yes, 0 for no, None without either."""
    found = re.search(r"(?<!\w)(yes|no)(?!\w)", (text or "").lower())
    return None if found is None else int(found.group(1) == "yes")


def comparison_examples(
    meta: DatasetMeta,
    split: Split,
    rows: Sequence[int],
    tasks: Sequence[str],
    n: int,
    *,
    templates: str = "train",
    seed: int = 0,
    offset: int = 0,
) -> list[Example]:
    """``n`` (rounded down to even) questions about two distinct rows of ``rows``, both
    labelled for the asked task: exactly half have the same class (yes), half not (no),
    in a seeded order."""
    group_rng, word_rng = _rngs(seed, "comparison", templates)
    present, _, labelled = _pool(meta, split, rows, tasks)
    by_class = {
        t: {c: [i for i in labelled[t] if int(split.y[t][i]) == c] for c in range(len(meta.tasks[t].classes))}
        for t in tasks
    }  # fmt: skip
    can = {
        1: [t for t in tasks if any(len(v) >= 2 for v in by_class[t].values())],
        0: [t for t in tasks if sum(bool(v) for v in by_class[t].values()) >= 2],
    }
    if not can[0] or not can[1]:
        raise ValueError(
            f"comparison questions need, for some task of {list(tasks)}, two rows of one class "
            f"and two rows of different classes among {len(present)} rows"
        )
    half = n // 2
    flags = group_rng.permutation([1] * half + [0] * half)
    out = []
    for same in (int(f) for f in flags):
        t = _choice(group_rng, can[same])
        if same:
            cls = _choice(group_rng, [c for c, v in by_class[t].items() if len(v) >= 2])
            a, b = (int(x) for x in group_rng.choice(by_class[t][cls], 2, replace=False))
        else:
            # the task has rows of two classes, so every row has one of another class
            a = int(_choice(group_rng, labelled[t]))
            others = [i for i in labelled[t] if int(split.y[t][i]) != int(split.y[t][a])]
            b = int(_choice(group_rng, others))
            if group_rng.random() < 0.5:
                a, b = b, a
        j = int(word_rng.integers(len(COMPARISON_QUESTIONS[templates])))
        title = meta.tasks[t].title
        q = COMPARISON_QUESTIONS[templates][j].format(task=title)
        answer = _choice(word_rng, COMPARISON_ANSWERS[same]).format(task=title)
        labels = (int(split.y[t][a]), int(split.y[t][b]))
        out.append(
            Example(
                a + offset, present[a], (Turn(q, answer),), "comparison", t, None,
                f"comparison:{templates}:{j}", qtype="comparison",
                samples=(a + offset, b + offset), presents=(present[a], present[b]),
                tasks=(t,), labels=labels, target=same,
            )
        )  # fmt: skip
    return out


# ------------------------------------------------------------------ counting


def parse_count(text: str) -> int | None:
    """The first whole number in ``text``, as digits or a word zero..nine; None without
    (a decimal such as ``1.5`` is no count)."""
    found = re.search(
        r"(?<![\w.])(\d+|" + "|".join(_NUMBER_WORDS) + r")(?!\w|\.\d)", (text or "").lower()
    )
    if found is None:
        return None
    word = found.group(1)
    return int(word) if word.isdigit() else _NUMBER_WORDS.index(word)


def count_examples(
    meta: DatasetMeta,
    split: Split,
    rows: Sequence[int],
    tasks: Sequence[str],
    n: int,
    recordings: int,
    *,
    templates: str = "train",
    seed: int = 0,
    offset: int = 0,
) -> list[Example]:
    """``n`` questions, each about ``recordings`` distinct rows of ``rows`` labelled for
    the asked task: the count c is drawn uniformly among 0..recordings where some class
    of some task has c rows and the task c' = recordings - c rows of other classes;
    then (task, class) uniformly among those that support c."""
    if not 2 <= recordings <= len(_NUMBER_WORDS) - 1:
        raise ValueError(f"llm.count_recordings={recordings}: give 2..{len(_NUMBER_WORDS) - 1}")
    group_rng, word_rng = _rngs(seed, "count", templates)
    present, _, labelled = _pool(meta, split, rows, tasks)
    size = {
        (t, c): sum(int(split.y[t][i]) == c for i in labelled[t])
        for t in tasks
        for c in range(len(meta.tasks[t].classes))
    }
    support = {
        k: [
            (t, c)
            for (t, c), m in size.items()
            if m >= k and len(labelled[t]) - m >= recordings - k
        ]
        for k in range(recordings + 1)
    }
    counts = [k for k, v in support.items() if v]
    if not counts:
        raise ValueError(
            f"count questions over {recordings} recordings: no task of {list(tasks)} has "
            f"{recordings} labelled rows among {len(present)}"
        )
    out = []
    for _ in range(n):
        k = int(_choice(group_rng, counts))
        t, c = support[k][int(group_rng.integers(len(support[k])))]
        yes = [i for i in labelled[t] if int(split.y[t][i]) == c]
        no = [i for i in labelled[t] if int(split.y[t][i]) != c]
        chosen = [
            *group_rng.choice(yes, k, replace=False),
            *group_rng.choice(no, recordings - k, replace=False),
        ]
        chosen = [int(chosen[p]) for p in group_rng.permutation(recordings)]
        j = int(word_rng.integers(len(COUNT_QUESTIONS[templates])))
        spec = meta.tasks[t]
        q = COUNT_QUESTIONS[templates][j].format(n=recordings, task=spec.title, cls=spec.words(c))
        answer = _choice(word_rng, COUNT_ANSWERS).format(n=k)
        out.append(
            Example(
                chosen[0] + offset, present[chosen[0]], (Turn(q, answer),), "count", t, c,
                f"count:{templates}:{j}", qtype="count",
                samples=tuple(i + offset for i in chosen), presents=tuple(present[i] for i in chosen),
                tasks=(t,), labels=tuple(int(split.y[t][i]) for i in chosen), target=k,
            )
        )  # fmt: skip
    return out


def type_examples(
    qtype: str,
    meta: DatasetMeta,
    split: Split,
    rows: Sequence[int],
    tasks: Sequence[str],
    n: int,
    *,
    recordings: int = 3,
    templates: str = "train",
    seed: int = 0,
    offset: int = 0,
) -> list[Example]:
    """Questions of ``qtype`` over ``rows`` (two_tasks: one per eligible row, at most
    ``n``; comparison and count: ``n``)."""
    kw = {"templates": templates, "seed": seed, "offset": offset}
    if qtype == "two_tasks":
        return two_task_examples(meta, split, rows, tasks, **kw)[:n]
    if qtype == "comparison":
        return comparison_examples(meta, split, rows, tasks, n, **kw)
    if qtype == "count":
        return count_examples(meta, split, rows, tasks, n, recordings, **kw)
    raise ValueError(f"no generator for question type {qtype!r}; choose from {list(EXTRA_TYPES)}")
