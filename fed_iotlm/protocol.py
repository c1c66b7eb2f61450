"""What a reader needs before trusting a figure, recorded in every results.json.

* ``protocol``: where validation data came from (a dataset's ``val.npz`` or shares
  carved from the nodes' training data), how inputs were standardised, and every
  choice the run made with the split it was made on.  Test is evaluated after the
  choices and never feeds back.
* ``budget``: optimiser steps and examples seen per node per round (mean over the
  nodes that trained), so methods compared side by side can be seen to have had the
  same budget.
* ``code_version``: the commit and whether the tree had uncommitted changes; study
  tables refuse to mix versions.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

from fed_iotlm.config_schema import block
from fed_iotlm.data.federation import FederationLayout
from fed_iotlm.federation.normalization import normalization_mode

REPO = Path(__file__).resolve().parents[1]


def version_label(version: dict | None) -> str:
    """``<commit>`` or ``<commit>+dirty`` of a results.json ``code_version`` (``unknown``
    without one): the one name a table gives a code version."""
    version = version or {}
    return (version.get("commit") or "unknown") + ("+dirty" if version.get("dirty") else "")


def first_binding_pair_accuracy(results: dict) -> dict[str, float]:
    """Same-class pair accuracy per task at a run's first binding (MMBind; else empty)."""
    pairs = (results.get("binding") or {}).get("pair_accuracy_by_binding") or {}
    return pairs[min(pairs, key=int)] if pairs else {}


# what the federation itself chooses: nothing; the model reported is the last round's
FINAL_MODEL_CHOICE = {"model": "last round (fixed budget, no selection)"}


# paths whose changes cannot change a figure: a study rewrites its own docs page (and plot)
# while it runs, which must not make the rest of its runs "dirty"
NOT_CODE = (":(exclude)docs", ":(exclude)*.md")


@lru_cache(maxsize=4)
def code_version(repo: Path = REPO) -> dict:
    """``{"commit": sha, "dirty": bool}`` of the checkout this code runs from, or
    ``{"commit": None, "dirty": None}`` outside a git checkout (an installed wheel).
    ``dirty``: tracked files other than docs (:data:`NOT_CODE`) differ from the commit."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
             ".", *NOT_CODE],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def budget_from_history(history: list[dict]) -> dict:
    """Mean steps and examples per node per round over the rounds that reported them
    (a single centralized model reports ``steps``/``examples`` per round instead)."""

    def mean_of(key: str) -> float | None:
        values = [h[key] for h in history if key in h]
        return float(np.mean(values)) if values else None

    out = {
        "steps_per_node_round": mean_of("steps_per_node"),
        "examples_per_node_round": mean_of("examples_per_node"),
    }
    if mean_of("steps") is not None:
        out.update(steps_per_round=mean_of("steps"), examples_per_round=mean_of("examples"))
    return out


def protocol_record(
    cfg: dict,
    layout: FederationLayout,
    history: list[dict],
    choices: dict | None = None,
    budget: dict | None = None,
) -> dict:
    """The ``protocol``, ``budget`` and ``code_version`` keys of results.json."""
    train = block(cfg, "train")
    return {
        "protocol": {
            "normalization": normalization_mode(cfg),
            "val_source": "val.npz" if layout.val_source == "val" else "carved from node train",
            "val_fraction": float(block(cfg, "partition")["val_fraction"]),
            "val_samples": int(sum(len(p) for p in layout.val_parts)),
            "choices": dict(choices or FINAL_MODEL_CHOICE),
            "choices_made_on": "val",
            "test_feeds_back": False,
        },
        "budget": {
            "epochs": train["epochs"],
            "steps": train["steps"],
            "batch_size": train["batch_size"],
            **(budget if budget is not None else budget_from_history(history)),
        },
        "code_version": code_version(),
    }
