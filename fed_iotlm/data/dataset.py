"""In-memory form of a multisensory dataset: arrays per modality, presence masks, labels.

Every array is indexed by sample on axis 0.  A missing modality for a sample is
``mask[m][i] == False`` and its values are zeros (never NaN), so tensors built from a
split are always finite; models must read the mask, not the zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .modalities import ModalitySpec, TaskSpec


@dataclass(frozen=True)
class DatasetMeta:
    """What ``meta.json`` says: the dataset's name, modalities and tasks."""

    name: str
    modalities: dict[str, ModalitySpec]
    tasks: dict[str, TaskSpec]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "modalities": {m: s.to_json() for m, s in self.modalities.items()},
            "tasks": {t: s.to_json() for t, s in self.tasks.items()},
        }


@dataclass
class Split:
    """One split (train or test) of a dataset, or any subset of it."""

    x: dict[str, np.ndarray]
    mask: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    site: np.ndarray | None = None
    subject: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        for arr in self.y.values():
            return int(arr.shape[0])
        for arr in self.x.values():
            return int(arr.shape[0])
        return 0

    @property
    def modalities(self) -> list[str]:
        return list(self.x)

    def subset(self, indices: np.ndarray) -> Split:
        """Rows ``indices`` of every array (a copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split(
            x={m: v[idx] for m, v in self.x.items()},
            mask={m: v[idx] for m, v in self.mask.items()},
            y={t: v[idx] for t, v in self.y.items()},
            site=None if self.site is None else self.site[idx],
            subject=None if self.subject is None else self.subject[idx],
            extra={k: v[idx] for k, v in self.extra.items()},
        )

    def keep_modalities(self, modalities: list[str] | tuple[str, ...]) -> Split:
        """The same samples with only ``modalities`` kept (the rest are dropped entirely)."""
        missing = [m for m in modalities if m not in self.x]
        if missing:
            raise KeyError(f"modalities {missing} are not in this split ({self.modalities})")
        return Split(
            x={m: self.x[m] for m in modalities},
            mask={m: self.mask[m] for m in modalities},
            y=dict(self.y),
            site=self.site,
            subject=self.subject,
            extra=dict(self.extra),
        )

    def present_any(self) -> np.ndarray:
        """Boolean [N]: the sample has at least one present modality."""
        if not self.mask:
            return np.zeros(len(self), dtype=bool)
        return np.logical_or.reduce([m for m in self.mask.values()])


@dataclass
class MultisensoryDataset:
    """A dataset in memory: its meta plus a train and a test split, and optionally a
    validation split (``val.npz``).  Without one, the federation carves a validation
    share from each node's training data (:mod:`fed_iotlm.data.validation`), so every
    choice a run makes can be made without looking at test."""

    meta: DatasetMeta
    train: Split
    test: Split
    val: Split | None = None

    def splits(self) -> dict[str, Split]:
        """The splits present, by name (``val`` only when the dataset has one)."""
        out = {"train": self.train, "test": self.test}
        if self.val is not None:
            out["val"] = self.val
        return out
