"""Shared fixtures: composed configs that write into a temporary directory; how
``make test``'s two pytest workers share the suite (tests/work_units.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.work_units import make_scheduler, real_processes_first

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own; no hook without xdist
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadfile``: a file per unit, the real-process files one unit."""
    return make_scheduler(config, log) if config.getvalue("dist") == "loadfile" else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """On an xdist worker (the same order on each, as xdist requires): the real-process
    unit first, so the longest unit starts at once (tests/work_units.py)."""
    if hasattr(config, "workerinput"):
        items[:] = real_processes_first(items)


@pytest.fixture
def quick_cfg(tmp_path):
    """The 3-node, 2-round experiment with MLflow pointed at a private sqlite store."""
    from fed_iotlm.settings import compose

    def make(*overrides: str) -> dict:
        return compose(
            [
                "experiment=quick",
                f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                *overrides,
            ]
        )

    return make
