"""Shared by the studies: one resumable run per (point, method, seed), in a subprocess.

Each run is ``python -m simulations.run`` in its own process so that every federation
gets a fresh Ray; a run whose results.json exists is not repeated, so an interrupted
study resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def point_key(overrides: list[str]) -> str:
    """Run folder of a point: the same overrides in two sweeps share their runs."""
    return hashlib.sha1(" ".join(sorted(overrides)).encode()).hexdigest()[:12]


def run_one(out: Path, overrides: list[str], *, experiment: str, mlflow_experiment: str) -> dict:
    """results.json of ``experiment`` with ``overrides`` written to ``out`` (run if missing)."""
    results = out / "results.json"
    if results.is_file():  # resumable: a finished run is not repeated
        return json.loads(results.read_text())
    cmd = [sys.executable, "-m", "simulations.run", f"experiment={experiment}", *overrides,
           f"mlflow.experiment={mlflow_experiment}", f"output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(results.read_text())


def fmt_mean_std(values: list[float]) -> str:
    """``mean ± std`` (population std, as over seeds) to three decimals."""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"
