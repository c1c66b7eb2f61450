"""Test-set report in the shape results.json expects.

``accuracy`` uses every modality the model may use; ``accuracy_by_modality`` gives
each modality alone (the others masked out), which shows what fusion adds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors, evaluate, mean_accuracy


def test_report(
    model: MultisensoryModel, data: SplitTensors, available: Sequence[str] | None = None
) -> dict:
    """All-available and single-modality accuracy, overall (mean over tasks) and per task."""
    mods = list(data.x) if available is None else [m for m in available if m in data.x]
    full = evaluate(model, data, mods)
    single = {m: evaluate(model, data, [m]) for m in mods}
    by_task = {
        t: {
            "accuracy": full[t]["accuracy"],
            "accuracy_by_modality": {m: single[m][t]["accuracy"] for m in mods},
        }
        for t in full
    }
    return {
        "accuracy": mean_accuracy(full),
        "accuracy_by_modality": {m: mean_accuracy(single[m]) for m in mods},
        "by_task": by_task,
    }


def mean_reports(reports: Sequence[dict]) -> dict:
    """Average several reports key by key (the local-only baseline: one per node).

    A modality's figure is averaged over the reports that have it.
    """
    out: dict = {"accuracy": float(np.mean([r["accuracy"] for r in reports]))}
    mods = sorted({m for r in reports for m in r["accuracy_by_modality"]})
    out["accuracy_by_modality"] = {
        m: float(
            np.mean(
                [r["accuracy_by_modality"][m] for r in reports if m in r["accuracy_by_modality"]]
            )
        )
        for m in mods
    }
    tasks = list(reports[0]["by_task"])
    out["by_task"] = {
        t: {
            "accuracy": float(np.mean([r["by_task"][t]["accuracy"] for r in reports])),
            "accuracy_by_modality": {
                m: float(
                    np.mean(
                        [
                            r["by_task"][t]["accuracy_by_modality"][m]
                            for r in reports
                            if m in r["by_task"][t]["accuracy_by_modality"]
                        ]
                    )
                )
                for m in mods
            },
        }
        for t in tasks
    }
    return out
