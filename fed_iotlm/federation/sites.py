"""Write each simulated node's share of the configured dataset as its own site directory.

A deployment rehearsal on one machine (docs/deploy.md) needs per-site data that a
SuperNode reads through ``--node-config data-dir=...`` the way a real site would read
its own recordings.  Exporting the simulation partition gives exactly that, and the
site then trains on the very tensors its simulated twin would: the same samples and
modalities (raw, in the exchange format, featurized when loaded), the same labels
hidden beyond ``partition.label_fraction``, standardised with its own statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fed_iotlm.data.dataset import MultisensoryDataset, Split
from fed_iotlm.data.exchange import load_dataset, save_dataset
from fed_iotlm.data.federation import build_layout, hide_labels, select_modalities
from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic


@dataclass(frozen=True)
class SiteExport:
    """One written site: its directory, partition id, modalities and sample counts."""

    path: Path
    partition_id: int
    modalities: list[str]
    num_train: int
    num_test: int


def raw_dataset(data_cfg: dict, seed: int) -> MultisensoryDataset:
    """The configured dataset before featurization (what the exchange format stores)."""
    if data_cfg["name"] == "synthetic":
        fields = SyntheticConfig.__dataclass_fields__
        kwargs = {k: v for k, v in data_cfg.items() if k in fields}
        kwargs.setdefault("seed", seed)
        raw = make_synthetic(SyntheticConfig(**kwargs))
    elif data_cfg["name"] == "npz":
        if not data_cfg.get("path"):
            raise ValueError("data=npz needs data.path=DIR (a dataset in the exchange format)")
        raw = load_dataset(Path(data_cfg["path"]).expanduser())
    else:
        raise ValueError(f"data.name={data_cfg['name']!r}: expected 'synthetic' or 'npz'")
    if data_cfg.get("modalities"):
        raw = select_modalities(raw, list(data_cfg["modalities"]))
    return raw


def _observed(split: Split) -> Split:
    keep = split.present_any()
    return split if keep.all() else split.subset(np.nonzero(keep)[0])


def export_sites(cfg: dict, out_dir: Path, *, force: bool = False) -> list[SiteExport]:
    """Write ``out_dir/site-<i>`` for every node of ``cfg``'s layout; returns what was written.

    Refuses (before writing anything) when a target exists, unless ``force``; even then
    only a directory holding nothing but dataset files is replaced (``save_dataset``).
    """
    layout = build_layout(cfg)
    if getattr(layout, "shift", None):
        raise ValueError("exporting sites with a domain shift (shift=...) is not supported")
    targets = [Path(out_dir) / f"site-{i}" for i in range(layout.num_nodes)]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    raw = raw_dataset(cfg["data"], int(cfg["seed"]))
    written = []
    for i, target in enumerate(targets):
        mods = list(layout.plan[i])
        train = _observed(raw.train.subset(layout.train_parts[i]).keep_modalities(mods))
        test = _observed(raw.test.subset(layout.test_parts[i]).keep_modalities(mods))
        pool = raw.train if layout.val_source == "train" else raw.val
        val = _observed(pool.subset(layout.val_parts[i]).keep_modalities(mods))
        train = hide_labels(train, layout.label_fraction, layout.seed * 1000 + i)
        meta = replace(raw.meta, modalities={m: raw.meta.modalities[m] for m in mods})
        # the node's validation share goes along, so the site validates on what it did
        save_dataset(MultisensoryDataset(meta, train, test, val), target)
        written.append(SiteExport(target, i, mods, len(train), len(test)))
    return written
