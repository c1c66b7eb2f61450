"""simulations/dp_study.py: σ for a target ε by the project's accountant, the table and
its caption from results.json files, and the order of runs (C fixed before any DP run).
No federation runs here: ``run_one`` is replaced where the study would start one."""

from __future__ import annotations

import json

import pytest

from fed_iotlm import cli
from fed_iotlm.federation.privacy import epsilon_after
from simulations import dp_study, study_runner

V1 = {"commit": "aaaa111", "dirty": False}


@pytest.mark.parametrize(
    ("epsilon", "q", "rounds", "delta"),
    [(8.0, 0.1, 30, 1e-6), (2.0, 0.2, 3, 1e-5), (4.0, 1.0, 12, 1e-5)],
)
def test_the_accountant_at_the_returned_sigma_gives_the_target_epsilon_within_1pc(
    epsilon, q, rounds, delta
):
    sigma = dp_study.sigma_for_epsilon(epsilon, q, rounds, delta)
    reached = epsilon_after([(sigma, q)] * rounds, delta)
    assert 0.99 * epsilon <= reached <= epsilon  # never more than the target


def test_less_epsilon_needs_more_noise_and_fewer_rounds_less():
    base = dp_study.sigma_for_epsilon(8.0, 0.1, 30, 1e-6)
    assert dp_study.sigma_for_epsilon(2.0, 0.1, 30, 1e-6) > base
    assert dp_study.sigma_for_epsilon(8.0, 0.1, 10, 1e-6) < base


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"epsilon": 0.0}, "epsilon"), ({"q": 1.5}, "q must"), ({"rounds": 0}, "rounds")],
)
def test_bad_targets_are_refused_by_name(kwargs, word):
    args = {"epsilon": 8.0, "q": 0.1, "rounds": 30, "delta": 1e-6, **kwargs}
    with pytest.raises(ValueError, match=word):
        dp_study.sigma_for_epsilon(**args)


def test_default_delta_is_below_one_over_n_squared_and_at_most_1e_5():
    assert dp_study.default_delta(1000) == pytest.approx(1e-6)
    assert dp_study.default_delta(100) == pytest.approx(1e-5)


@pytest.mark.parametrize(("nodes", "per_round"), [(1000, 100), (200, 40), (22, 15), (1000, 7)])
def test_flwr_samples_exactly_m_nodes_under_the_designs_overrides(nodes, per_round):
    over = dict(o.split("=", 1) for o in dp_study.Design(nodes, per_round, 3, 1e-6).overrides())
    # flwr's FedAvg samples max(int(fraction_train * N), min_train_nodes) of N nodes
    sampled = max(
        int(float(over["strategy.fraction_train"]) * nodes), int(over["strategy.min_nodes"])
    )
    assert sampled == per_round
    assert int(over["data.num_train"]) == 10 * nodes and over["partition.num_nodes"] == str(nodes)
    assert over["train.epochs"] == "5" and over["rounds"] == "3"  # every row, DP or not


def fake_results(seed, *, test, val, version=V1, privacy=None, norms=(0.5, 0.7, 0.9)):
    history = [{"round": r + 1, "update_norm_median": n, "nodes_sent": 40.0}
               for r, n in enumerate(norms)]  # fmt: skip
    res = {"seed": seed, "num_nodes": 200, "rounds": len(norms), "wall_s": 60.0,
           "test": {"accuracy": test}, "val": {"accuracy": val}, "history": history,
           "code_version": version}  # fmt: skip
    if privacy is not None:
        res["privacy"] = privacy
    return res


def dp_block(epsilon, sigma=0.91, clip=0.7):
    return {"epsilon": epsilon, "noise_multiplier": sigma, "clipping_norm": clip, "delta": 1e-5,
            "sample_rate_by_round": {"1": 0.2, "2": 0.2, "3": 0.2}}  # fmt: skip


def test_table_from_results_files_quotes_what_the_runs_report(tmp_path):
    runs = [
        (dp_study.NON_PRIVATE, None, fake_results(0, test=0.80, val=0.78)),
        (dp_study.NON_PRIVATE, None, fake_results(1, test=0.84, val=0.80)),
        ("ε = 8", 8.0, fake_results(0, test=0.70, val=0.69, privacy=dp_block(7.95))),
        ("ε = 8", 8.0, fake_results(1, test=0.72, val=0.70, privacy=dp_block(7.97))),
        ("ε = 2", 2.0, fake_results(0, test=0.30, val=0.31, privacy=dp_block(1.99, sigma=2.5))),
    ]
    rows = []
    for i, (setting, target, res) in enumerate(runs):
        path = tmp_path / f"r{i}" / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(res))
        rows.append(dp_study.row_of(json.loads(path.read_text()), setting, target))
    design = dp_study.Design(200, 40, 3, 1e-5)
    caption = dp_study.caption_of(design, "0.7, given", [0, 1], ["model.dim=32"], "python -m x --y")
    md = dp_study.table(rows, caption)
    lines = md.splitlines()
    body = [ln for ln in lines if ln.startswith("| ")][1:]
    assert [ln.split(" | ")[0] for ln in body] == ["| non-private", "| ε = 8", "| ε = 2"]
    eps8 = body[1].split(" | ")
    assert eps8[1] == "2" and eps8[2].startswith("0.710 ± 0.010 [")
    assert eps8[3] == "-11.0"  # (0.71 - 0.82) · 100 points
    assert eps8[5] == "7.97"  # reached (the worst seed), not the 8 asked for
    assert eps8[6:10] == ["0.91", "0.7", "0.2", "3 |"]
    assert body[0].split(" | ")[5] == "–"  # DP off: no ε
    assert "At ε = 8 test accuracy is 11.0 points below non-private (NOT within 5)" in lines[0]
    assert "Code version `aaaa111`" in lines[0] and "`python -m x --y`" in lines[0]
    assert "N = 200" in lines[0] and "m = 40" in lines[0] and "`model.dim=32`" in lines[0]


def test_table_refuses_runs_of_two_code_versions():
    rows = [
        dp_study.row_of(fake_results(0, test=0.8, val=0.8), dp_study.NON_PRIVATE, None),
        dp_study.row_of(
            fake_results(0, test=0.7, val=0.7, privacy=dp_block(8.0),
                         version={"commit": "bbbb222", "dirty": False}),
            "ε = 8", 8.0,
        ),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="mix results of 2 code versions"):
        dp_study.table(rows, "{version}")


def test_clip_is_the_median_of_the_per_round_median_update_norms():
    assert (
        dp_study.clip_from_update_norms(fake_results(0, test=0, val=0, norms=(3, 0.4, 1.1))) == 1.1
    )
    with pytest.raises(ValueError, match="update_norm_median"):
        dp_study.clip_from_update_norms({"history": [{"round": 1}]})


def test_the_study_fixes_c_from_the_non_private_run_before_any_dp_run(monkeypatch, tmp_path):
    calls = []

    def fake_run_one(out, overrides, *, experiment, mlflow_experiment):
        over = dict(o.split("=", 1) for o in overrides)
        calls.append(over)
        seed = int(over["seed"])
        if over.get("dp.enabled") != "true":
            return fake_results(seed, test=0.8, val=0.8, norms=(0.2, 0.6, 3.0))
        sigma = float(over["dp.noise_multiplier"])
        return fake_results(seed, test=0.7, val=0.7,
                            privacy=dp_block(7.99, sigma=sigma, clip=float(over["dp.clipping_norm"])))  # fmt: skip

    monkeypatch.setattr(study_runner, "run_one", fake_run_one)
    doc = tmp_path / "dp.md"
    argv = ["--nodes", "200", "--per-round", "40", "--rounds", "3", "--epsilons", "8",
            "--seeds", "0,1", "--out", str(tmp_path / "runs"), "--doc", str(doc)]  # fmt: skip
    assert dp_study.main(argv) == 0
    assert [c.get("dp.enabled", "false") for c in calls] == ["false", "false", "true", "true"]
    assert {c["dp.clipping_norm"] for c in calls[2:]} == {"0.6"}  # median of 0.2, 0.6, 3.0
    assert {c["dp.delta"] for c in calls[2:]} == {"1e-05"}  # min(1/200², 1e-5)
    sigma = float(calls[2]["dp.noise_multiplier"])
    assert 0.99 * 8 <= epsilon_after([(sigma, 0.2)] * 3, 1e-5) <= 8
    text = doc.read_text()
    assert "| ε = 8 | 2 |" in text and "median over rounds" in text
    assert "--epsilons 8" in text


def test_plan_prints_sigma_and_runs_nothing(monkeypatch, capsys, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("--plan started a run")

    monkeypatch.setattr(study_runner, "run_one", refuse)
    argv = ["--plan", "--nodes", "200", "--per-round", "40", "--rounds", "3", "--epsilons", "8,2",
            "--clip-only", "--doc", str(tmp_path / "dp.md")]  # fmt: skip
    assert dp_study.main(argv) == 0
    out = capsys.readouterr().out
    assert "q=0.2" in out and "ε = 8: sigma=" in out and "ε = 2: sigma=" in out
    assert "runs: 12" in out  # (non-private + clip-only + 2 ε) × 3 seeds
    assert not (tmp_path / "dp.md").exists()


def test_help_through_fed_iotlm_study_dp(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["study", "dp", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fed-iotlm study dp ")
    assert "--epsilons" in out and "--per-round" in out and "--clip" in out


def test_a_bad_design_is_one_line_naming_the_option(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["study", "dp", "--nodes", "100", "--per-round", "200", "--plan"])
    assert stop.value.code == 2
    assert "--per-round must be in [1, --nodes=100], got 200" in capsys.readouterr().err


def test_a_dp_row_above_or_within_5_points_of_non_private_is_called_within():
    rows = [
        dp_study.row_of(fake_results(0, test=0.80, val=0.8), dp_study.NON_PRIVATE, None),
        dp_study.row_of(fake_results(0, test=0.81, val=0.8, privacy=dp_block(8.0)), "ε = 8", 8.0),
        dp_study.row_of(fake_results(0, test=0.76, val=0.8, privacy=dp_block(4.0)), "ε = 4", 4.0),
        dp_study.row_of(fake_results(0, test=0.73, val=0.8, privacy=dp_block(2.0)), "ε = 2", 2.0),
    ]
    md = dp_study.table(rows, "{version}")
    assert "ε = 8 test accuracy is 1.0 points above non-private (within 5)" in md
    assert "at ε = 4 test accuracy is 4.0 points below non-private (within 5)" in md
    assert "at ε = 2 test accuracy is 7.0 points below non-private (NOT within 5)" in md
    assert "| ε = 8 | 1 | 0.810 ± 0.000 [0.810, 0.810] | +1.0 |" in md
