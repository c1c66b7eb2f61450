"""Server checkpoint and ``resume=true`` in a real Flower simulation (Ray backend).

An uninterrupted run of N rounds and a run stopped after round 1 then resumed to N
must end with the same global parameters (bit for bit: clients seed local training from
(round, partition id), the server aggregates in partition order and restores FedAdam's
moments and its RNG states) and the same per-round history.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fed_iotlm.federation.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
)
from simulations.run import run_experiment
from tests.client_mods import round_marker, rounds_run

NODES = 3
# FedAdam: one round after the resume point uses the restored moments and RNG states
FEDADAM_ROUNDS = 2
# MMBind (rebind_every=2): round 2 gets round 1's partners back, round 3 binds again
MMBIND_ROUNDS = 3


def _marked_run(cfg: dict, run_dir: Path, markers: Path) -> dict[str, list[tuple[int, int]]]:
    """Run ``cfg`` and return which rounds each node ran (message type -> pairs)."""
    markers.mkdir()
    run_experiment(cfg, run_dir, [round_marker(markers)])
    return {kind: ran for kind, ran in rounds_run(markers).items() if kind != "evaluate"}


def _each_node(rounds) -> list[tuple[int, int]]:
    return sorted((r, p) for r in rounds for p in range(NODES))


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "bundle" / "model.safetensors"))


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["history"]


def _assert_same_run(a: Path, b: Path, rounds: int) -> None:
    fa, fb = _final(a), _final(b)
    assert fa.keys() == fb.keys()
    worst = max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)
    assert worst == 0.0, f"final parameters differ by up to {worst}"
    ha, hb = _history(a), _history(b)
    assert [h["round"] for h in hb] == list(range(1, rounds + 1))
    assert ha == hb
    # every round really aggregated (a round that drops all updates would hide a lost
    # optimiser state) and the model moved
    assert all(h.get("rejected_updates", 0) == 0 for h in ha), ha
    assert len({h["loss"] for h in ha}) == rounds, ha


@pytest.mark.integration
def test_fedadam_resumed_run_ends_like_an_uninterrupted_one(quick_cfg, tmp_path):
    common = ("strategy=fedadam", "mlflow.enabled=false", "train.epochs=1")
    full, parted = tmp_path / "full", tmp_path / "parted"
    run_experiment(quick_cfg(*common, f"rounds={FEDADAM_ROUNDS}"), full)

    # stopped after round 1: its checkpoint holds round 1 and FedAdam's moments
    ran = _marked_run(quick_cfg(*common, "rounds=1"), parted, tmp_path / "ran-1")
    assert ran == {"train": _each_node([1])}
    ckpt = load_checkpoint(checkpoint_dir(parted))
    assert ckpt is not None and (ckpt.phase, ckpt.round) == ("train", 1)
    assert {"optimizer.m_t", "optimizer.v_t", "arrays", "rng"} <= set(ckpt.sections)
    assert sorted(p.name for p in checkpoint_dir(parted).iterdir()) == [
        "round-train-00001.safetensors",
        "state.json",
    ]

    cfg = quick_cfg(*common, f"rounds={FEDADAM_ROUNDS}", "resume=true")
    ran = _marked_run(cfg, parted, tmp_path / "ran-2")
    assert ran == {"train": _each_node(range(2, FEDADAM_ROUNDS + 1))}, "round 1 ran again"
    _assert_same_run(full, parted, FEDADAM_ROUNDS)
    assert load_checkpoint(checkpoint_dir(parted)).round == FEDADAM_ROUNDS


@pytest.mark.integration
def test_mmbind_resume_redelivers_partners_between_bindings(quick_cfg, tmp_path):
    common = (
        "method=mmbind", "partition.shared=imu", "mlflow.enabled=false", "train.epochs=1",
        "partition.plan=[[imu,audio],[imu,depth],[imu,thermal]]",
        "binding.pretrain_rounds=1", "binding.pretrain_epochs=1", "binding.rebind_every=2",
    )  # fmt: skip
    full, parted = tmp_path / "full", tmp_path / "parted"
    run_experiment(quick_cfg(*common, f"rounds={MMBIND_ROUNDS}"), full)
    ran = _marked_run(quick_cfg(*common, "rounds=1"), parted, tmp_path / "ran-1")
    assert ran == {
        "train.pretrain": _each_node([1]),
        "query.embed": _each_node([1]),
        "train": _each_node([1]),
    }
    ckpt = load_checkpoint(checkpoint_dir(parted))
    assert {f"partners.{i}" for i in range(3)} <= set(ckpt.sections)

    # round 2 is not a binding round: the nodes get round 1's partners back; neither
    # the shared-modality round nor round 1's binding or training runs again
    cfg = quick_cfg(*common, f"rounds={MMBIND_ROUNDS}", "resume=true")
    ran = _marked_run(cfg, parted, tmp_path / "ran-2")
    assert ran == {"query.embed": _each_node([3]), "train": _each_node(range(2, MMBIND_ROUNDS + 1))}
    _assert_same_run(full, parted, MMBIND_ROUNDS)
    res = json.loads((parted / "results.json").read_text())
    assert {r for r in res["binding"] if r.isdigit()} == {"1", "3"}
