"""Study tables: one code version per table, runs cached per version, intervals over seeds."""

from __future__ import annotations

import pytest

from simulations.budget_study import choose_on_val
from simulations.study_runner import fmt_mean_ci, mean_ci95, one_code_version, point_key


def _res(commit: str, dirty: bool = False) -> dict:
    return {"code_version": {"commit": commit, "dirty": dirty}}


def test_a_table_refuses_to_mix_code_versions():
    assert one_code_version([_res("abc"), _res("abc")]) == "abc"
    with pytest.raises(ValueError, match="2 code versions"):
        one_code_version([_res("abc"), _res("def")])
    with pytest.raises(ValueError, match="code versions"):
        one_code_version([_res("abc"), _res("abc", dirty=True)])


def test_the_run_cache_is_keyed_on_the_code_version():
    overrides = ["method=federated", "seed=0"]
    assert point_key(overrides, "v1") == point_key(list(reversed(overrides)), "v1")
    assert point_key(overrides, "v1") != point_key(overrides, "v2")


def test_interval_over_seeds():
    mean, half = mean_ci95([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9)
    assert half == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-3)  # t(0.975, 2) = 4.303
    assert mean_ci95([0.5]) == (0.5, 0.0)
    assert fmt_mean_ci([0.8, 0.9, 1.0]).startswith("0.900 ± 0.082 [")


def test_the_budget_is_chosen_on_validation_only():
    runs = {
        (10, 0.0): {"val": {"accuracy": 0.7}, "test": {"accuracy": 0.99}},
        (40, 0.0): {"val": {"accuracy": 0.8}, "test": {"accuracy": 0.10}},
    }
    assert choose_on_val(runs) == (40, 0.0)  # test says otherwise; it is never read
    tie = {(10, 0.0): {"val": {"accuracy": 0.8}}, (40, 0.0): {"val": {"accuracy": 0.8}}}
    assert choose_on_val(tie) == (10, 0.0)  # ties: the smaller budget
