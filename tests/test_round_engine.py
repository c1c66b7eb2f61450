"""The round engine and its records (no Flower run: the step is the engine's interface).

The integration tests (test_simulation, test_resume, test_secagg_whole_run, ...) run
the real steps on Flower's simulation engine; these pin what the engine itself owes
every step: one frozen record per round, returned and appended, carrying the step's
facts, the binding, the evaluation and the rejoins, and only the latest model.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fed_iotlm.federation.records import numpy_to_record, record_to_numpy
from fed_iotlm.federation.round_record import (
    PRETRAIN,
    TRAIN,
    Participation,
    RoundRecord,
    StepResult,
    communication_totals,
    history_of,
    releases_of,
    results_blocks,
    withheld_by_round,
)
from server.engine import RoundEngine
from server.roster import LiveRoster, Roster


def _arrays(value: float):
    return numpy_to_record({"w": np.full(2, value, np.float32)})


def _adding_step(rnd, arrays, records):
    """Adds 1 to the model; round 2 is skipped (too few answered); says what it saw."""
    seen = float(len(records))
    if rnd == 2:
        return StepResult(None, Participation(3, 1, missing=("node 7",), skipped=True))
    w = record_to_numpy(arrays)["w"] + 1
    return StepResult(
        numpy_to_record({"w": w}),
        Participation(3, 3),
        holders={"fusion": ["0", "1", "2"]},
        stats={"records_seen": seen},
        withheld=(),
        bytes_down=30,
        bytes_up=12,
        messages_down=3,
        messages_up=3,
    )


def test_each_round_returns_a_frozen_record_the_run_keeps():
    records: list[RoundRecord] = []
    seen: list[RoundRecord] = []
    roster = LiveRoster(
        Roster({0: 10}, {0: ["imu"]}, {0: "site"}), 1, identify_timeout_s=1.0, wait_s=1.0
    )

    def evaluate(rnd, arrays):
        if rnd == 3:  # a site rejoined during the round (the roster noted it)
            roster._rejoins.append({"round": 3, "partition": 0, "node": 11, "was": 10})
        return {"accuracy": float(record_to_numpy(arrays)["w"][0]), "loss": 0.5}

    engine = RoundEngine(
        TRAIN,
        _adding_step,
        records,
        evaluate=evaluate,
        before_round=lambda rnd, arrays: {"pairs": rnd} if rnd == 1 else None,
        on_record=seen.append,
        roster=roster,
    )
    final = engine.run(_arrays(0.0), 1, 3)
    assert np.array_equal(record_to_numpy(final)["w"], np.full(2, 2.0))  # round 2 kept it
    assert seen == records and [r.round for r in records] == [1, 2, 3]
    first, skipped, last = records
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.round = 5
    # only the latest record holds a model; the others dropped theirs
    assert first.arrays is None and skipped.arrays is None and last.arrays is final
    assert first.binding == {"pairs": 1} and last.binding is None
    assert [r.stats.get("records_seen") for r in records] == [0.0, None, 2.0]
    assert skipped.participation.skipped and skipped.holders is None
    assert last.rejoins == ({"round": 3, "partition": 0, "node": 11, "was": 10},)
    assert roster.take_rejoins() == []  # handed over once, into round 3's record
    assert history_of(records) == [
        {"round": 1, "accuracy": 1.0, "loss": 0.5, "records_seen": 0.0},
        {"round": 2, "accuracy": 1.0, "loss": 0.5},
        {"round": 3, "accuracy": 2.0, "loss": 0.5, "records_seen": 2.0},
    ]
    blocks = results_blocks(records)
    assert blocks["holders_by_round"] == {
        "1": {"fusion": ["0", "1", "2"]},
        "3": {"fusion": ["0", "1", "2"]},
    }
    assert blocks["faults_by_round"] == {
        "2": {"failed": [], "missing": ["node 7"], "skipped": True}
    }
    assert blocks["rejoined"] == [{"round": 3, "partition": 0, "node": 11, "was": 10}]
    assert withheld_by_round(records) == {"1": [], "3": []}
    assert communication_totals(records) == {
        "bytes_down": 60, "bytes_up": 24, "messages_down": 6, "messages_up": 6
    }  # fmt: skip
    assert all(set(r.timings) == {"bind_s", "step_s", "evaluate_s"} for r in records)


def test_a_resumed_engine_continues_the_list_it_is_given():
    """Two phases share one list; a resumed run hands the engine the records of the
    rounds before the crash (round-tripped through JSON, as the checkpoint does)."""
    records: list[RoundRecord] = []
    RoundEngine(PRETRAIN, _adding_step, records).run(_arrays(0.0), 1, 1)
    RoundEngine(
        TRAIN, _adding_step, records, evaluate=lambda r, a: {"accuracy": 0.0, "loss": 1.0}
    ).run(records[-1].arrays, 1, 1)
    restored = [
        RoundRecord.from_json(d) for d in json.loads(json.dumps([r.to_json() for r in records]))
    ]
    assert restored == records  # arrays are not compared (the checkpoint keeps the last)
    engine = RoundEngine(
        TRAIN, _adding_step, restored, evaluate=lambda r, a: {"accuracy": 0.0, "loss": 1.0}
    )
    record = engine.run_round(3, _arrays(5.0))
    assert record.stats["records_seen"] == 2.0  # the step saw both earlier rounds
    assert [(r.phase, r.round) for r in restored] == [(PRETRAIN, 1), (TRAIN, 1), (TRAIN, 3)]
    assert [h["round"] for h in history_of(restored)] == [1, 3]  # training rounds only


def test_dp_releases_are_read_from_the_records_of_their_phase():
    records = [
        RoundRecord(TRAIN, 1, dp_release={"sigma": 1.0, "q": 0.5, "epsilon": 0.1}),
        RoundRecord(TRAIN, 2),  # skipped: nothing released
        RoundRecord(PRETRAIN, 1, dp_release={"sigma": 9.0, "q": 1.0}),
        RoundRecord(TRAIN, 3, dp_release={"sigma": 1.0, "q": 1.0}),
    ]
    assert releases_of(records) == {1: {"sigma": 1.0, "q": 0.5}, 3: {"sigma": 1.0, "q": 1.0}}


def test_a_record_with_an_unknown_key_is_refused_by_name():
    doc = RoundRecord(TRAIN, 1).to_json()
    with pytest.raises(ValueError, match="unknown keys \\['surprise'\\]"):
        RoundRecord.from_json({**doc, "surprise": 1})
