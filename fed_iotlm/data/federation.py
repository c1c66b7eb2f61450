"""The data side of a simulated federation: which samples and modalities each node holds.

Built deterministically from the experiment config, so the ServerApp and every
ClientApp (possibly in other processes) derive the same layout without exchanging
data.  Each node standardises with statistics of its own training data only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from .dataset import MultisensoryDataset, Split
from .exchange import load_dataset
from .partition import modality_plan, partition_indices
from .preprocess import Standardizer, featurize_dataset
from .synthetic import SyntheticConfig, make_synthetic


def parse_plan(plan) -> list[list[str]] | None:
    """A plan from Hydra (list of lists) or from a Flower run config ("imu,audio;imu")."""
    if plan is None or plan == "" or plan == []:
        return None
    if isinstance(plan, str):
        return [[m.strip() for m in node.split(",") if m.strip()] for node in plan.split(";")]
    return [list(node) for node in plan]


def load_experiment_dataset(data_cfg: dict, seed: int) -> MultisensoryDataset:
    """The featurized dataset named by ``data_cfg`` (synthetic generator or a directory)."""
    return _load_cached(json.dumps(data_cfg, sort_keys=True), seed)


@lru_cache(maxsize=4)
def _load_cached(data_json: str, seed: int) -> MultisensoryDataset:
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
    return featurize_dataset(raw)


def select_modalities(ds: MultisensoryDataset, keep: list[str]) -> MultisensoryDataset:
    """The dataset restricted to ``keep`` (``data.modalities``); samples left with no
    modality at all are removed, and how many is reported in the error if that is all."""
    unknown = [m for m in keep if m not in ds.meta.modalities]
    if unknown:
        raise ValueError(f"data.modalities names {unknown}, not in {list(ds.meta.modalities)}")
    meta = replace(ds.meta, modalities={m: ds.meta.modalities[m] for m in keep})
    splits = []
    for split in (ds.train, ds.test):
        sub = split.keep_modalities(keep)
        present = sub.present_any()
        if not present.any():
            raise ValueError(f"data.modalities={keep}: no sample has any of them")
        splits.append(sub if present.all() else sub.subset(np.nonzero(present)[0]))
    return MultisensoryDataset(meta, splits[0], splits[1])


@dataclass
class FederationLayout:
    """Dataset plus, per node, its modalities and its train/test sample indices."""

    dataset: MultisensoryDataset
    plan: list[list[str]]
    train_parts: list[np.ndarray]
    test_parts: list[np.ndarray]
    label_fraction: float
    seed: int

    @property
    def num_nodes(self) -> int:
        return len(self.plan)

    def node_data(self, node: int) -> tuple[Split, Split]:
        """Node ``node``'s (train, test) with only its modalities, standardised with its
        own training statistics, and training labels hidden beyond ``label_fraction``."""
        mods = self.plan[node]
        train = self.dataset.train.subset(self.train_parts[node]).keep_modalities(mods)
        test = self.dataset.test.subset(self.test_parts[node]).keep_modalities(mods)
        train, test = _only_observed(train), _only_observed(test)
        train = hide_labels(train, self.label_fraction, self.seed * 1000 + node)
        scaler = Standardizer.fit(train)
        return scaler.transform(train), scaler.transform(test)


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
    """Layout from the experiment config (``data``, ``partition``, ``seed``); cached."""
    key = json.dumps({k: cfg[k] for k in ("data", "partition", "seed")}, sort_keys=True)
    return _layout_cached(key)


@lru_cache(maxsize=4)
def _layout_cached(key: str) -> FederationLayout:
    cfg = json.loads(key)
    seed, part = int(cfg["seed"]), cfg["partition"]
    ds = load_experiment_dataset(cfg["data"], seed)
    plan_in = parse_plan(part.get("plan"))
    num_nodes = len(plan_in) if plan_in else int(part["num_nodes"])
    plan = modality_plan(
        list(ds.meta.modalities),
        num_nodes,
        plan=plan_in,
        missing_rate=float(part.get("missing_rate", 0.0)),
        shared=part.get("shared"),
        seed=seed,
    )
    parts = []
    for split in (ds.train, ds.test):
        parts.append(_partition(split, part, num_nodes, seed, ds))
    return FederationLayout(
        ds, plan, parts[0], parts[1], float(part.get("label_fraction", 1.0)), seed
    )


def _partition(split: Split, part: dict, num_nodes: int, seed: int, ds) -> list[np.ndarray]:
    scheme = part.get("scheme", "iid")
    by = part.get("label_task") or next(iter(ds.meta.tasks))
    natural_key = part.get("natural_key", "site")
    natural = getattr(split, natural_key, None) if scheme == "natural" else None
    if scheme == "natural" and natural is None:
        raise ValueError(f"partition.scheme=natural needs a '{natural_key}' array in the dataset")
    return partition_indices(
        num_nodes,
        scheme,
        seed,
        labels=split.y[by],
        natural_ids=natural,
        alpha=float(part.get("alpha", 0.5)),
        min_partition_size=int(part.get("min_partition_size", 5)),
    )
