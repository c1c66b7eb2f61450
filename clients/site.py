"""A deployed SuperNode's own data, named by its ``--node-config``.

In simulation every node derives its share of the configured dataset from the
experiment config (:func:`fed_iotlm.data.federation.build_layout`).  A real site has
its own recordings instead, so a deployed SuperNode is started with::

    flower-supernode ... --node-config 'partition-id=0 data-dir="/data/site-0" modalities="imu,audio"'

* ``data-dir``: a dataset in the exchange format (``meta.json``, ``train.npz``,
  ``test.npz``; docs/architecture.md) holding only this site's samples;
* ``modalities`` (optional): the sensors to use, comma-separated (default: every
  modality in the site's ``meta.json``);
* ``partition-id``: the site's index 0..N-1 in the federation.  It names the site in
  the server's results and seeds its local training per round, so it must be unique.

Without ``data-dir`` the node falls back to the simulation partitioning: it takes
partition ``partition-id`` of the dataset named by the run config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_iotlm.config_schema import node_count
from fed_iotlm.data.dataset import Split
from fed_iotlm.data.exchange import load_dataset
from fed_iotlm.data.federation import (
    NodeSplits,
    load_experiment_dataset,
    select_modalities,
)
from fed_iotlm.data.preprocess import featurize_dataset
from fed_iotlm.data.validation import stratified_holdout
from fed_iotlm.models.multisensory import ModelSpec

DATA_DIR = "data-dir"
MODALITIES = "modalities"
PARTITION_ID = "partition-id"


class SiteConfigError(ValueError):
    """The SuperNode's node config or its data directory cannot serve this federation."""


@dataclass(frozen=True)
class SiteConfig:
    """What a deployed SuperNode's ``--node-config`` says about its data."""

    data_dir: str
    modalities: tuple[str, ...] | None
    partition_id: int


def parse_modalities(value: Any) -> tuple[str, ...] | None:
    """``"imu,audio"`` (node config strings) -> ("imu", "audio"); empty -> None (all)."""
    if value is None:
        return None
    mods = tuple(m.strip() for m in str(value).replace(";", ",").split(",") if m.strip())
    if len(set(mods)) != len(mods):
        raise SiteConfigError(f"node-config modalities={value!r} names a modality twice")
    return mods or None


def partition_id(node_config: Mapping[str, Any]) -> int:
    """The node's index, with an error that says how to set it."""
    if PARTITION_ID not in node_config:
        raise SiteConfigError(
            "this SuperNode has no partition-id in its node config: start it with "
            "--node-config 'partition-id=<0..N-1> data-dir=\"/path/to/site-data\"' "
            "(docs/deploy.md)"
        )
    value = node_config[PARTITION_ID]
    try:
        pid = int(value)
    except (TypeError, ValueError):
        raise SiteConfigError(f"node-config partition-id={value!r} is not an integer") from None
    if isinstance(value, float) and value != pid:
        raise SiteConfigError(f"node-config partition-id={value!r} is not an integer")
    return pid


def site_config(node_config: Mapping[str, Any]) -> SiteConfig | None:
    """The site's data settings, or None when the node uses the simulation partitioning."""
    data_dir = node_config.get(DATA_DIR)
    if data_dir is None or str(data_dir).strip() == "":
        if node_config.get(MODALITIES):
            raise SiteConfigError(
                "node-config names modalities but no data-dir; modalities select sensors "
                "of the site's own data (without data-dir the simulation plan applies)"
            )
        return None
    return SiteConfig(
        data_dir=str(Path(str(data_dir)).expanduser()),
        modalities=parse_modalities(node_config.get(MODALITIES)),
        partition_id=partition_id(node_config),
    )


def federation_size(cfg: dict) -> int:
    """Number of nodes the run config plans for (``partition.plan`` or ``num_nodes``)."""
    return node_count(cfg["partition"])


def federation_spec(cfg: dict) -> ModelSpec:
    """The federation's model architecture, as :func:`fed_iotlm.experiment.model_spec`
    derives it, but without partitioning the configured dataset.

    A deployed SuperNode starts a new ClientApp process for every message, and the
    partitioning (which a site with its own data does not use) costs seconds of imports
    there.  Only kinds and feature shapes matter, which a domain shift does not change.
    tests/test_site_node.py checks that both give the same spec for every method.
    """
    from fed_iotlm.experiment import spec_for_dataset

    return spec_for_dataset(cfg, load_experiment_dataset(cfg["data"], int(cfg["seed"])))


def load_site(site: SiteConfig, spec: ModelSpec, val_fraction: float = 0.1) -> NodeSplits:
    """The site's (train, val, test), featurized but not yet standardised, exactly as a
    simulated node's share is (same model inputs either way): its ``val.npz`` if the
    directory has one, else a seeded stratified ``val_fraction`` of its training data.

    Every way the directory can fail to fit the federation's model is reported with the
    node-config key to fix, because the person reading the error runs the SuperNode.
    """
    try:
        raw = load_dataset(site.data_dir)
    except (ValueError, OSError) as exc:  # DatasetFormatError is a ValueError
        raise SiteConfigError(
            f"node-config data-dir={site.data_dir!r} is not a valid dataset directory "
            f"(meta.json, train.npz and test.npz in the exchange format): {exc}"
        ) from exc
    mods = list(site.modalities or raw.meta.modalities)
    unknown = [m for m in mods if m not in raw.meta.modalities]
    if unknown:
        raise SiteConfigError(
            f"node-config modalities names {unknown}, not in {site.data_dir}/meta.json "
            f"({', '.join(raw.meta.modalities)})"
        )
    try:
        ds = featurize_dataset(select_modalities(raw, mods))
    except ValueError as exc:
        raise SiteConfigError(f"data-dir={site.data_dir!r}: {exc}") from exc
    _check_fits(site, ds, spec, mods)
    train, test = _only_observed(ds.train), _only_observed(ds.test)
    if len(train) == 0:
        raise SiteConfigError(f"data-dir={site.data_dir!r}: no training sample has {mods}")
    if ds.val is not None:
        return NodeSplits(train, _only_observed(ds.val), test)
    first_task = next(iter(train.y))
    held = stratified_holdout(train.y[first_task], val_fraction, site.partition_id)
    keep = np.setdiff1d(np.arange(len(train)), held)
    return NodeSplits(train.subset(keep), train.subset(held), test)


def _check_fits(site: SiteConfig, ds, spec: ModelSpec, mods: list[str]) -> None:
    """Modalities, feature shapes and tasks must match the federation's model."""
    where = f"data-dir={site.data_dir!r}"
    for m in mods:
        if m not in spec.modalities:
            raise SiteConfigError(
                f"{where}: modality {m!r} is not in the federation's model "
                f"({', '.join(spec.modalities)}); drop it with node-config modalities=..."
            )
        want = list(spec.modalities[m]["feature_shape"])
        got = list(ds.train.x[m].shape[1:])
        if got != want or ds.meta.modalities[m].kind != spec.modalities[m]["kind"]:
            raise SiteConfigError(
                f"{where}: modality {m!r} is {ds.meta.modalities[m].kind} with features "
                f"{got}, but the federation's model expects {spec.modalities[m]['kind']} "
                f"with {want} (same kind, sampling rate and window length as the run config's data)"
            )
    for t, task in ds.meta.tasks.items():
        if t not in spec.tasks:
            raise SiteConfigError(
                f"{where}: task {t!r} is not one of the federation's tasks {list(spec.tasks)}"
            )
        if task.num_classes != spec.tasks[t]:
            raise SiteConfigError(
                f"{where}: task {t!r} has {task.num_classes} classes, the federation's "
                f"model {spec.tasks[t]}"
            )
    missing = [t for t in spec.tasks if t not in ds.meta.tasks]
    if missing:
        raise SiteConfigError(
            f"{where}: meta.json lacks the federation's task(s) {missing} "
            "(label unknown samples -1 rather than leaving the task out)"
        )


def _only_observed(split: Split) -> Split:
    keep = split.present_any()
    return split if keep.all() else split.subset(np.nonzero(keep)[0])
