"""Every documented ``flwr run`` is one that can run: its run config is accepted by
Flower and composes, and it asks for as many SuperNodes as its config has nodes.

Without a connection, ``flwr run`` goes to the managed local SuperLink, which
simulates ``num-supernodes`` nodes (Flower's default: 2); the ServerApp then waits for
the config's node count and fails after ``strategy.wait_for_nodes_s`` when they differ.
The deploy walk-through (docs/deploy.md, connection ``deploy``) has three sites.
The commands themselves run in tests/test_flwr_run.py (the quick and SecAgg+ ones),
tests/test_deploy.py and tests/test_server_restart.py.
"""

from __future__ import annotations

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from fed_iotlm.config_schema import node_count
from fed_iotlm.flwr_apps import FEDLORA, chosen_app
from fed_iotlm.llm.sites import AUTO, TOY_SITES
from fed_iotlm.settings import compose, run_config_overrides
from tests.doc_commands import FLOWER_DEFAULT_SUPERNODES, ROOT, FlwrRun, documented, parse

DEPLOY_SITES = 3  # docs/deploy.md: site-0 .. site-2
RUNS = documented(env={"DEPLOY": "/tmp/fed-deploy"})


def _nodes(run: FlwrRun) -> int:
    """The node count of the federation ``run``'s run config describes; for the
    federated-LoRA app (``app="fedlora"``), its number of sites."""
    fused = get_fused_config_from_dir(ROOT, parse_config_args(run.run_config))
    cfg = compose(run_config_overrides(fused))
    if chosen_app(fused) == FEDLORA:
        sites = cfg["llm"]["federated"]["sites"]
        if sites != AUTO:
            return int(sites)
        assert not cfg["llm"]["bundle"], f"{run.where}: a bundle's plan is not checked here"
        return TOY_SITES
    return node_count(cfg["partition"])


def _supernodes(run: FlwrRun) -> int:
    return int(
        parse_config_args(run.federation_config).get("num-supernodes", FLOWER_DEFAULT_SUPERNODES)
    )


def test_the_docs_show_the_commands_the_tests_rely_on():
    docs = {run.doc.name for run in RUNS}
    assert {"README.md", "deploy.md", "flwr-run.md"} <= docs
    secagg = [r for r in RUNS if r.doc.name == "flwr-run.md" and "secagg.enabled=true" in r.text]
    assert len(secagg) == 1, [r.text for r in secagg]
    fedlora = [r.doc.name for r in RUNS if 'app="fedlora"' in r.text]
    assert sorted(fedlora) == ["flwr-run.md", "llm.md"], fedlora


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.where)
def test_a_documented_run_config_is_accepted_and_composes(run):
    _nodes(run)  # raises on a key Flower does not know or an override the config refuses


@pytest.mark.parametrize("run", [r for r in RUNS if r.connection is None], ids=lambda r: r.where)
def test_a_documented_simulation_has_a_supernode_per_node(run):
    assert _supernodes(run) == _nodes(run), (
        f"{run.where}: {_supernodes(run)} simulated SuperNodes for a federation of "
        f'{_nodes(run)} nodes (add --federation-config "num-supernodes={_nodes(run)}")'
    )


@pytest.mark.parametrize(
    "run", [r for r in RUNS if r.connection == "deploy"], ids=lambda r: r.where
)
def test_a_walk_through_run_describes_its_three_sites(run):
    assert _nodes(run) == DEPLOY_SITES, run.where


def test_the_parser_reads_what_a_shell_would():
    run = parse(
        ROOT / "README.md",
        "flwr run . deploy --federation-config \"num-supernodes=3\" -c 'rounds=2' --stream"
        " > $OUT/x.json  # a comment",
        env={"OUT": "/tmp/o"},
    )
    assert (run.app, run.connection) == (".", "deploy")
    assert run.federation_config == ["num-supernodes=3"] and run.run_config == ["rounds=2"]
    assert "--stream" in run.options
    with pytest.raises(ValueError, match="unknown option --nope"):
        parse(ROOT / "README.md", "flwr run . --nope")
    with pytest.raises(ValueError, match="not a flwr run"):
        parse(ROOT / "README.md", "flwr list")
