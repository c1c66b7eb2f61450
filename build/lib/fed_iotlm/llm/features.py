"""Frozen sensor features from the federation's model bundle.

The encoders never train in the LM stage, so every sample's per-modality tokens and
the fused multisensory embedding are computed once, in batches, and looked up by row:
tuning then costs only the LM.  ``fused`` is what the federated classifier heads read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fed_iotlm.data.dataset import Split
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors

FUSED = "fused"


@dataclass
class SensorFeatures:
    """Per-row features of one split: ``feats[m]`` [N, D], ``present`` [N, M] in ``names``
    order (``fused`` is present wherever any modality is)."""

    names: list[str]
    feats: dict[str, torch.Tensor]
    present: torch.Tensor
    head_pred: dict[str, torch.Tensor]  # the federated classifier's prediction per task

    def rows(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {m: v[idx] for m, v in self.feats.items()}, self.present[idx]

    def to(self, device: torch.device | str) -> SensorFeatures:
        return SensorFeatures(
            self.names,
            {m: v.to(device) for m, v in self.feats.items()},
            self.present.to(device),
            self.head_pred,
        )

    @property
    def dim(self) -> int:
        return int(next(iter(self.feats.values())).shape[1])


@torch.no_grad()
def sensor_features(
    model: MultisensoryModel, split: Split, batch_size: int = 512, use_fused: bool = True
) -> SensorFeatures:
    """Encode ``split`` (standardised like the federation's test data) with the bundle."""
    model.eval()
    data = SplitTensors.from_split(split)
    mods = [m for m in model.modality_names if m in data.x]
    if not mods:
        raise ValueError(
            f"the model bundle encodes {model.modality_names}; the data has {list(data.x)}"
        )
    names = mods + ([FUSED] if use_fused else [])
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in names}
    preds: dict[str, list[torch.Tensor]] = {t: [] for t in model.head}
    for i in range(0, len(data), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(data)))
        x, mask, _ = data.batch(idx, mods)
        tokens = model.encode(x)
        for m in mods:
            chunks[m].append(tokens[m])
        fused = model.fuse(tokens, mask)
        if use_fused:
            chunks[FUSED].append(fused)
        for t, logits in model.logits_from_tokens(tokens, mask).items():
            preds[t].append(logits.argmax(-1))
    present = torch.stack([data.mask[m] for m in mods], 1)
    if use_fused:
        present = torch.cat([present, present.any(1, keepdim=True)], 1)
    return SensorFeatures(
        names,
        {m: torch.cat(v) for m, v in chunks.items()},
        present,
        {t: torch.cat(v) for t, v in preds.items()},
    )
