"""The GPU path's device logic, checked on the CPU (issue 16).

No test here needs a GPU: they pin down what ``train.device`` / ``binding.device``
resolve to, that ``cuda`` without a GPU is one clear line at start-up, which copies and
autocast a placement selects, that the chunked torch top-k equals faiss exactly, and
that the device check refuses to run without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_iotlm.binding.index import SearchConfig, chunk_shape, normalize, top_k, torch_top_k
from fed_iotlm.experiment import match_config
from fed_iotlm.models.device import (
    CPU,
    DeviceError,
    Placement,
    binding_device,
    check_devices,
    keeps_resident,
    resolve_device,
    train_placement,
)
from fed_iotlm.models.training import SplitTensors, TrainConfig, evaluate, train_local
from fed_iotlm.settings import compose

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU path")


# ----------------------------------------------------------------------- resolution


def test_auto_resolves_to_cuda_only_with_a_gpu():
    assert resolve_device("auto", "train.device", gpu=False) == torch.device("cpu")
    assert resolve_device("auto", "train.device", gpu=True) == torch.device("cuda")
    assert resolve_device(None, "train.device", gpu=True) == torch.device("cuda")
    assert resolve_device("cpu", "train.device", gpu=True) == torch.device("cpu")
    assert resolve_device("CUDA", "train.device", gpu=True) == torch.device("cuda")


@needs_no_gpu
def test_default_config_trains_on_the_cpu_here():
    cfg = compose(["experiment=quick"])
    assert cfg["train"]["device"] == "auto" and cfg["binding"]["device"] == "auto"
    assert train_placement(cfg) == CPU
    assert binding_device(cfg) == "cpu"
    assert match_config(compose(["experiment=quick"])).search.device == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:0", "mps", ""])
def test_a_misspelt_device_names_the_key(bad):
    with pytest.raises(DeviceError, match=r"^train\.device=.*expected one of auto, cpu, cuda"):
        resolve_device(bad, "train.device", gpu=True)


def test_cuda_without_a_gpu_is_one_line_naming_the_key():
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda", "binding.device", gpu=False)
    text = str(err.value)
    assert text.startswith("binding.device=cuda: ") and "\n" not in text
    assert "binding.device=auto or binding.device=cpu" in text


@needs_no_gpu
def test_cuda_without_a_gpu_fails_at_start_up(tmp_path):
    """The whole run refuses before any work: nothing under the output directory."""
    from simulations.run import run_experiment

    for method in ("federated", "local", "centralized"):
        cfg = compose(["experiment=quick", f"method={method}", "train.device=cuda"])
        with pytest.raises(DeviceError, match=r"^train\.device=cuda: ") as err:
            run_experiment(cfg, tmp_path / method)
        assert "\n" not in str(err.value)
        assert not (tmp_path / method).exists()
    cfg = compose(["experiment=quick", "binding.device=cuda"])
    with pytest.raises(DeviceError, match=r"^binding\.device=cuda: "):
        run_experiment(cfg, tmp_path / "binding")


def test_simulated_nodes_need_a_gpu_share_for_cuda(monkeypatch):
    """With a GPU, train.device=cuda in a simulation still needs simulation.gpus_per_node."""
    monkeypatch.setattr("fed_iotlm.models.device.gpu_visible", lambda: True)
    cfg = compose(["experiment=quick", "train.device=cuda"])
    with pytest.raises(DeviceError, match=r"simulation\.gpus_per_node=0"):
        check_devices(cfg)
    check_devices(
        compose(["experiment=quick", "train.device=cuda", "simulation.gpus_per_node=0.25"])
    )
    check_devices(compose(["experiment=quick", "train.device=cuda", "method=centralized"]))


def test_mmbind_stays_on_the_cpu(monkeypatch):
    monkeypatch.setattr("fed_iotlm.models.device.gpu_visible", lambda: True)
    assert train_placement(compose(["experiment=quick", "method=mmbind"])) == CPU
    with pytest.raises(DeviceError, match=r"method=mmbind trains on the CPU only"):
        train_placement(compose(["experiment=quick", "method=mmbind", "train.device=cuda"]))


def test_a_ray_worker_without_a_gpu_share_stays_on_the_cpu(monkeypatch):
    """A simulated node with no GPU share must not use a GPU torch can see."""
    monkeypatch.setattr("fed_iotlm.models.device.ray_gpu_share", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "train.device") == torch.device("cpu")
    with pytest.raises(DeviceError, match="holds no GPU share"):
        resolve_device("cuda", "train.device")
    monkeypatch.setattr("fed_iotlm.models.device.ray_gpu_share", lambda: [0])
    assert resolve_device("auto", "train.device") == torch.device("cuda")


def _probe_device() -> tuple[list | None, str]:
    from fed_iotlm.models.device import ray_gpu_share, resolve_device

    return ray_gpu_share(), str(resolve_device("auto", "train.device"))


@pytest.mark.integration
def test_ray_workers_report_their_gpu_share():
    """In a real Ray worker: no share -> [] and the CPU; a (declared) GPU share -> its id.
    The driver is not a worker (None)."""
    import logging

    import ray

    ray.init(
        address="local",
        num_cpus=1,
        num_gpus=1,  # declared only: Ray hands out the id whether or not the GPU exists
        include_dashboard=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    try:
        none = ray.remote(num_cpus=1, num_gpus=0)(_probe_device)
        share = ray.remote(num_cpus=1, num_gpus=0.5)(_probe_device)
        assert ray.get(none.remote()) == ([], "cpu")
        ids, device = ray.get(share.remote())
        assert len(ids) == 1
        assert device == ("cuda" if torch.cuda.is_available() else "cpu")
        assert _probe_device()[0] is None
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ copies, autocast


def test_placement_selects_copies_and_autocast():
    gpu = Placement(torch.device("cuda"))
    assert gpu.autocast_dtype == torch.bfloat16
    assert gpu.copy_kwargs() == {"device": torch.device("cuda"), "non_blocking": True}
    assert CPU.autocast_dtype is None
    assert CPU.copy_kwargs() == {"device": torch.device("cpu"), "non_blocking": False}
    t = torch.randn(3, 2)
    assert CPU.host(t) is t and CPU.to_device(t) is t


def test_small_splits_live_on_the_gpu_large_ones_stream():
    assert keeps_resident(10 * 2**20)
    assert not keeps_resident(10 * 2**30)
    assert keeps_resident(100, budget_bytes=100) and not keeps_resident(101, budget_bytes=100)


def _split(n: int = 64, seed: int = 0) -> SplitTensors:
    g = torch.Generator().manual_seed(seed)
    return SplitTensors(
        x={"imu": torch.randn(n, 8, 3, generator=g)},
        mask={"imu": torch.ones(n, dtype=torch.bool)},
        y={"activity": torch.randint(0, 4, (n,), generator=g)},
    )


def test_cpu_placement_leaves_the_split_as_it_is():
    data = _split()
    placed = data.placed(CPU)
    assert placed.stream_to is None
    assert placed.x["imu"] is data.x["imu"] and placed.y["activity"] is data.y["activity"]


def test_streamed_batches_hold_the_same_rows():
    data = _split()
    streamed = SplitTensors(data.x, data.mask, data.y, stream_to=torch.device("cpu"))
    idx = torch.tensor([5, 0, 63, 5])
    for a, b in zip(data.batch(idx), streamed.batch(idx), strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cpu_training_runs_without_autocast():
    """On the CPU the loop is the plain float32 one: no autocast around the forward."""
    from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel

    spec = ModelSpec(
        modalities={"imu": {"kind": "imu", "feature_shape": [8, 3]}}, tasks={"activity": 4}, dim=16
    )
    torch.manual_seed(0)
    model = MultisensoryModel(spec)
    seen: list[bool] = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    train_local(model, _split(), TrainConfig(epochs=1, batch_size=16))
    evaluate(model, _split(seed=1))
    assert seen and not any(seen)
    assert next(model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------- top-k


def test_chunked_torch_top_k_equals_faiss_exactly():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((300, 16)).astype(np.float32)
    db = rng.standard_normal((2000, 16)).astype(np.float32)
    budget = 4 * 256 * 300  # forces row AND column chunks (and the running merge)
    rows, cols = chunk_shape(len(q), len(db), 5, budget)
    assert cols < len(db) and rows < len(q) and rows * cols * 4 <= budget
    fs, fi = top_k(q, db, 5, SearchConfig(exact_limit=len(db)))  # faiss IndexFlatIP
    cfg = SearchConfig(device="cpu", memory_budget_bytes=budget)
    ts, ti = torch_top_k(normalize(q), normalize(db), 5, cfg)
    np.testing.assert_array_equal(ti, fi)
    np.testing.assert_allclose(ts, fs, rtol=0, atol=1e-5)
    whole = torch_top_k(normalize(q), normalize(db), 5, SearchConfig(device="cpu"))
    np.testing.assert_array_equal(whole[1], fi)


def test_torch_top_k_pads_a_small_database_like_faiss():
    rng = np.random.default_rng(4)
    q, db = rng.standard_normal((7, 4)), rng.standard_normal((3, 4))
    fs, fi = top_k(q, db, 5)
    ts, ti = torch_top_k(normalize(q), normalize(db), 5, SearchConfig(device="cpu"))
    np.testing.assert_array_equal(ti, fi)
    assert (ti[:, 3:] == -1).all() and np.isneginf(ts[:, 3:]).all()


def test_chunk_shape_stays_within_the_budget():
    for n_q, n_db, budget in [(10**6, 10**6, 512 * 2**20), (10**6, 10**6, 4 * 2**30), (5, 7, 4)]:
        rows, cols = chunk_shape(n_q, n_db, 1, budget)
        assert 1 <= rows <= n_q and 1 <= cols <= n_db
        assert rows * cols * 4 <= max(budget, 4)


# -------------------------------------------------------------------- device check


@needs_no_gpu
def test_device_check_fails_fast_without_a_gpu(tmp_path):
    out = tmp_path / "device_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device_check.sh"), "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "device_check: no CUDA GPU" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one line, no traceback
    assert not out.exists() and list(tmp_path.iterdir()) == []
