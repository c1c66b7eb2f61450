"""Scoring the question types beyond classification (:mod:`fed_iotlm.llm.questions`).

Both ways the stage scores classification apply:

* ``generation``: greedy decoding, the answer parsed back (two class names, yes/no, a
  whole number); ``answered`` is the share that parsed;
* ``loglik``: every possible answer in its bare trained form (the class pair, ``yes`` /
  ``no``, ``0``..``n``) scored by :meth:`SensorLM.option_scores`; always answered.

Figures per type: ``accuracy`` (two_tasks: both classes right; comparison: yes/no right;
count: exact count), ``by_task`` (two_tasks: each part on its own), and for count the
mean absolute error ``mae`` (over answered questions).  Beside them, the two baselines a
reader needs: ``chance`` (a uniform guess) and ``majority`` (always the most frequent
answer of the type's training questions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from fed_iotlm.data.dataset import DatasetMeta

from .evaluation import greedy_answers
from .features import SensorFeatures
from .instructions import Example
from .questions import TWO_TASK_ANSWERS, parse_count, parse_two_tasks, parse_yes_no, two_task_answer
from .sensor_lm import SensorLM
from .sequences import SequenceBuilder

Answer = tuple[int | None, ...] | int | None


def _key(ex: Example) -> tuple:
    """Questions sharing one answer set: a task pair, or a type's recording count."""
    return ex.tasks if ex.qtype == "two_tasks" else (ex.qtype, len(ex.rows))


def truth(ex: Example) -> Answer:
    """The correct answer of ``ex``: the class pair (two_tasks), 1/0, or the count."""
    if ex.qtype == "two_tasks":
        return ex.labels
    if ex.qtype in ("comparison", "count"):
        return ex.target
    raise ValueError(f"question type {ex.qtype!r} is scored by evaluation.py, not here")


def parse(ex: Example, text: str, meta: DatasetMeta) -> Answer:
    """The answer ``text`` gives to ``ex`` (None parts where it names nothing)."""
    if ex.qtype == "two_tasks":
        return parse_two_tasks(text, *(meta.tasks[t] for t in ex.tasks))
    if ex.qtype == "comparison":
        return parse_yes_no(text)
    return parse_count(text)


def options(ex: Example, meta: DatasetMeta) -> tuple[list[str], list[Answer]]:
    """Every possible answer of ``ex`` as (bare answer texts, the answer each means)."""
    if ex.qtype == "two_tasks":
        sa, sb = (meta.tasks[t] for t in ex.tasks)
        pairs = [(a, b) for a in range(len(sa.classes)) for b in range(len(sb.classes))]
        return [two_task_answer(sa, sb, a, b, TWO_TASK_ANSWERS[0]) for a, b in pairs], pairs
    if ex.qtype == "comparison":
        return ["yes", "no"], [1, 0]
    counts = list(range(len(ex.rows) + 1))
    return [str(c) for c in counts], counts


def _answered(qtype: str, pred: Answer) -> bool:
    if qtype == "two_tasks":
        return all(p is not None for p in pred)
    return pred is not None


def metrics(examples: Sequence[Example], preds: Sequence[Answer]) -> dict:
    """``accuracy``, ``by_task``, ``answered`` (and ``mae`` for counts) of ``preds``."""
    if not examples:
        return {"accuracy": float("nan"), "by_task": {}, "answered": 0.0, "n": 0}
    qtype = examples[0].qtype
    right, answered, parts, errors = [], [], {}, []
    for ex, pred in zip(examples, preds, strict=True):
        want = truth(ex)
        right.append(pred == want)
        answered.append(_answered(qtype, pred))
        if qtype == "two_tasks":
            for t, p, w in zip(ex.tasks, pred, want, strict=True):
                parts.setdefault(t, []).append(p == w)
        else:
            parts.setdefault(ex.task, []).append(pred == want)
        if qtype == "count" and pred is not None:
            errors.append(abs(int(pred) - int(want)))
    out = {
        "accuracy": float(np.mean(right)),
        "by_task": {t: float(np.mean(v)) for t, v in parts.items()},
        "answered": float(np.mean(answered)),
        "n": len(examples),
    }
    if qtype == "count":
        out["mae"] = float(np.mean(errors)) if errors else float("nan")
    return out


def generation_scores(
    model: SensorLM,
    builder: SequenceBuilder,
    feats: SensorFeatures,
    examples: Sequence[Example],
    meta: DatasetMeta,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 10,
    keep: int = 3,
) -> dict:
    """Greedy answers parsed back and scored (see the module docstring)."""
    texts = greedy_answers(
        model, builder, feats, examples, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    preds = [parse(ex, text, meta) for ex, text in zip(examples, texts, strict=True)]
    samples = [
        {"question": ex.turns[-1].question, "answer": text, "truth": ex.turns[-1].answer}
        for ex, text in zip(examples[:keep], texts, strict=False)
    ]
    return metrics(examples, preds) | {"samples": samples}


def loglik_scores(
    model: SensorLM,
    builder: SequenceBuilder,
    feats: SensorFeatures,
    examples: Sequence[Example],
    meta: DatasetMeta,
    *,
    batch_size: int = 32,
    **_: object,
) -> dict:
    """The likeliest of every possible answer, per question (see the module docstring)."""
    groups: dict[tuple, list[int]] = {}
    for j, ex in enumerate(examples):
        groups.setdefault(_key(ex), []).append(j)
    preds: list[Answer] = [None] * len(examples)
    for idx in groups.values():
        texts, meaning = options(examples[idx[0]], meta)
        ids = [builder.answer_ids(t) for t in texts]
        step = max(1, batch_size // max(1, len(texts) // 4))  # the cache grows with options
        for i in range(0, len(idx), step):
            part = idx[i : i + step]
            batch = builder.collate(
                [builder.encode(examples[j], prompt_only=True) for j in part], left_pad=True
            ).to(feats.present.device)
            best = model.option_scores(batch, feats, ids, builder.pad_id).argmax(-1).tolist()
            for j, b in zip(part, best, strict=True):
                preds[j] = meaning[b]
    return metrics(examples, preds)


QUESTION_SCORERS = {"generation": generation_scores, "loglik": loglik_scores}


def score_questions(method: str, *args, **kwargs) -> dict:
    """Figures of one question type by ``method`` (``generation`` or ``loglik``)."""
    if method not in QUESTION_SCORERS:
        raise ValueError(
            f"llm.scoring: unknown method {method!r}; choose from {list(QUESTION_SCORERS)}"
        )
    return QUESTION_SCORERS[method](*args, **kwargs)


def baselines(train: Sequence[Example], test: Sequence[Example], meta: DatasetMeta) -> dict:
    """``majority``: always the most frequent answer among the training questions of the
    same answer set (task pair, or recording count); ``chance``: a uniform guess over the
    possible answers, its expected accuracy (and, for counts, its expected error)."""
    seen: dict[tuple, Counter] = {}
    for ex in train:
        seen.setdefault(_key(ex), Counter())[truth(ex)] += 1
    majority = [
        seen[_key(ex)].most_common(1)[0][0] if _key(ex) in seen else options(ex, meta)[1][0]
        for ex in test
    ]
    chance_acc, chance_parts, chance_err = [], {}, []
    for ex in test:
        meaning = options(ex, meta)[1]
        chance_acc.append(1.0 / len(meaning))
        if ex.qtype == "two_tasks":
            for t in ex.tasks:
                chance_parts.setdefault(t, []).append(1.0 / len(meta.tasks[t].classes))
        else:
            chance_parts.setdefault(ex.task, []).append(1.0 / len(meaning))
        if ex.qtype == "count":
            chance_err.append(float(np.mean([abs(g - ex.target) for g in meaning])))
    chance = {
        "accuracy": float(np.mean(chance_acc)) if test else float("nan"),
        "by_task": {t: float(np.mean(v)) for t, v in chance_parts.items()},
    }
    if chance_err:
        chance["mae"] = float(np.mean(chance_err))
    return {"majority": metrics(test, majority), "chance": chance}
