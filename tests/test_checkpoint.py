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
from fed_iotlm.federation.round_record import (
    TRAIN,
    Participation,
    RoundRecord,
    history_of,
    results_blocks,
)
from fed_iotlm.federation.strategy import build_strategy
from fed_iotlm.federation.strategy_state import capture_strategy, restore_strategy
from server.resume import ServerCheckpointer
from server.roster import LiveRoster, Roster


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


def test_fedadam_moments_come_back_and_nothing_else_is_kept():
    cfg = {"name": "fedadam"}
    a = build_strategy("federated", cfg, 3)
    a.m_t = {"w": np.arange(3, dtype=np.float32)}
    a.v_t = {"w": np.ones(3, dtype=np.float32)}
    meta, sections = capture_strategy(a)
    meta = json.loads(json.dumps(meta))
    assert set(meta) == {"optimizer_lists"}  # no per-round bookkeeping on a strategy
    b = build_strategy("federated", cfg, 3)
    restore_strategy(b, meta, sections)
    assert np.array_equal(b.m_t["w"], a.m_t["w"]) and np.array_equal(b.v_t["w"], a.v_t["w"])
    # a strategy before its first round has no moments, and restores to none
    c = build_strategy("federated", cfg, 3)
    restore_strategy(c, *capture_strategy(build_strategy("federated", cfg, 3)))
    assert c.m_t is None and c.v_t is None


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


def _record(rnd: int, value: float = 0.0, **fields) -> RoundRecord:
    arrays = numpy_to_record({"w": np.full(2, value, np.float32)})
    return RoundRecord(TRAIN, rnd, arrays=arrays, **fields)


def test_checkpointer_saves_and_resumes(tmp_path):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    strategy.m_t = {"w": np.ones(2, np.float32)}
    first = _record(
        1,
        7.0,
        participation=Participation(3, 2, ("partition 2 (node 9): boom",)),
        holders={"enc.imu": ["0", "1"]},
        rejections=("node 2 rejected (norm)",),
        stats={"accepted_updates": 2.0, "dp.epsilon": 0.5},
        dp_release={"sigma": 1.0, "q": 1.0},
        binding={"pairs": 3, "pair_accuracy": {"har": 0.5}},
        rejoins=({"round": 1, "partition": 1, "node": 21, "was": 11},),
        bytes_down=10,
        bytes_up=20,
        messages_down=3,
        messages_up=2,
        timings={"step_s": 0.25},
        metrics={"accuracy": 0.25, "loss": 1.0, "val_accuracy": 0.5},
    )
    saver = ServerCheckpointer(_cfg(resume=False), tmp_path, strategy)
    saver.partners = {"0": numpy_to_record({"imu.ids": np.arange(3)})}
    saver.save([first])
    assert ServerCheckpointer(_cfg(resume=False), tmp_path, strategy).restore() is None

    fresh = build_strategy("federated", {"name": "fedadam"}, 3)
    point = ServerCheckpointer(_cfg(rounds=5), tmp_path, fresh).restore()
    assert (point.phase, point.round, point.next_round(TRAIN, 5)) == (TRAIN, 1, 2)
    assert np.array_equal(point.arrays["w"].numpy(), np.full(2, 7.0))
    assert np.array_equal(fresh.m_t["w"], np.ones(2))
    assert point.records == [first]  # every field, through JSON (arrays aside)
    assert np.array_equal(point.records[0].arrays["w"].numpy(), np.full(2, 7.0))
    assert history_of(point.records) == [
        {"round": 1, "accuracy": 0.25, "loss": 1.0, "accepted_updates": 2.0,
         "dp.epsilon": 0.5, "val_accuracy": 0.5}
    ]  # fmt: skip
    assert np.array_equal(point.partners["0"]["imu.ids"].numpy(), np.arange(3))


def test_a_record_without_its_model_is_not_checkpointed(tmp_path):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    with pytest.raises(ValueError, match="train round 2: its record holds no model"):
        ServerCheckpointer(_cfg(), tmp_path, strategy).save([RoundRecord(TRAIN, 2)])


def test_a_checkpoint_without_round_records_is_refused(tmp_path):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    ServerCheckpointer(_cfg(), tmp_path, strategy).save([_record(1)])
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    del ckpt.meta["records"]  # as an older version wrote it
    save_checkpoint(tmp_path / "checkpoint", ckpt)
    with pytest.raises(CheckpointError, match="older version"):
        ServerCheckpointer(_cfg(), tmp_path, strategy).restore()
    ckpt.meta["records"] = [_record(2).to_json()]  # records of another round
    save_checkpoint(tmp_path / "checkpoint", ckpt)
    with pytest.raises(CheckpointError, match="records end at train round 2, the checkpoint"):
        ServerCheckpointer(_cfg(), tmp_path, strategy).restore()


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
    ServerCheckpointer(_cfg(), tmp_path, strategy).save([_record(1)])
    with pytest.raises(CheckpointError, match=message):
        ServerCheckpointer(_cfg(**over), tmp_path, strategy).restore()


def test_resume_without_a_checkpoint_starts_at_round_one(tmp_path):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    assert ServerCheckpointer(_cfg(), tmp_path, strategy).restore() is None


def test_a_resumed_run_may_change_its_deadlines_but_not_its_rule(tmp_path):
    strategy = build_strategy("federated", {"name": "fedadam"}, 3)
    first = {"name": "fedadam", "round_timeout_s": 600, "wait_for_nodes_s": 120}
    ServerCheckpointer(_cfg(strategy=first), tmp_path, strategy).save([_record(1)])
    longer = {**first, "round_timeout_s": 1800, "wait_for_nodes_s": 600}
    assert ServerCheckpointer(_cfg(strategy=longer), tmp_path, strategy).restore()
    with pytest.raises(CheckpointError, match="strategy.name differ"):
        other = {**longer, "name": "fedavg"}
        ServerCheckpointer(_cfg(strategy=other), tmp_path, strategy).restore()


def test_rejoins_before_the_checkpoint_survive_a_resume(tmp_path):
    """A site that rejoined before the crash is still in results.json's ``rejoined``
    after resuming, ahead of the rejoins of the resumed run itself: rejoins live in
    the round records, which the checkpoint carries."""
    strategy = build_strategy("federated", {"name": "fedadam"}, 2)
    before = [
        _record(1),
        _record(2, rejoins=({"round": 2, "partition": 1, "node": 21, "was": 11},)),
    ]
    ServerCheckpointer(_cfg(resume=False), tmp_path, strategy).save(before)
    fresh = build_strategy("federated", {"name": "fedadam"}, 2)
    records = ServerCheckpointer(_cfg(rounds=5), tmp_path, fresh).restore().records
    records.append(_record(3, rejoins=({"round": 3, "partition": 0, "node": 30, "was": 10},)))
    assert results_blocks(records)["rejoined"] == [
        {"round": 2, "partition": 1, "node": 21, "was": 11},
        {"round": 3, "partition": 0, "node": 30, "was": 10},
    ]


def test_roster_hands_each_rejoin_over_once():
    """The roster keeps no run-long list: the engine takes the rejoins into the record
    of the round they happened in."""
    roster = Roster({0: 10, 1: 11}, {0: ["imu"], 1: ["audio"]}, {0: "site", 1: "site"})
    live = LiveRoster(roster, 2, identify_timeout_s=1.0, wait_s=1.0)
    live._rejoins.append({"round": 2, "partition": 1, "node": 21, "was": 11})
    assert live.take_rejoins() == [{"round": 2, "partition": 1, "node": 21, "was": 11}]
    assert live.take_rejoins() == []
