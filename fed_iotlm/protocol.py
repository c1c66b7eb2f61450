"""What a reader needs before trusting a figure, recorded in every results.json.

* ``protocol``: where validation data came from (a dataset's ``val.npz`` or shares
  carved from the nodes' training data), how inputs were standardised, and every
  choice the run made with the split it was made on.  Test is evaluated after the
  choices and never feeds back.
* ``budget``: optimiser steps and examples seen per node per round (mean over the
  nodes that trained), so methods compared side by side can be seen to have had the
  same budget.
* ``code_version``: the commit and whether the tree had uncommitted changes, or, run
  from an installed package outside a git checkout, that package's version; study
  tables refuse to mix versions.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

from fed_iotlm.config_schema import block
from fed_iotlm.data.federation import FederationLayout
from fed_iotlm.federation.normalization import normalization_mode
from fed_iotlm.selection import LAST, choice_record, select_round_mode

REPO = Path(__file__).resolve().parents[1]
DIST = "fed-iotlm"  # the distribution's name (pyproject.toml)


def version_label(version: dict | None) -> str:
    """The one name a table gives a results.json ``code_version``: ``<commit>`` or
    ``<commit>+dirty``; without a commit (an installed package) ``fed-iotlm==<version>``,
    so runs of two releases still differ; ``unknown`` when neither was recorded."""
    version = version or {}
    if version.get("commit"):
        return version["commit"] + ("+dirty" if version.get("dirty") else "")
    if version.get("package"):
        return f"{DIST}=={version['package']}"
    return "unknown"


def one_code_version(results: Iterable[Mapping | None]) -> str:
    """The one code version of every results.json in a table, or a ValueError naming each
    version found: a row of old code beside one of new code would compare two programs."""
    versions = sorted({version_label((r or {}).get("code_version")) for r in results})
    if len(versions) != 1:
        raise ValueError(
            f"a table would mix results of {len(versions)} code versions ({', '.join(versions)}); "
            "re-run the study at one version, or report one version's runs"
        )
    return versions[0]


def first_binding_pair_accuracy(results: dict) -> dict[str, float]:
    """Same-class pair accuracy per task at a run's first binding (MMBind; else empty)."""
    pairs = (results.get("binding") or {}).get("pair_accuracy_by_binding") or {}
    return pairs[min(pairs, key=int)] if pairs else {}


# paths whose changes cannot change a figure: a study rewrites its own docs page (and plot)
# while it runs, which must not make the rest of its runs "dirty"
NOT_CODE = (":(exclude)docs", ":(exclude)*.md")


@lru_cache(maxsize=4)
def code_version(repo: Path = REPO) -> dict:
    """``{"commit": sha, "dirty": bool}`` of the checkout this code runs from, or
    ``{"commit": None, "dirty": None, "package": version}`` outside one (an installed
    wheel: :func:`installed_version`, None if that is unknown too).  ``dirty``: tracked
    files other than docs (:data:`NOT_CODE`) differ from the commit.

    ``repo`` must be the checkout's top level: a wheel installed into a virtual
    environment that lies inside some checkout (``.venv/`` of a clone) is inside a git
    work tree too, and would otherwise record that checkout's commit as its own."""
    try:
        top = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        if Path(top).resolve() != Path(repo).resolve():
            raise subprocess.SubprocessError(f"{repo} is not the top of the checkout {top}")
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
        return {"commit": None, "dirty": None, "package": installed_version()}
    return {"commit": commit, "dirty": bool(status.strip())}


def installed_version(
    dist: str = DIST, module: Path = Path(__file__), relative: str = "fed_iotlm/protocol.py"
) -> str | None:
    """The version of the installed distribution ``dist``, if ``module`` (this file) is
    that distribution's own copy at ``relative``; else None.  Why the check: a copy of
    the sources run beside an installed wheel (or an editable install, whose files are
    the checkout's) is not the code that version names."""
    try:
        found = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    if Path(str(found.locate_file(relative))).resolve() != Path(module).resolve():
        return None
    return found.version


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
    selected_round: int | None = None,
) -> dict:
    """The ``protocol``, ``budget`` and ``code_version`` keys of results.json.

    ``selected_round``: the round whose model the run reports (``select_round=best_val``
    must say; ``last``: ``rounds``), recorded with the rule beside ``choices``."""
    train = block(cfg, "train")
    mode = select_round_mode(cfg)
    if selected_round is None:
        if mode != LAST:
            raise ValueError(f"select_round={mode}: the caller must say which round it reports")
        selected_round = int(cfg["rounds"])
    chosen = choice_record(mode, selected_round)
    return {
        "protocol": {
            "normalization": normalization_mode(cfg),
            "val_source": "val.npz" if layout.val_source == "val" else "carved from node train",
            "val_fraction": float(block(cfg, "partition")["val_fraction"]),
            "val_samples": int(sum(len(p) for p in layout.val_parts)),
            "choices": dict(choices or chosen["choices"]),
            "choices_made_on": "val",
            "test_feeds_back": False,
            "select_round": chosen["select_round"],
            "selected_round": chosen["selected_round"],
        },
        "budget": {
            "epochs": train["epochs"],
            "steps": train["steps"],
            "batch_size": train["batch_size"],
            **(budget if budget is not None else budget_from_history(history)),
        },
        "code_version": code_version(),
    }
