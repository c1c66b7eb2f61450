"""How many nodes a config means: a plan fixes the count, and a ``partition.num_nodes``
that contradicts it is refused in one line (it used to be dropped without a word: the
default experiment's 8-node plan won over ``partition.num_nodes=10``).  Layouts of the
synthetic experiments are built (seconds); the npz ones are composed only, their layouts
are built on small fixture datasets in tests/test_partition_realdata.py."""

from __future__ import annotations

import copy

import pytest

from clients.site import federation_size
from fed_iotlm.config_schema import DEFAULT_NUM_NODES, ConfigError, node_count
from fed_iotlm.data.federation import build_layout
from fed_iotlm.settings import CONFIG_DIR, compose, from_run_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _needs_data(experiment: str) -> bool:
    return "/data: npz" in (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()


@pytest.mark.parametrize(
    ("overrides", "given", "planned"),
    [
        (["partition.num_nodes=10"], 10, 8),  # the default experiment's plan
        (["experiment=quick", "partition.num_nodes=8"], 8, 3),
        (["experiment=random_plan", "partition.num_nodes=3", "partition.plan=[[imu],[audio]]"],
         3, 2),
    ],
)  # fmt: skip
def test_a_num_nodes_the_plan_contradicts_is_refused_naming_both(overrides, given, planned):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    line = str(err.value)
    assert "\n" not in line
    assert f"partition.num_nodes={given} but partition.plan lists {planned} nodes" in line
    assert "drop partition.num_nodes" in line and "experiment=random_plan" in line


def test_flwr_runs_config_is_refused_the_same_way():
    with pytest.raises(ConfigError, match="partition.num_nodes=10 but partition.plan lists 8"):
        from_run_config({"overrides": "partition.num_nodes=10", "rounds": ""})


def test_a_config_that_skipped_composition_is_refused_where_the_nodes_are_counted():
    """The ServerApp and every ClientApp build the layout, and a deployed site counts the
    federation, from the config they are given: both refuse the contradiction too."""
    cfg = copy.deepcopy(compose(["experiment=quick"]))
    cfg["partition"]["num_nodes"] = 5
    with pytest.raises(ConfigError, match="num_nodes=5 but partition.plan lists 3"):
        build_layout(cfg)
    with pytest.raises(ConfigError, match="num_nodes=5 but partition.plan lists 3"):
        federation_size(cfg)
    # a plan as flwr's run config writes it ("imu,audio;imu")
    with pytest.raises(ConfigError, match="num_nodes=5 but partition.plan lists 2"):
        node_count({"plan": "imu,audio;imu", "num_nodes": 5})


def test_a_plan_with_num_nodes_left_at_its_default_still_builds():
    cfg = compose([])  # the default experiment: an 8-node plan, num_nodes not given
    assert cfg["partition"]["num_nodes"] is None
    assert build_layout(cfg).num_nodes == len(cfg["partition"]["plan"]) == 8
    assert node_count(compose(["partition.num_nodes=8"])["partition"]) == 8  # restates it
    assert build_layout(compose(["experiment=quick"])).num_nodes == 3


def test_without_a_plan_num_nodes_counts_and_null_means_the_default():
    cfg = compose(["experiment=random_plan", "partition.num_nodes=10"])
    assert build_layout(cfg).num_nodes == 10
    assert node_count(compose(["experiment=random_plan"])["partition"]) == DEFAULT_NUM_NODES
    assert node_count({"plan": None, "num_nodes": None}) == DEFAULT_NUM_NODES


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_counts_its_nodes(experiment):
    overrides = [f"experiment={experiment}"]
    if _needs_data(experiment):
        overrides.append("data.path=/no/such/dir")
    part = compose(overrides)["partition"]
    count = node_count(part)
    if part["plan"]:
        assert count == len(part["plan"])
    else:
        assert count == (part["num_nodes"] or DEFAULT_NUM_NODES)
    if not _needs_data(experiment):
        layout = build_layout(compose(overrides))
        assert layout.num_nodes == len(layout.plan) == count
