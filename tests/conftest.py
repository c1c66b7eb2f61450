"""Shared fixtures: composed configs that write into a temporary directory; how
``make test``'s two pytest workers (pytest-xdist, ``--dist loadgroup``) share the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.flower_procs import REAL_PROCESSES

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """On an xdist worker under ``--dist loadgroup``: every test without an
    ``xdist_group`` is grouped by its file, so a file runs on one worker and its
    module-scoped fixtures (a real federation, a trained model) are built once, as
    ``--dist loadfile`` would; and the real-process group goes first, because it is the
    longest unit of work (with ``--no-loadscope-reorder``, units start in this order).
    The order is the same on every worker, as xdist requires."""
    if not config.getoption("loadgroup", default=False):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(Path(item.nodeid.split("::")[0]).stem))
    items.sort(key=lambda item: _group(item) != REAL_PROCESSES)


def _group(item: pytest.Item) -> str:
    mark = item.get_closest_marker("xdist_group")
    return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))


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
