"""Bring your own data: a directory written by plain numpy, outside the project's API,
runs through the command line with ``data=npz data.path=DIR`` and an explicit plan."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO


def write_foreign_dataset(root, seed: int = 0) -> None:
    """What a user's own script would do: json + np.savez, nothing from fed_iotlm."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    meta = {
        "name": "wrist-and-room",
        "modalities": {
            "wrist": {"kind": "imu", "rate_hz": 25, "channels": ["ax", "ay", "az"]},
            "mic": {"kind": "audio", "rate_hz": 4000},
            "room": {"kind": "tabular", "channels": ["temp", "hum", "co2", "lux"]},
        },
        "tasks": {"gesture": {"type": "classification", "classes": ["wave", "tap", "rest"]}},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    for split, n in (("train", 240), ("test", 90)):
        y = rng.integers(0, 3, n)
        t = np.arange(40) / 25.0
        wrist = np.sin(2 * np.pi * (1 + y)[:, None, None] * t[None, :, None]) + rng.normal(
            0, 0.5, (n, 40, 3)
        )
        mic = np.sin(
            2 * np.pi * (200 + 300 * y)[:, None] * np.arange(1024)[None] / 4000
        ) + rng.normal(0, 0.5, (n, 1024))
        room = rng.normal(0, 1, (n, 4)) + y[:, None]
        mic[:5] = np.nan  # five recordings lost: missing, not an error
        labels = y.copy()
        labels[::7] = -1  # some unlabelled samples
        np.savez(
            root / f"{split}.npz",
            **{"x.wrist": wrist, "x.mic": mic, "x.room": room, "y.gesture": labels},
            site=rng.integers(0, 2, n),
        )


@pytest.mark.integration
def test_foreign_dataset_runs_from_the_command_line(tmp_path):
    data = tmp_path / "my_dataset"
    write_foreign_dataset(data)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "simulations.run",
        "data=npz", f"data.path={data}",
        "partition.plan=[[wrist,mic],[wrist,room],[mic]]",
        "rounds=3", "mlflow.enabled=false", f"output_dir={out}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line == str((out / "results.json").resolve())
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "wrist-and-room"
    assert res["plan"] == {"0": ["wrist", "mic"], "1": ["wrist", "room"], "2": ["mic"]}
    assert set(res["test"]["accuracy_by_modality"]) == {"wrist", "mic", "room"}
    assert res["test"]["accuracy"] > 0.5  # chance is 1/3


def test_bad_dataset_fails_with_the_file_and_key_named(tmp_path):
    data = tmp_path / "broken"
    write_foreign_dataset(data)
    arrays = dict(np.load(data / "train.npz"))
    arrays["x.wrist"] = arrays["x.wrist"][:, :, 0]  # rank 2 instead of [N, T, C]
    np.savez(data / "train.npz", **arrays)
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "data=npz",
        f"data.path={data}",
        "method=local",
        "mlflow.enabled=false",
        f"output_dir={tmp_path}/o",
        f"hydra.run.dir={tmp_path}/o",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "train.npz" in proc.stderr and "x.wrist" in proc.stderr and "rank" in proc.stderr


@pytest.mark.integration
def test_mmbind_runs_unchanged_on_a_foreign_dataset(tmp_path, quick_cfg):
    """``method=mmbind partition.shared=<modality>`` on a dataset the project never saw."""
    import json as _json

    from simulations.run import run_experiment

    data = tmp_path / "my_dataset"
    write_foreign_dataset(data)
    cfg = quick_cfg(
        "data=npz", f"data.path={data}", "method=mmbind", "partition.shared=wrist",
        "partition.plan=[[wrist,mic],[wrist,room],[wrist]]", "mlflow.enabled=false",
        "binding.pretrain_rounds=1",
    )  # fmt: skip
    res = _json.loads(run_experiment(cfg, tmp_path / "run").read_text())
    assert res["method"] == "mmbind" and res["binding"]["1"]["pairs"] > 0
    assert res["test"]["accuracy"] > 1 / 3
