"""Shared fixtures: composed configs that write into a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

REPO = Path(__file__).resolve().parents[1]


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
