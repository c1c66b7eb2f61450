"""A deployed SuperNode's own data (``--node-config data-dir=...``) and the site export."""

from __future__ import annotations

import json

import pytest
import torch

from clients.node import get_node, get_site_node
from clients.site import SiteConfigError, federation_spec, site_config
from fed_iotlm.cli import main
from fed_iotlm.experiment import model_spec
from fed_iotlm.federation.sites import export_sites

QUICK = ["experiment=quick"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from fed_iotlm.settings import compose

    cfg = compose(QUICK)
    root = tmp_path_factory.mktemp("sites")
    return cfg, root, export_sites(cfg, root)


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_exported_site_trains_on_exactly_its_simulated_share(sites):
    cfg, root, written = sites
    assert [s.path.name for s in written] == ["site-0", "site-1", "site-2"]
    for s in written:
        sim = get_node(cfg, s.partition_id)
        site = get_site_node(cfg, site_config({"partition-id": s.partition_id, "data-dir": s.path}))
        assert site.source == "site" and sim.source == "partition"
        assert site.modalities == sim.modalities == s.modalities
        for split in ("train", "val", "test"):
            a, b = getattr(sim, split), getattr(site, split)
            assert _same(a.x, b.x) and _same(a.mask, b.mask) and _same(a.y, b.y)
        assert site.group_counts == sim.group_counts
        meta = json.loads((s.path / "meta.json").read_text())
        assert list(meta["modalities"]) == s.modalities


def test_modalities_select_sensors_of_the_site(sites):
    cfg, root, _ = sites
    node = get_site_node(
        cfg,
        site_config({"partition-id": 0, "data-dir": str(root / "site-0"), "modalities": "audio"}),
    )
    assert node.modalities == ["audio"]
    assert "enc.imu" not in node.group_counts and node.group_counts["enc.audio"] > 0


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"partition-id": 0, "data-dir": "/nonexistent/site"}, "not a valid dataset directory"),
        ({"partition-id": 0, "data-dir": "{root}/site-0", "modalities": "depth"}, "not in"),
        ({"partition-id": 0, "data-dir": "{root}/site-0", "modalities": "imu,imu"}, "twice"),
        ({"partition-id": 7, "data-dir": "{root}/site-0"}, "outside the federation of 3"),
        ({"data-dir": "{root}/site-0"}, "no partition-id"),
        ({"partition-id": "x", "data-dir": "{root}/site-0"}, "not an integer"),
        ({"partition-id": 0, "modalities": "imu"}, "no data-dir"),
    ],
)
def test_bad_node_configs_say_what_to_fix(sites, node_config, message):
    cfg, root, _ = sites
    node_config = {k: str(v).format(root=root) for k, v in node_config.items()}
    with pytest.raises(SiteConfigError, match=message):
        get_site_node(cfg, site_config(node_config))


def test_a_directory_that_is_not_a_dataset(sites, tmp_path):
    cfg, _, _ = sites
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(SiteConfigError, match="not a valid dataset directory"):
        get_site_node(cfg, site_config({"partition-id": 1, "data-dir": str(tmp_path)}))


def test_without_data_dir_the_simulation_partition_applies():
    assert site_config({"partition-id": 2, "num-partitions": 3}) is None
    assert site_config({"partition-id": 2, "data-dir": ""}) is None


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["method=fedavg"],
        ["method=harmony"],
        ["model.fusion=late"],
        ["method=mmbind", "partition.shared=imu", "partition.plan=[[imu,audio],[imu,depth],[imu]]"],
    ],
)
def test_federation_spec_is_model_spec(overrides):
    from fed_iotlm.settings import compose

    cfg = compose([*QUICK, *overrides])
    assert federation_spec(cfg) == model_spec(cfg)


def test_sites_command(tmp_path, capsys):
    assert main(["sites", str(tmp_path / "s"), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "partition-id=2  modalities=thermal" in out
    assert main(["sites", str(tmp_path / "s"), *QUICK]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["sites", str(tmp_path / "s"), *QUICK, "--force"]) == 0
