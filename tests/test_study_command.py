"""``fed-iotlm study NAME [ARGS]``: a name reaches its module's own parser with the rest
of the command line; nothing here runs a study (every call stops in argparse)."""

from __future__ import annotations

import importlib

import pytest

from fed_iotlm import cli, extras
from fed_iotlm.commands import study


@pytest.mark.parametrize("name", list(study.STUDIES))
def test_help_of_each_study_is_its_own_parser_under_the_verb(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["study", name, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fed-iotlm study {name} ")
    assert "--out" in out or "--data" in out  # an option only the study's parser has


def test_a_bad_flag_is_refused_by_the_study_naming_it(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["study", "budget", "--labels", "0.3", "--no-such-flag", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "fed-iotlm study budget: error: unrecognized arguments: --no-such-flag 1" in err


def test_the_rest_of_the_line_reaches_main_unchanged(monkeypatch):
    seen = {}
    module = importlib.import_module("simulations.byzantine_study")
    monkeypatch.setattr(module, "main", lambda argv, prog: seen.update(argv=argv, prog=prog))
    argv = ["--seeds", "1", "--extra", "rounds=2 seed=3", "--rules", "mean"]
    assert cli.main(["study", "byzantine", *argv]) == 0
    assert seen == {"argv": argv, "prog": "fed-iotlm study byzantine"}


def test_an_unknown_study_is_one_line_and_exit_2(capsys):
    assert cli.main(["study", "nope", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "fed-iotlm study: error: unknown study 'nope'; "
        "choose from mmbind, budget, byzantine, shift, realdata, fedlora, dp"
    )


def test_a_missing_study_name_is_one_line_and_exit_2(capsys):
    assert cli.main(["study"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fed-iotlm study: error: no study named; choose from mmbind,")
    assert "\n" not in err


def test_study_help_lists_every_study_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["study", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name, entry in study.STUDIES.items():
        assert f"  {name} " in out and entry.summary in out


def test_a_study_needing_a_missing_extra_says_which(monkeypatch, capsys):
    real = extras.has
    monkeypatch.setattr(study, "has", lambda m: m != "mlflow" and real(m))
    assert cli.main(["study", "shift", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fed-iotlm study shift needs mlflow" in err and "fed-iotlm[study]" in err
