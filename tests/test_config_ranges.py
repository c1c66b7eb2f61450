"""An out-of-range value (no rounds, no nodes, no training, a share outside [0, 1], a
learning rate <= 0) and a dataset path the chosen data source would ignore are refused
when the config is loaded: ``fed-iotlm run`` ends with one line naming the key and
what it accepts, exit status 2, before any federation starts and without a folder."""

from __future__ import annotations

import re

import pytest

from fed_iotlm import cli
from fed_iotlm.config_schema import RANGES, Range
from fed_iotlm.settings import ConfigError, compose


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fed-iotlm run: error: config: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("rounds=-1", "rounds=-1 is out of range: expected >= 1"),
        ("rounds=0", "rounds=0 is out of range: expected >= 1"),
        ("partition.num_nodes=0", "partition.num_nodes=0 is out of range: expected >= 1"),
        (
            "partition.label_fraction=0",
            "partition.label_fraction=0.0 is out of range: expected in (0, 1]",
        ),
        (
            "partition.label_fraction=1.5",
            "partition.label_fraction=1.5 is out of range: expected in (0, 1]",
        ),
        (
            "partition.missing_rate=1",
            "partition.missing_rate=1.0 is out of range: expected in [0, 1)",
        ),
        (
            "partition.missing_rate=-0.1",
            "partition.missing_rate=-0.1 is out of range: expected in [0, 1)",
        ),
        ("partition.alpha=0", "partition.alpha=0.0 is out of range: expected > 0"),
        ("train.lr=0", "train.lr=0.0 is out of range: expected > 0"),
        ("train.lr=nan", "train.lr=nan is out of range: expected > 0"),
        ("train.batch_size=0", "train.batch_size=0 is out of range: expected >= 1"),
        ("train.epochs=-1", "train.epochs=-1 is out of range: expected >= 0"),
        (
            "strategy.fraction_train=1.5",
            "strategy.fraction_train=1.5 is out of range: expected in [0, 1]",
        ),
        ("attack.fraction=-0.5", "attack.fraction=-0.5 is out of range: expected in [0, 1]"),
        ("llm.batch_size=0", "llm.batch_size=0 is out of range: expected >= 1"),
        ("train.epochs=0", "train.steps=null with train.epochs=0: no node would train"),
        ("train.steps=0", "train.steps=0 with train.epochs=2: no node would train"),
    ],
)
def test_an_out_of_range_value_is_one_line_and_exit_2(
    override, says, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    # at compose first: without the check the command below would start a federation
    with pytest.raises(ConfigError, match=re.escape(says)):
        compose([override])
    assert cli.main(["run", override, "mlflow.enabled=false"]) == 2
    assert says in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_a_dataset_path_with_synthetic_data_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="data=synthetic reads no files"):
        compose([f"data.path={tmp_path}"])
    assert cli.main(["run", f"data.path={tmp_path}", "mlflow.enabled=false"]) == 2
    err = one_line_error(capsys)
    assert f"data.path='{tmp_path}' is set but data=synthetic reads no files" in err
    assert "choose data=npz" in err


def test_values_at_the_edges_of_their_ranges_compose():
    cfg = compose(
        [
            "rounds=1",
            "partition.plan=null",  # else the default experiment's plan fixes 8 nodes
            "partition.num_nodes=1",
            "partition.label_fraction=1",
            "partition.missing_rate=0",
            "strategy.fraction_train=0",
            "train.epochs=0",
            "train.steps=1",  # steps set: the epochs are not used
            "attack.fraction=1",
        ]
    )
    assert cfg["rounds"] == 1 and cfg["train"]["steps"] == 1


def test_every_ranged_key_is_a_numeric_key_of_the_schema():
    """A key renamed in the schema but not here would never be checked again."""
    from fed_iotlm.config_schema import Config, FedAdamConfig, FedProxConfig

    def declared(schema: type, path: list[str]) -> bool:
        fields = schema.__dataclass_fields__
        if path[0] not in fields:
            return False
        if len(path) == 1:
            return fields[path[0]].type in ("int", "float", "int | None", "float | None", "Any")
        return declared(fields[path[0]].default_factory, path[1:])

    for key in RANGES:
        head, *rest = key.split(".")
        if head == "strategy":
            assert any(declared(s, rest) for s in (FedProxConfig, FedAdamConfig)), key
        else:
            assert declared(Config, key.split(".")), key


@pytest.mark.parametrize(
    ("allowed", "inside", "outside", "text"),
    [
        (Range(1), [1, 7], [0, -1, float("inf")], ">= 1"),
        (Range(0, low_open=True), [1e-9, 3.0], [0.0, -1.0, float("nan")], "> 0"),
        (Range(0, 1, low_open=True), [1.0, 0.5], [0.0, 1.01], "in (0, 1]"),
        (Range(0, 1, high_open=True), [0.0, 0.99], [1.0, -0.01], "in [0, 1)"),
    ],
)
def test_range_bounds(allowed, inside, outside, text):
    assert all(allowed.holds(v) for v in inside)
    assert not any(allowed.holds(v) for v in outside)
    assert allowed.text() == text
