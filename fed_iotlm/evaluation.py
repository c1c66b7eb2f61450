"""Test-set report in the shape results.json expects.

``accuracy`` uses every modality the model may use; ``accuracy_by_modality`` gives
each modality alone (the others masked out), which shows what fusion adds.  Beside
each accuracy sit ``f1_macro`` and ``balanced_accuracy`` (and their ``_by_modality``
forms), overall (mean over tasks) and per task: on skewed real data (ExtraSensory) or
when comparing with published federated results (FedMultimodal reports macro-F1),
accuracy alone says little.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors, evaluate, mean_metric

SCORES: tuple[str, ...] = ("accuracy", "f1_macro", "balanced_accuracy")


def test_report(
    model: MultisensoryModel, data: SplitTensors, available: Sequence[str] | None = None
) -> dict:
    """All-available and single-modality scores, overall (mean over tasks) and per task."""
    mods = list(data.x) if available is None else [m for m in available if m in data.x]
    full = evaluate(model, data, mods)
    single = {m: evaluate(model, data, [m]) for m in mods}
    by_task = {
        t: {
            **{k: full[t][k] for k in SCORES},
            **{f"{k}_by_modality": {m: single[m][t][k] for m in mods} for k in SCORES},
        }
        for t in full
    }
    return {
        **{k: mean_metric(full, k) for k in SCORES},
        **{f"{k}_by_modality": {m: mean_metric(single[m], k) for m in mods} for k in SCORES},
        "by_task": by_task,
    }


def mean_reports(reports: Sequence[dict]) -> dict:
    """Average several reports key by key (the local-only baseline: one per node).

    A modality's figure is averaged over the reports that have it.
    """
    scores = [k for k in SCORES if all(k in r for r in reports)]
    out: dict = {k: float(np.mean([r[k] for r in reports])) for k in scores}
    for k in scores:
        out[f"{k}_by_modality"] = _mean_by_modality([r[f"{k}_by_modality"] for r in reports])
    tasks = list(reports[0]["by_task"])
    out["by_task"] = {
        t: {
            **{k: float(np.mean([r["by_task"][t][k] for r in reports])) for k in scores},
            **{
                f"{k}_by_modality": _mean_by_modality(
                    [r["by_task"][t][f"{k}_by_modality"] for r in reports]
                )
                for k in scores
            },
        }
        for t in tasks
    }
    return out


def _mean_by_modality(per_report: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each modality's figure over the reports that have that modality."""
    mods = sorted({m for d in per_report for m in d})
    return {m: float(np.mean([d[m] for d in per_report if m in d])) for m in mods}
