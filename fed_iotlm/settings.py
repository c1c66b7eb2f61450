"""Experiment settings: one Hydra config tree serves every entry point.

``python -m simulations.run`` and ``fed-iotlm run`` compose it with Hydra's command
line; ``flwr run .`` and deployed SuperNodes compose the same tree from the Flower run
config: its dotted keys (``secagg.enabled``, ``rounds``, ...) and its ``overrides``
entry of free-form Hydra overrides (``"partition.num_nodes=10 rounds=5"``).
"""

from __future__ import annotations

import json
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

from fed_iotlm.config_schema import (
    ConfigError,
    check_choices,
    check_data_source,
    check_declared,
    check_node_count,
    check_ranges,
    check_required,
    describe,
    register,
)
from fed_iotlm.flwr_apps import APP_KEY

__all__ = ["ConfigError", "compose", "config_dir", "from_run_config", "run_config_overrides"]


def config_dir(package: Path | None = None) -> Path:
    """The config tree: ``configs/`` beside the package in a checkout (or a ``flwr run``
    FAB, which ships the repository's layout), ``fed_iotlm/configs`` in a wheel install
    (setup.py maps it there).  ``package``: the fed_iotlm directory (default: this one)."""
    here = package or Path(__file__).resolve().parent
    candidates = (here.parent / "configs", here / "configs")
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "fed-iotlm's config tree is missing: no config.yaml in "
        + " or ".join(str(c) for c in candidates)
    )


CONFIG_DIR = config_dir()


def compose(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Compose ``configs/config.yaml`` with Hydra overrides into a plain dict, checked
    against fed_iotlm/config_schema.py: a key it does not declare, a value of the wrong
    type or a missing mandatory value raises :class:`ConfigError`, one line naming it."""
    return json.loads(_compose_cached(tuple(overrides), str(CONFIG_DIR)))


def compose_dir(directory: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """:func:`compose` on another config tree (a copy with an edited yaml, in tests)."""
    return json.loads(_compose_cached(tuple(overrides), str(directory)))


@lru_cache(maxsize=8)
def _compose_cached(overrides: tuple[str, ...], directory: str) -> str:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with initialize_config_dir(config_dir=directory, version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explain(err)) from err
    check_required(plain)
    check_declared(plain)
    check_ranges(plain)
    check_choices(plain)
    check_data_source(plain)
    check_node_count(plain)
    return json.dumps(plain)


def explain(err: BaseException) -> str:
    """One line for a composition error: the OmegaConf error underneath names the key
    (and the expected type); Hydra's own errors (an unknown group option, a malformed
    override) keep their first line."""
    from omegaconf.errors import OmegaConfBaseException

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return describe(seen)
        seen = seen.__cause__ or seen.__context__
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"config: {first or type(err).__name__}"


# the run-config key holding free-form Hydra overrides; every other key of
# [tool.flwr.app.config] is a dotted config key, "" meaning "the config tree's value"
OVERRIDES_KEY = "overrides"
UNSET = ""


def run_config_overrides(run_config: dict[str, Any]) -> list[str]:
    """Hydra overrides from a Flower run config: the ``overrides`` string first, then
    every dotted key set to something other than ``""`` (``flwr run . --run-config
    'secagg.enabled=true rounds=5'``), so a dotted key wins over the same key in
    ``overrides``.  Defaults stay in the schema alone (config_schema.py): pyproject.toml
    declares the keys (the SuperLink refuses undeclared ones) with ``""``, not their values.
    ``app`` picks the app (:mod:`fed_iotlm.flwr_apps`) and is no config key: left out."""
    out = shlex.split(str(run_config.get(OVERRIDES_KEY, "") or ""))
    for key, value in run_config.items():
        if key in (OVERRIDES_KEY, APP_KEY) or value == UNSET:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = str(value)
        out.append(f"{key}={text}")
    return out


def from_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """Settings for an app started by Flower (``flwr run``): the config tree composed
    with the run config's overrides and dotted keys (:func:`run_config_overrides`)."""
    return compose(run_config_overrides(run_config))


def to_json(cfg: dict[str, Any]) -> str:
    """Canonical JSON of a config (cache key; what is logged)."""
    return json.dumps(cfg, sort_keys=True)


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
