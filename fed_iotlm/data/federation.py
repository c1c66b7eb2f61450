"""The data side of a simulated federation: which samples and modalities each node holds.

Built deterministically from the experiment config, so the ServerApp and every
ClientApp (possibly in other processes) derive the same layout without exchanging
data.  Each node standardises with statistics of its own training data only.

Domain shift (``shift``, ``configs/shift/*.yaml``) is applied to the RAW arrays, after
the partition and before featurisation, so each node's own standardiser and the
log-mel front end see the shifted signal, as they would at a real site.  What a
"site" is, is ``shift_unit``:

* ``node`` (default): the node's partition id.  A node is one deployment with one
  hardware/placement, so every sample a node holds (train and test) gets the same
  per-site transform, and ``sites: [0, 3]`` in a shift entry names nodes 0 and 3.
  This is what a per-node personalised adapter can learn to undo, and it works for
  every partition scheme and for datasets without a ``site`` array.
* ``site``: the dataset's own ``split.site`` (the synthetic generator's sites, an
  importer's recording sites).  With ``partition=natural`` (by site) the two agree
  up to numbering; with IID or Dirichlet partitions a node then holds a mix of sites.

The test split gets the same per-site transform as the training data of that site
(a site's transform parameters are drawn from a generator seeded by the site only,
:mod:`fed_iotlm.data.shift`).  With no shift (``shift: []``, the default) the data
are bit-identical to those of a run without the shift feature.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from fed_iotlm.config_schema import block, node_count, parse_plan, setting

from .dataset import MultisensoryDataset, Split
from .exchange import load_dataset
from .follow_train import empty_nodes, partition_like_train
from .partition import modality_plan, partition_indices
from .preprocess import ChannelSums, Standardizer, featurize_dataset
from .shift import apply_shifts, parse_shift_config, site_ids_from_parts
from .synthetic import SyntheticConfig, make_synthetic
from .validation import carve_validation, check_val_fraction

SHIFT_UNITS = ("node", "site")

log = logging.getLogger(__name__)


def load_experiment_dataset(data_cfg: dict, seed: int) -> MultisensoryDataset:
    """The featurized dataset named by ``data_cfg`` (synthetic generator or a directory)."""
    return _load_cached(json.dumps(data_cfg, sort_keys=True), seed)


def load_raw_dataset(data_cfg: dict, seed: int) -> MultisensoryDataset:
    """The same dataset before featurisation (audio still a waveform): what shifts act on."""
    return _load_raw_cached(json.dumps(data_cfg, sort_keys=True), seed)


@lru_cache(maxsize=4)
def _load_cached(data_json: str, seed: int) -> MultisensoryDataset:
    return featurize_dataset(_load_raw_cached(data_json, seed))


@lru_cache(maxsize=4)
def _load_raw_cached(data_json: str, seed: int) -> MultisensoryDataset:
    cfg = json.loads(data_json)
    if cfg["name"] == "synthetic":
        fields = SyntheticConfig.__dataclass_fields__
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        kwargs.setdefault("seed", seed)
        raw = make_synthetic(SyntheticConfig(**kwargs))
    elif cfg["name"] == "npz":
        if not cfg.get("path"):
            raise ValueError("data=npz needs data.path=DIR (a dataset in the exchange format)")
        raw = load_dataset(Path(cfg["path"]).expanduser())
    else:
        raise ValueError(f"data.name={cfg['name']!r}: expected 'synthetic' or 'npz'")
    if cfg.get("modalities"):
        raw = select_modalities(raw, list(cfg["modalities"]))
    return raw


def select_modalities(ds: MultisensoryDataset, keep: list[str]) -> MultisensoryDataset:
    """The dataset restricted to ``keep`` (``data.modalities``); samples left with no
    modality at all are removed, and how many is reported in the error if that is all."""
    unknown = [m for m in keep if m not in ds.meta.modalities]
    if unknown:
        raise ValueError(f"data.modalities names {unknown}, not in {list(ds.meta.modalities)}")
    meta = replace(ds.meta, modalities={m: ds.meta.modalities[m] for m in keep})
    splits = {}
    for name, split in ds.splits().items():
        sub = split.keep_modalities(keep)
        present = sub.present_any()
        if not present.any():
            raise ValueError(f"data.modalities={keep}: no {name} sample has any of them")
        splits[name] = sub if present.all() else sub.subset(np.nonzero(present)[0])
    return MultisensoryDataset(meta, splits["train"], splits["test"], splits.get("val"))


@dataclass
class NodeSplits:
    """One node's featurized, NOT yet standardised data: what it holds at its site."""

    train: Split  # labels hidden beyond ``label_fraction``
    val: Split  # the node's validation share (labelled, never trained on)
    test: Split

    def standardized(self, scaler: Standardizer | None = None) -> NodeSplits:
        """Every split standardised with ``scaler`` (default: the node's own training
        statistics, ``normalization=per_site``)."""
        scaler = scaler or Standardizer.fit(self.train)
        return NodeSplits(*(scaler.transform(s) for s in (self.train, self.val, self.test)))


@dataclass
class FederationLayout:
    """Dataset plus, per node, its modalities and its train/val/test sample indices.

    ``val_parts`` index ``dataset.val`` when the dataset brought a ``val.npz``
    (``val_source == "val"``), else ``dataset.train``: the shares carved from each
    node's training data (``val_source == "train"``), never in ``train_parts``."""

    dataset: MultisensoryDataset
    plan: list[list[str]]
    train_parts: list[np.ndarray]
    test_parts: list[np.ndarray]
    label_fraction: float
    seed: int
    # the site each sample was shifted as (``shift_unit``); what per-site diagnostics group by
    train_sites: np.ndarray | None = None
    test_sites: np.ndarray | None = None
    shift: list = field(default_factory=list)  # the shift config (plain entries)
    shift_unit: str = "node"
    val_parts: list[np.ndarray] = field(default_factory=list)
    val_source: str = "train"
    val_sites: np.ndarray | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.plan)

    @property
    def val_pool(self) -> Split:
        """The split ``val_parts`` index into."""
        return self.dataset.train if self.val_source == "train" else self.dataset.val

    def val_split(self) -> Split:
        """The global validation reference set: every node's validation share, with all
        modalities (the counterpart of ``dataset.test``), unstandardised."""
        return self.val_pool.subset(np.concatenate(self.val_parts))

    def val_split_sites(self) -> np.ndarray | None:
        """The site of each sample of :meth:`val_split` (per-site test-time adaptation)."""
        sites = self.train_sites if self.val_source == "train" else self.val_sites
        return None if sites is None else sites[np.concatenate(self.val_parts)]

    def node_raw(self, node: int) -> NodeSplits:
        """Node ``node``'s (train, val, test) with only its modalities, featurized but not
        standardised, and training labels hidden beyond ``label_fraction``."""
        mods = self.plan[node]
        train = self.dataset.train.subset(self.train_parts[node]).keep_modalities(mods)
        val = self.val_pool.subset(self.val_parts[node]).keep_modalities(mods)
        test = self.dataset.test.subset(self.test_parts[node]).keep_modalities(mods)
        train, val, test = _only_observed(train), _only_observed(val), _only_observed(test)
        train = hide_labels(train, self.label_fraction, self.seed * 1000 + node)
        return NodeSplits(train, val, test)

    def node_data(self, node: int, scaler: Standardizer | None = None) -> tuple[Split, Split]:
        """Node ``node``'s standardised (train, test): with ``scaler`` (the federation's
        pooled statistics) or, by default, its own training statistics."""
        out = self.node_raw(node).standardized(scaler)
        return out.train, out.test

    def training_sums(self) -> ChannelSums:
        """Σ over nodes of their training data's per-channel sums: exactly what the
        statistics round computes over the wire, for runs without a Grid (baselines)."""
        total = ChannelSums({}, {}, {})
        for node in range(self.num_nodes):
            total = total + ChannelSums.of(self.node_raw(node).train)
        return total


def _only_observed(split: Split) -> Split:
    """Samples with at least one of the node's modalities (the others carry no data here)."""
    keep = split.present_any()
    return split if keep.all() else split.subset(np.nonzero(keep)[0])


def hide_labels(split: Split, fraction: float, seed: int) -> Split:
    """Keep labels on a seeded ``fraction`` of samples, set the rest to -1 (unlabelled)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"partition.label_fraction must be in [0, 1], got {fraction}")
    if fraction == 1.0:
        return split
    rng = np.random.default_rng(seed)
    n = len(split)
    hidden = np.ones(n, dtype=bool)
    hidden[rng.permutation(n)[: int(round(fraction * n))]] = False
    y = {t: np.where(hidden, -1, v) for t, v in split.y.items()}
    return Split(split.x, split.mask, y, split.site, split.subject, split.extra)


def build_layout(cfg: dict) -> FederationLayout:
    """Layout from the experiment config (``data``, ``partition``, ``seed``, ``shift``,
    ``shift_unit``); cached.  A config without ``shift`` (older runs) means no shift."""
    key = json.dumps(
        {
            **{k: cfg[k] for k in ("data", "partition", "seed")},
            "shift": shift_entries(cfg),
            "shift_unit": shift_unit(cfg),
        },
        sort_keys=True,
    )
    return _layout_cached(key)


def shift_entries(cfg: dict) -> list:
    """The config's ``shift`` list as plain data ([] when absent); validated early so a
    typo fails before any data is generated."""
    raw = cfg.get("shift") or []
    if isinstance(raw, dict):
        raw = raw.get("transforms") or []
    parse_shift_config(raw)
    return list(raw)


def shift_unit(cfg: dict) -> str:
    """``shift_unit``: what a shift entry's site is (``node`` or ``site``)."""
    unit = str(setting(cfg, "shift_unit"))
    if unit not in SHIFT_UNITS:
        raise ValueError(f"shift_unit={unit!r}: expected one of {', '.join(SHIFT_UNITS)}")
    return unit


@lru_cache(maxsize=4)
def _layout_cached(key: str) -> FederationLayout:
    cfg = json.loads(key)
    seed, part = int(cfg["seed"]), block(cfg, "partition")
    raw = load_raw_dataset(cfg["data"], seed)
    plan_in = parse_plan(part["plan"])
    num_nodes = node_count(part)  # refuses a num_nodes the plan contradicts
    plan = modality_plan(
        list(raw.meta.modalities),
        num_nodes,
        plan=plan_in,
        missing_rate=float(part["missing_rate"]),
        shared=part["shared"],
        seed=seed,
        withhold=parse_plan(part["withhold"]),
    )
    # shifts change inputs only (labels, sites and sample order stay), so partitioning
    # the raw dataset gives the same parts as partitioning the featurized one
    splits = raw.splits()  # train, test (, val)
    parts = _partition_splits(splits, part, num_nodes, seed, raw)
    val_fraction = check_val_fraction(part["val_fraction"])
    if raw.val is None:  # each node holds back a stratified share of its training data
        by = part["label_task"] or next(iter(raw.meta.tasks))
        parts["train"], parts["val"] = carve_validation(
            parts["train"], raw.train.y[by], val_fraction, seed
        )
    unit, entries = cfg["shift_unit"], cfg["shift"]
    # a carved share is still part of the training split and of its node's site
    site_parts = dict(parts)
    if raw.val is None:
        site_parts["train"] = [
            np.concatenate([t, v]) for t, v in zip(parts["train"], parts["val"], strict=True)
        ]
    sites = {name: _site_ids(split, site_parts[name], unit) for name, split in splits.items()}
    if entries:
        if unit == "site" and any(s is None for s in sites.values()):
            raise ValueError("shift_unit=site needs a 'site' array in the dataset; use node")
        shifted = {
            name: apply_shifts(split, sites[name], entries, seed, specs=raw.meta.modalities)
            for name, split in splits.items()
        }
        ds = featurize_dataset(
            MultisensoryDataset(raw.meta, shifted["train"], shifted["test"], shifted.get("val"))
        )
    else:  # exactly the pre-shift code path: bit-identical data
        ds = load_experiment_dataset(cfg["data"], seed)
    return FederationLayout(
        ds,
        plan,
        parts["train"],
        parts["test"],
        float(part["label_fraction"]),
        seed,
        train_sites=sites["train"],
        test_sites=sites["test"],
        shift=entries,
        shift_unit=unit,
        val_parts=parts["val"],
        val_source="train" if raw.val is None else "val",
        val_sites=sites.get("val"),
    )


def _site_ids(split: Split, parts: list[np.ndarray], unit: str) -> np.ndarray | None:
    """Each sample's site under ``unit``: its node, or the dataset's ``site`` array."""
    if unit == "site":
        return None if split.site is None else np.asarray(split.site, dtype=np.int64)
    return site_ids_from_parts(parts, len(split))


# seeds the follow-train split of each evaluation split apart from the other's
_FOLLOW_STREAM = {"val": 1, "test": 2}


def _partition_splits(
    splits: dict[str, Split], part: dict, num_nodes: int, seed: int, ds
) -> dict[str, list[np.ndarray]]:
    """Each split's node parts.  Dirichlet with ``partition.eval_follows_train`` (the
    default) draws the label skew once, on train, and gives each node its val/test
    samples by class in proportion to its training share (:mod:`.follow_train`);
    otherwise every split is partitioned on its own, as the scheme says."""
    train = _partition(splits["train"], part, num_nodes, seed, ds)
    out = {"train": train}
    follow = part["scheme"] == "dirichlet" and bool(part["eval_follows_train"])
    by = part["label_task"] or next(iter(ds.meta.tasks))
    for name, split in splits.items():
        if name == "train":
            continue
        if not follow:
            out[name] = _partition(split, part, num_nodes, seed, ds)
            continue
        out[name] = partition_like_train(
            train, splits["train"].y[by], split.y[by], seed=(seed, _FOLLOW_STREAM[name])
        )
        empty = empty_nodes(out[name])
        if empty:  # allowed: such a node trains, and reports no score on this split
            log.warning(
                "partition: node(s) %s got no %s sample (their training share of every "
                "%s class rounds to 0); they report no %s score, and the global %s set "
                "is still the whole split",
                empty, name, name, name, name,
            )  # fmt: skip
    return out


def _partition(split: Split, part: dict, num_nodes: int, seed: int, ds) -> list[np.ndarray]:
    scheme = part["scheme"]
    by = part["label_task"] or next(iter(ds.meta.tasks))
    natural_key = part["natural_key"]
    natural = getattr(split, natural_key, None) if scheme == "natural" else None
    if scheme == "natural" and natural is None:
        raise ValueError(f"partition.scheme=natural needs a '{natural_key}' array in the dataset")
    return partition_indices(
        num_nodes,
        scheme,
        seed,
        labels=split.y[by],
        natural_ids=natural,
        alpha=float(part["alpha"]),
        min_partition_size=int(part["min_partition_size"]),
    )
