"""The typed configuration: fed_iotlm/config_schema.py declares every key once, the yaml
files under configs/ only choose and override, and a wrong key or type fails at
composition with one line naming it.  Fast: composition only, no Ray, no Flower."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
from omegaconf import MISSING, OmegaConf

from fed_iotlm import config_schema as schema
from fed_iotlm.config_schema import ConfigError, section
from fed_iotlm.settings import CONFIG_DIR, _compose_cached, compose, compose_dir, from_run_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUPS = ("data", "partition", "model", "strategy", "llm", "shift")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def _needs_path(yaml_file: Path) -> bool:
    return "/data: npz" in yaml_file.read_text() or yaml_file.stem == "npz"


def _with_path(overrides: list[str], yaml_file: Path) -> list[str]:
    return [*overrides, "data.path=/no/such/dir"] if _needs_path(yaml_file) else overrides


def _schema_of(path: str, tree: dict[str, Any]) -> type | None:
    """The dataclass declaring the block at ``path`` of a composed tree (None: an open map)."""
    if path in schema.GROUP_SCHEMAS:
        return schema.GROUP_SCHEMAS[path][tree["name"]]
    return None


def _walk(tree: dict[str, Any], cls: type, path: str) -> None:
    """Every key of ``tree`` is a field of ``cls`` and every field is in ``tree``;
    recurse into fields typed by a dataclass (and into data/strategy by their name)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(tree) == set(fields), f"{path or 'top level'}: {set(tree) ^ set(fields)}"
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        sub = _schema_of(key, tree[name]) if isinstance(tree[name], dict) else None
        if sub is None and f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            sub = type(made) if dataclasses.is_dataclass(made) else None
        if sub is not None:
            _walk(tree[name], sub, key)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_key_of_each_experiment_is_declared_by_the_schema(experiment):
    yaml_file = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    _walk(compose(_with_path([f"experiment={experiment}"], yaml_file)), schema.Config, "")


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes_and_is_declared(group, option):
    yaml_file = CONFIG_DIR / group / f"{option}.yaml"
    cfg = compose(_with_path([f"{group}={option}"], yaml_file))
    _walk(cfg, schema.Config, "")
    if group in ("data", "strategy"):
        assert cfg[group]["name"] == option  # the option's values (and schema), not another's


def _default_at(path: list[str], cfg: dict[str, Any]) -> Any:
    """The schema's default for the key at ``path`` (data/strategy: by the composed name)."""
    cls: Any = schema.Config
    for i, name in enumerate(path):
        key = ".".join(path[: i + 1])
        if key in schema.GROUP_SCHEMAS:
            cls = schema.GROUP_SCHEMAS[key][cfg[key]["name"]]
            continue
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if not dataclasses.is_dataclass(value):
            return value if i == len(path) - 1 else MISSING
        cls = type(value)
    return MISSING


def _leaves(node: Any, path: list[str]):
    if isinstance(node, dict) and not (path and path[0] == "shift"):
        for k, v in node.items():
            if k != "defaults":
                yield from _leaves(v, [*path, str(k)])
    else:
        yield path, node


@pytest.mark.parametrize(
    "yaml_file",
    sorted(CONFIG_DIR.rglob("*.yaml")),
    ids=lambda p: str(p.relative_to(CONFIG_DIR)),
)
def test_no_yaml_restates_a_schema_default(yaml_file):
    raw = OmegaConf.to_container(OmegaConf.load(yaml_file)) or {}
    rel = yaml_file.relative_to(CONFIG_DIR)
    global_package = "@package _global_" in yaml_file.read_text()
    prefix = [] if global_package or len(rel.parts) == 1 else [rel.parts[0]]
    selection = [f"{rel.parts[0]}={yaml_file.stem}"] if len(rel.parts) > 1 else []
    cfg = compose(_with_path(selection, yaml_file))
    for path, value in _leaves(raw, prefix):
        if not path or path[0] == "hydra":
            continue
        default = _default_at(path, cfg)
        assert default is MISSING or value != default, (
            f"{rel}: {'.'.join(path)}={value!r} restates the schema's default"
        )


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["binding.kk=1"], "unknown key 'binding.kk'"),
        (["experiment=quick", "partition.num_node=3"], "unknown key 'partition.num_node'"),
        (["strategy=fedavg", "strategy.proximal_mu=0.1"], "unknown key 'strategy.proximal_mu'"),
        (["data.num_trian=5"], "unknown key 'data.num_trian'"),
        (["rounds=abc"], "rounds='abc'"),
        (["train.lr=fast"], "train.lr='fast'"),
        (["dp.enabled=maybe"], "dp.enabled='maybe'"),
        (["data=npz"], "'data.path' has no value"),
    ],
)
def test_a_wrong_key_or_type_fails_in_one_line_naming_it(overrides, names):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert names in str(err.value) and "\n" not in str(err.value)


def test_a_wrong_type_names_the_expected_type():
    with pytest.raises(ConfigError, match=r"rounds='abc': expected an integer$"):
        compose(["rounds=abc"])
    with pytest.raises(ConfigError, match=r"binding.floor='x': expected a number$"):
        compose(["binding.floor=x"])
    with pytest.raises(ConfigError, match=r"dp.enabled='maybe': expected true or false$"):
        compose(["dp.enabled=maybe"])


def test_an_experiment_sizing_the_generator_still_combines_with_npz_data():
    cfg = compose(["experiment=quick", "data=npz", "data.path=/d"])
    assert cfg["data"]["name"] == "npz" and cfg["data"]["path"] == "/d"


def test_a_typo_in_an_experiment_yaml_fails_naming_the_key(tmp_path):
    tree = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, tree)
    (tree / "experiment" / "typo.yaml").write_text("# @package _global_\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        compose_dir(tree, ["experiment=typo"])
    assert compose_dir(tree, ["experiment=quick"])["train"]["epochs"] == 3  # the copy composes


def test_flower_run_config_keys_get_the_same_checks():
    assert from_run_config({"rounds": 3, "binding.k": ""})["rounds"] == 3
    with pytest.raises(ConfigError, match="unknown key 'binding.kk'"):
        from_run_config({"binding.kk": 1})
    with pytest.raises(ConfigError, match="rounds='abc'"):
        from_run_config({"overrides": "rounds=abc"})


def test_a_default_changed_in_the_schema_shows_up_in_the_composed_config(monkeypatch):
    """No yaml restates ``rounds`` (experiment/default.yaml used to): the schema's value rules."""
    monkeypatch.setattr(schema.Config.__dataclass_fields__["rounds"], "default", 7)
    _compose_cached.cache_clear()
    try:
        for experiment in ("default", "mmbind_study"):
            assert compose([f"experiment={experiment}"])["rounds"] == 7
    finally:
        monkeypatch.undo()
        _compose_cached.cache_clear()
    assert compose(["experiment=default"])["rounds"] == 12


def test_section_fills_defaults_into_a_partial_block_and_checks_it():
    assert section("dp", {"enabled": True}) == {
        **dataclasses.asdict(schema.DPConfig()),
        "enabled": True,
    }
    assert section("strategy", {"name": "fedprox"})["proximal_mu"] == 0.01
    assert section("strategy", {})["name"] == "fedavg"
    assert section("llm.federated", None)["rounds"] == 3
    with pytest.raises(ConfigError, match="unknown key 'dp.noise'"):
        section("dp", {"noise": 1.0})
    with pytest.raises(ConfigError, match="sync.rank='four': expected an integer"):
        section("sync", {"rank": "four"})
    with pytest.raises(ConfigError, match="strategy.name='fedsgd'"):
        section("strategy", {"name": "fedsgd"})


def test_simulations_run_refuses_a_wrong_key_in_one_line_before_hydra(capsys):
    from simulations.run import check_command_line

    with pytest.raises(SystemExit) as stop:
        check_command_line(["experiment=quick", "binding.kk=1", "hydra.run.dir=/tmp/x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'binding.kk'" in err and "\n" not in err and "Traceback" not in err
    check_command_line(["experiment=quick", "hydra.run.dir=/tmp/x"])  # a good line passes


def _parsers():
    from fed_iotlm.diagnostics.report import diagnostics_config
    from fed_iotlm.experiment import ssl_config, train_config
    from fed_iotlm.federation.adapter_sync import sync_config
    from fed_iotlm.federation.attacks import attack_config
    from fed_iotlm.federation.privacy import dp_config
    from fed_iotlm.federation.robust import robust_config
    from fed_iotlm.federation.secure import SecureSettings
    from fed_iotlm.llm.federated import federated_settings
    from fed_iotlm.personal import personal_config
    from simulations.ray_cluster import ray_settings

    return [
        (dp_config, schema.DPConfig, "clipping_norm", 3.5, "clipping_norm"),
        (sync_config, schema.SyncConfig, "rank", 9, "rank"),
        (attack_config, schema.AttackConfig, "scale", 4.0, "scale"),
        (personal_config, schema.PersonalConfig, "lr_scale", 2.0, "lr_scale"),
        (diagnostics_config, schema.DiagnosticsConfig, "probe_samples", 64, "probe_samples"),
        (SecureSettings.from_config, schema.SecAggConfig, "min_holders", 5, "min_holders"),
        (robust_config, schema.StrategyConfig, "krum_f", 3, "krum_f"),
        (train_config, schema.TrainConfig, "weight_decay", 0.25, "weight_decay"),
        (ssl_config, schema.BindingConfig, "ssl_gain", 0.7, "gain"),
        (federated_settings, schema.LlmFederatedConfig, "local_steps", 7, "local_steps"),
        (ray_settings, schema.SimulationConfig, "ray_connect_timeout_s", 3.0, "connect_timeout_s"),
    ]


PARSED = ("dp", "sync", "attack", "personal", "diagnostics", "secagg", "robust", "train", "ssl")


@pytest.mark.parametrize("case", range(11), ids=[*PARSED, "llm.federated", "simulation"])
def test_each_parser_takes_its_defaults_from_the_schema(case, monkeypatch):
    """A block a caller leaves empty gets the schema's value, whatever it is: change the
    schema's default and the parser follows (no parser keeps a copy of it)."""
    parse, cls, key, value, attribute = _parsers()[case]
    monkeypatch.setattr(cls.__dataclass_fields__[key], "default", value)
    schema._section_cached.cache_clear()
    try:
        assert getattr(parse({}), attribute) == value
    finally:
        monkeypatch.undo()
        schema._section_cached.cache_clear()
    assert getattr(parse({}), attribute) != value
