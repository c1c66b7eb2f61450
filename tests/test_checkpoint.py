"""Server checkpoint files, RNG and strategy state, and the resume checks (no Flower run)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fed_iotlm.federation.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fed_iotlm.federation.records import numpy_to_record
from fed_iotlm.federation.strategy import build_strategy
from fed_iotlm.federation.strategy_state import capture_strategy, restore_strategy
from server.resume import TRAIN, ServerCheckpointer


def _ckpt(rnd: int, value: float) -> Checkpoint:
    return Checkpoint(
        round=rnd,
        phase=TRAIN,
        sections={
            "arrays": {"enc.imu.w": np.full((2, 3), value, np.float32)},
            "optimizer.m_t": {"enc.imu.w": np.zeros((2, 3), np.float32)},
            "empty": {},
        },
        meta={"history": [{"round": rnd, "accuracy": 0.5}], "nan": float("nan")},
    )


def test_round_trip_keeps_only_the_latest_round(tmp_path):
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, _ckpt(1, 1.0))
    save_checkpoint(tmp_path, _ckpt(2, 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-train-00002.safetensors",
        "state.json",
    ]
    got = load_checkpoint(tmp_path)
    assert (got.round, got.phase) == (2, TRAIN)
    assert np.array_equal(got.sections["arrays"]["enc.imu.w"], np.full((2, 3), 2.0))
    assert got.sections["empty"] == {}
    assert got.meta["history"] == [{"round": 2, "accuracy": 0.5}]


def test_each_section_comes_back_in_the_order_it_was_saved(tmp_path):
    # safetensors sorts keys; a model's key order decides its packed layout (and so the
    # order of float sums), so a resumed run needs the saved order, not the sorted one
    keys = ["head.z", "enc.b", "fusion.a", "enc.a"]
    arrays = {k: np.full(2, i, np.float32) for i, k in enumerate(keys)}
    save_checkpoint(tmp_path, Checkpoint(1, TRAIN, {"arrays": arrays}))
    got = load_checkpoint(tmp_path).sections["arrays"]
    assert list(got) == keys
    assert all(np.array_equal(got[k], arrays[k]) for k in keys)


def test_a_tensors_file_that_does_not_match_is_refused(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1, 1.0))
    state = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / state["tensors"]).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path)
    (tmp_path / state["tensors"]).unlink()
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_rng_states_come_back():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    meta, arrays = capture_rng()
    meta = json.loads(json.dumps(meta))  # as stored
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(meta, arrays)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_fedadam_moments_and_bookkeeping_come_back():
    cfg = {"name": "fedadam"}
    a = build_strategy("federated", cfg, 3)
    a.m_t = {"w": np.arange(3, dtype=np.float32)}
    a.v_t = {"w": np.ones(3, dtype=np.float32)}
    a.round_holders = {1: {"enc.imu": ["0", "1"]}}
    a.comm["bytes_up"] = 123
    meta, sections = capture_strategy(a)
    meta = json.loads(json.dumps(meta))
    b = build_strategy("federated", cfg, 3)
    restore_strategy(b, meta, sections)
    assert np.array_equal(b.m_t["w"], a.m_t["w"]) and np.array_equal(b.v_t["w"], a.v_t["w"])
    assert b.round_holders == {1: {"enc.imu": ["0", "1"]}} and b.comm["bytes_up"] == 123
    # a strategy before its first round has no moments, and restores to none
    c = build_strategy("federated", cfg, 3)
    restore_strategy(c, *capture_strategy(build_strategy("federated", cfg, 3)))
    assert c.m_t is None and c.v_t is None


class _Recorder:
    def __init__(self) -> None:
        self.history: list = []
        self.extra: dict = {}


def _cfg(**over):
    base = {
        "method": "federated",
        "seed": 0,
        "rounds": 3,
        "resume": True,
        "output_dir": "x",
        "strategy": {"name": "fedadam"},
        "train": {"epochs": 1},
    }
    return {**base, **over}


def test_checkpointer_saves_and_resumes(tmp_path):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    strategy.m_t = {"w": np.ones(2, np.float32)}
    rec = _Recorder()
    rec.history.append({"round": 1, "accuracy": 0.25, "loss": 1.0})
    rec.extra["binding"] = {"1": {"pairs": 3}}
    saver = ServerCheckpointer(_cfg(resume=False), tmp_path, strategy, rec)
    saver.partners = {"0": numpy_to_record({"imu.ids": np.arange(3)})}
    saver.save(TRAIN, 1, numpy_to_record({"w": np.full(2, 7.0, np.float32)}))
    assert ServerCheckpointer(_cfg(resume=False), tmp_path, strategy, _Recorder()).restore() is None

    fresh, rec2 = build_strategy("federated", {"name": "fedadam"}, 3), _Recorder()
    point = ServerCheckpointer(_cfg(rounds=5), tmp_path, fresh, rec2).restore()
    assert (point.phase, point.round, point.next_round(TRAIN, 5)) == (TRAIN, 1, 2)
    assert np.array_equal(point.arrays["w"].numpy(), np.full(2, 7.0))
    assert np.array_equal(fresh.m_t["w"], np.ones(2))
    assert rec2.history == rec.history and rec2.extra == rec.extra
    assert np.array_equal(point.partners["0"]["imu.ids"].numpy(), np.arange(3))


@pytest.mark.parametrize(
    "over, message",
    [
        ({"seed": 1}, "seed differ"),
        ({"train": {"epochs": 2}}, "train.epochs differ"),
        ({"method": "fedavg"}, "method=federated"),
        ({"rounds": 0}, "beyond rounds=0"),
    ],
)
def test_resume_refuses_another_experiment(tmp_path, over, message):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    ServerCheckpointer(_cfg(), tmp_path, strategy, _Recorder()).save(
        TRAIN, 1, numpy_to_record({"w": np.zeros(1, np.float32)})
    )
    with pytest.raises(CheckpointError, match=message):
        ServerCheckpointer(_cfg(**over), tmp_path, strategy, _Recorder()).restore()


def test_resume_without_a_checkpoint_starts_at_round_one(tmp_path):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    assert ServerCheckpointer(_cfg(), tmp_path, strategy, _Recorder()).restore() is None


def test_a_resumed_run_may_change_its_deadlines_but_not_its_rule(tmp_path):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    first = {"name": "fedadam", "round_timeout_s": 600, "wait_for_nodes_s": 120}
    ServerCheckpointer(_cfg(strategy=first), tmp_path, strategy, _Recorder()).save(
        TRAIN, 1, numpy_to_record({"w": np.zeros(1, np.float32)})
    )
    longer = {**first, "round_timeout_s": 1800, "wait_for_nodes_s": 600}
    assert ServerCheckpointer(_cfg(strategy=longer), tmp_path, strategy, _Recorder()).restore()
    with pytest.raises(CheckpointError, match="strategy.name differ"):
        other = {**longer, "name": "fedavg"}
        ServerCheckpointer(_cfg(strategy=other), tmp_path, strategy, _Recorder()).restore()


def test_rejoins_before_the_checkpoint_survive_a_resume(tmp_path):
    """A site that rejoined before the crash is still in results.json's ``rejoined``
    after resuming, ahead of the rejoins of the resumed run itself."""
    from server.membership import LiveRoster
    from server.rounds import Roster

    def live() -> LiveRoster:
        roster = Roster({0: 10, 1: 11}, {0: ["imu"], 1: ["audio"]}, {0: "site", 1: "site"})
        return LiveRoster(roster, 2, identify_timeout_s=1.0, wait_s=1.0)

    strategy = build_strategy("federated", {"name": "fedadam"}, 2)
    before = live()
    before.rejoined.append({"round": 2, "partition": 1, "node": 21, "was": 11})
    saver = ServerCheckpointer(_cfg(resume=False), tmp_path, strategy, _Recorder(), before)
    saver.save(TRAIN, 2, numpy_to_record({"w": np.zeros(2, np.float32)}))

    after = live()
    after.rejoined.append({"round": 3, "partition": 0, "node": 30, "was": 10})
    fresh = build_strategy("federated", {"name": "fedadam"}, 2)
    ServerCheckpointer(_cfg(rounds=5), tmp_path, fresh, _Recorder(), after).restore()
    assert after.rejoined == [
        {"round": 2, "partition": 1, "node": 21, "was": 11},
        {"round": 3, "partition": 0, "node": 30, "was": 10},
    ]
