"""The seed's training recipe: phased training and per-task loss weights.

IoT-LM trains in phases: the modality encoders, then the alignment of sensor tokens to
the LM, then instruction tuning, with a loss weight per task during joint training.
Here:

* **encoders** is the federation itself: the stage receives frozen federated encoders
  (the bundle) and never trains them, so it is not a phase of ``llm.phases``;
* **align** (``llm.phases=[align,instruct]``) trains only the sensor conditioning
  (projector, gated adapter or seed adapter) on captioning-style targets
  (``Sensors: imu and audio. Activity: walking.``, :func:`caption_examples`) with LoRA
  frozen (its B is still zero then, so frozen is also off);
* **instruct** trains LoRA and the conditioning on the instructions.

``llm.phase_steps`` gives each phase its steps and must add up to ``llm.steps``, so a
phased run spends exactly the single-phase run's optimiser steps (a fair comparison).
The LoRA-tuned text-only control has nothing to align and spends all ``llm.steps`` on
instructions (the stronger control).

``llm.task_weights`` (``{activity: 1.0, location: 0.5}``) multiplies each example's
answer-token losses by the weight of its task (unlisted tasks: 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fed_iotlm.data.dataset import DatasetMeta, Split

from .instructions import Example, Turn, _present, describe_present

PHASES = ("align", "instruct")
ORDERS = (("instruct",), ("align", "instruct"))
ENCODERS_NOTE = "the federation: frozen federated encoders from the bundle, not trained here"
CAPTION_QUESTION = "Describe the {task} in this recording."


def check_task_weights(weights: Mapping[str, float], tasks: Sequence[str]) -> dict[str, float]:
    """``weights`` as a plain dict, refusing task names not in ``tasks``, weights that are
    not finite non-negative numbers, and a table that weighs every listed task at 0."""
    table = dict(weights or {})
    unknown = sorted(set(table) - set(tasks))
    if unknown:
        raise ValueError(
            f"llm.task_weights: unknown task(s) {unknown}; the tasks tuned here are {list(tasks)}"
        )
    out = {}
    for task, w in table.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ValueError(f"llm.task_weights.{task}={w!r}: expected a finite number >= 0")
        out[task] = float(w)
    if out and len(out) == len(tasks) and not any(out.values()):
        raise ValueError("llm.task_weights: every task weighted 0 leaves nothing to learn")
    return out


def phase_plan(phases: Sequence[str], phase_steps: Sequence[int] | None, steps: int) -> list:
    """``[(phase, steps)]`` in order, from ``llm.phases`` / ``llm.phase_steps`` /
    ``llm.steps``; refuses an unknown or misordered phase and steps that do not add up."""
    order = tuple(phases)
    if "encoders" in order:
        raise ValueError(
            f"llm.phases={list(order)}: the encoders phase is the federation itself ({ENCODERS_NOTE}); "
            "list only align and instruct"
        )
    if order not in ORDERS:
        raise ValueError(
            f"llm.phases={list(order)}: choose {[list(o) for o in ORDERS]} (align before instruct)"
        )
    if len(order) == 1:
        if phase_steps not in (None, [], [steps]):
            raise ValueError(
                f"llm.phase_steps={phase_steps}: one phase runs llm.steps={steps}; "
                "give null or drop it"
            )
        return [(order[0], steps)]
    given = list(phase_steps or [])
    if len(given) != len(order) or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in given
    ):
        raise ValueError(
            f"llm.phase_steps={phase_steps}: give {len(order)} positive step counts for "
            f"{list(order)}, e.g. [{steps // 2}, {steps - steps // 2}]"
        )
    if sum(given) != steps:
        raise ValueError(
            f"llm.phase_steps={given} add up to {sum(given)}, not llm.steps={steps}: a phased "
            "run spends the single-phase run's steps, so comparisons stay fair"
        )
    return list(zip(order, given, strict=True))


def caption_text(meta: DatasetMeta, present: Sequence[str], task: str, label: int) -> str:
    """``Sensors: imu and audio. Activity: walking.`` (what the align phase teaches)."""
    spec = meta.tasks[task]
    return f"Sensors: {describe_present(present)}. {spec.title.capitalize()}: {spec.words(label)}."


def caption_examples(
    meta: DatasetMeta, split: Split, rows: Sequence[int], tasks: Sequence[str]
) -> list[Example]:
    """One captioning example per (row, task labelled for it) of ``rows`` (the fit rows:
    validation rows never feed a phase).  The question names the task, so the example is
    routed to that task's adapter queries / seed adapter and weighted by its task."""
    out = []
    for i in np.asarray(rows, dtype=int).tolist():
        present = _present(meta, split, i)
        if not present:
            continue
        for task in tasks:
            label = int(split.y[task][i]) if task in split.y else -1
            if label < 0:
                continue
            turn = Turn(
                CAPTION_QUESTION.format(task=meta.tasks[task].title),
                caption_text(meta, present, task, label),
            )
            out.append(Example(i, present, (turn,), "caption", task, label, f"caption:{task}"))
    if not out:
        raise ValueError("llm.phases: align needs labelled fit rows with a sensor present")
    return out
