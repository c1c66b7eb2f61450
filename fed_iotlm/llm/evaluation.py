"""Evaluation: by generation (decode greedily, map the answer to a class) and by option
log-likelihood (the class whose name the LM finds likeliest), with the controls a
reviewer asks for on the same questions: the federated classifier head (what the
encoders already know), the majority class of the training labels, and the tuned LM with
sensors shuffled across samples (does the answer follow the sensors?).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from fed_iotlm.data.dataset import DatasetMeta, Split

from .features import SensorFeatures
from .instructions import Example, Turn, answer_to_class
from .sensor_lm import SensorLM
from .sequences import SequenceBuilder


def greedy_answers(
    model: SensorLM,
    builder: SequenceBuilder,
    feats: SensorFeatures,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 10,
    sensors: bool = True,
    shots: Callable[[Example], Sequence[Example]] | None = None,
) -> list[str]:
    """The decoded greedy answer to each example's last question, in order: the one
    generation loop every generation scorer (classification, the other question types)
    parses its own way."""
    texts: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        encs = [builder.encode(ex, shots(ex) if shots else (), prompt_only=True) for ex in chunk]
        batch = builder.collate(encs, left_pad=True).to(feats.present.device)
        if sensors:
            out = model.generate(batch, feats, builder.eos_id, max_new_tokens)
        else:
            with model.peft.disable_adapter():  # the LM as shipped: no LoRA, no sensors
                out = model.generate(batch, feats, builder.eos_id, max_new_tokens, sensors=False)
        texts += [builder.tok.decode(ids, skip_special_tokens=True).strip() for ids in out]
    return texts


def generation_accuracy(
    model: SensorLM,
    builder: SequenceBuilder,
    feats: SensorFeatures,
    examples: Sequence[Example],
    meta: DatasetMeta,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 10,
    sensors: bool = True,
    shots: Callable[[Example], Sequence[Example]] | None = None,
    keep: int = 3,
) -> dict:
    """``{"accuracy", "by_task": {t: acc}, "answered": share mapped to a class, "samples"}``;
    ``accuracy`` is the mean over tasks (as everywhere in results.json)."""
    correct: dict[str, list[bool]] = {}
    answered, samples = [], []
    texts = greedy_answers(
        model, builder, feats, examples,
        batch_size=batch_size, max_new_tokens=max_new_tokens, sensors=sensors, shots=shots,
    )  # fmt: skip
    for ex, text in zip(examples, texts, strict=True):
        pred = answer_to_class(text, meta.tasks[ex.task])
        answered.append(pred is not None)
        correct.setdefault(ex.task, []).append(pred == ex.label)
        if len(samples) < keep:
            samples.append(
                {
                    "question": ex.turns[-1].question,
                    "answer": text,
                    "label": meta.tasks[ex.task].classes[ex.label],
                }
            )
    by_task = {t: float(np.mean(v)) for t, v in correct.items()}
    return {
        "accuracy": float(np.mean(list(by_task.values()))) if by_task else float("nan"),
        "by_task": by_task,
        "answered": float(np.mean(answered)) if answered else 0.0,
        "n": len(examples),
        "samples": samples,
    }


def option_accuracy(
    model: SensorLM,
    builder: SequenceBuilder,
    feats: SensorFeatures,
    examples: Sequence[Example],
    meta: DatasetMeta,
    *,
    batch_size: int = 32,
    shots: Callable[[Example], Sequence[Example]] | None = None,
    **_: object,
) -> dict:
    """Score each class name (as the bare answer form the LM is tuned on, plus the end of
    turn) and pick the likeliest; every question is answered by construction.  ``shots``:
    answered in-context examples before each question, as in generation."""
    correct: dict[str, list[bool]] = {}
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    for task, exs in by_task.items():
        classes = meta.tasks[task].class_words  # as the answers are written in training
        options = [builder.answer_ids(c) for c in classes]
        step = max(1, batch_size // max(1, len(classes) // 4))  # cache grows with options
        for i in range(0, len(exs), step):
            chunk = exs[i : i + step]
            batch = builder.collate(
                [builder.encode(ex, shots(ex) if shots else (), prompt_only=True) for ex in chunk],
                left_pad=True,
            ).to(feats.present.device)
            pred = model.option_scores(batch, feats, options, builder.pad_id).argmax(-1)
            correct.setdefault(task, []).extend(
                (int(p) == ex.label) for p, ex in zip(pred.tolist(), chunk, strict=True)
            )
    means = {t: float(np.mean(v)) for t, v in correct.items()}
    return {
        "accuracy": float(np.mean(list(means.values()))) if means else float("nan"),
        "by_task": means,
        "answered": 1.0,
        "n": len(examples),
    }


SCORERS = {"generation": generation_accuracy, "loglik": option_accuracy}


def score(method: str, *args, **kwargs) -> dict:
    """Accuracy by ``method`` (``generation`` or ``loglik``)."""
    if method not in SCORERS:
        raise ValueError(f"llm.scoring: unknown method {method!r}; choose from {list(SCORERS)}")
    return SCORERS[method](*args, **kwargs)


def majority_accuracy(train: Split, rows: Sequence[int], examples: Sequence[Example]) -> dict:
    """Always answer each task's most frequent class among the labelled training rows."""
    rows = np.asarray(rows, dtype=np.int64)
    correct: dict[str, list[bool]] = {}
    for ex in examples:
        y = np.asarray(train.y[ex.task])[rows]
        y = y[y >= 0]
        guess = int(np.bincount(y).argmax()) if len(y) else 0
        correct.setdefault(ex.task, []).append(guess == ex.label)
    by_task = {t: float(np.mean(v)) for t, v in correct.items()}
    return {"accuracy": float(np.mean(list(by_task.values()))), "by_task": by_task}


def shuffled_sensors(feats: SensorFeatures, rows: Sequence[int], seed: int) -> SensorFeatures:
    """``feats`` with the sensor rows ``rows`` permuted among themselves, within groups
    that have the same sensors present (the prompt still names the right sensors; only the
    readings belong to another sample)."""
    import torch

    rows = np.unique(np.asarray(rows, dtype=np.int64))
    present = feats.present.cpu().numpy()[rows]
    order = np.arange(len(feats.present))
    rng = np.random.default_rng(seed)
    _, group = np.unique(present, axis=0, return_inverse=True)
    for g in np.unique(group):
        members = rows[group.reshape(-1) == g]
        order[members] = members[rng.permutation(len(members))]
    idx = torch.as_tensor(order, device=feats.present.device)
    return SensorFeatures(
        feats.names,
        {m: v[idx] for m, v in feats.feats.items()},
        feats.present[idx],
        {t: v[idx.cpu()] for t, v in feats.head_pred.items()},
    )


def head_accuracy(feats: SensorFeatures, examples: Sequence[Example]) -> dict:
    """The federated classifier head on exactly the evaluated samples."""
    correct: dict[str, list[bool]] = {}
    for ex in examples:
        pred = int(feats.head_pred[ex.task][ex.index])
        correct.setdefault(ex.task, []).append(pred == ex.label)
    by_task = {t: float(np.mean(v)) for t, v in correct.items()}
    return {"accuracy": float(np.mean(list(by_task.values()))), "by_task": by_task}


def with_options(examples: Sequence[Example], meta: DatasetMeta) -> list[Example]:
    """The text-only prompt lists the classes, giving an untuned LM a fair chance to
    answer in the task's vocabulary."""
    out = []
    for ex in examples:
        options = ", ".join(meta.tasks[ex.task].class_words)
        last = ex.turns[-1]
        turn = Turn(f"{last.question} Answer with one of: {options}.", last.answer)
        out.append(replace(ex, turns=(*ex.turns[:-1], turn)))
    return out


def text_description(split: Split, offset: int = 0) -> Callable[[int], str]:
    """Summary statistics of each present modality, in words: what a user could paste
    into a chat without sensor tokens."""

    def describe(index: int) -> str:
        i = index - offset
        parts = []
        for m, arr in split.x.items():
            if not split.mask[m][i]:
                continue
            v = np.asarray(arr[i], dtype=np.float64)
            parts.append(
                f"{m} mean {v.mean():.2f}, std {v.std():.2f}, min {v.min():.2f}, max {v.max():.2f}"
            )
        return "; ".join(parts) + "."

    return describe
