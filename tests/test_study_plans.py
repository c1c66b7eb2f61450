"""The MMBind study's incompleteness plans."""

from __future__ import annotations

import pytest

from simulations.mmbind_study import incompleteness_plan, sweep_points


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.75])
def test_each_non_shared_modality_is_missing_on_the_stated_share_of_nodes(rate):
    plan = incompleteness_plan(rate)
    assert len(plan) == 8 and all("imu" in p for p in plan)
    for m in ("audio", "depth"):
        assert sum(m not in p for p in plan) == round(rate * 8)


def test_at_half_audio_and_depth_never_meet():
    plan = incompleteness_plan(0.5)
    assert not any("audio" in p and "depth" in p for p in plan)
    assert sum("audio" in p for p in plan) == 4 and sum("depth" in p for p in plan) == 4


def test_sweeps_name_their_points():
    assert [label for label, _ in sweep_points("labels")] == [
        "100% labels",
        "30% labels",
        "10% labels",
    ]
    with pytest.raises(ValueError):
        sweep_points("nope")
