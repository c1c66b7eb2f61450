"""Evaluation by generation: ask, decode greedily, map the answer to a class.

Per-task accuracy is computed on held-out question templates, next to two references
on the same samples: the federated classifier head (what the encoders already know)
and the same LM prompted with a text-only description of the readings (what the LM
can do without sensor tokens).
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
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        encs = [builder.encode(ex, shots(ex) if shots else (), prompt_only=True) for ex in chunk]
        batch = builder.collate(encs, left_pad=True).to(feats.present.device)
        if sensors:
            out = model.generate(batch, feats, builder.eos_id, max_new_tokens)
        else:
            with model.peft.disable_adapter():  # the LM as shipped: no LoRA, no sensors
                out = model.generate(batch, feats, builder.eos_id, max_new_tokens, sensors=False)
        for ex, ids in zip(chunk, out, strict=True):
            text = builder.tok.decode(ids, skip_special_tokens=True).strip()
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
        options = ", ".join(meta.tasks[ex.task].classes)
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
