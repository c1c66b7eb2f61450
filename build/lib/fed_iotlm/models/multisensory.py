"""The multisensory multitask model: encoders per modality, masked fusion, heads per task.

Its ``state_dict`` keys are the parameter groups that cross the wire:
``enc.<modality>.*``, ``fusion.*`` and ``head.<task>.*``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fed_iotlm.data.dataset import MultisensoryDataset
from fed_iotlm.data.modalities import ModalitySpec

from .encoders import build_encoder
from .fusion import MaskedAttentionFusion
from .heads import ReconstructionHead, TaskHead


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the architecture (saved next to the weights)."""

    modalities: dict[str, dict]  # name -> {"kind": str, "feature_shape": [..]}
    tasks: dict[str, int]  # name -> number of classes
    dim: int = 64
    fusion_layers: int = 1
    fusion_heads: int = 4
    use_mask: bool = True
    fusion: str = "attention"  # attention (masked) | late (mean of per-modality logits)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dataset(
        cls,
        ds: MultisensoryDataset,
        *,
        dim: int = 64,
        fusion_layers: int = 1,
        fusion_heads: int = 4,
        use_mask: bool = True,
    ) -> ModelSpec:
        """Read kinds from meta and per-sample feature shapes from the (featurized) arrays."""
        mods = {
            m: {"kind": spec.kind, "feature_shape": list(ds.train.x[m].shape[1:])}
            for m, spec in ds.meta.modalities.items()
        }
        tasks = {t: spec.num_classes for t, spec in ds.meta.tasks.items()}
        return cls(mods, tasks, dim, fusion_layers, fusion_heads, use_mask)

    def to_json(self) -> dict:
        return asdict(self)


class MultisensoryModel(nn.Module):
    """Encoders -> masked attention fusion -> one head per task.

    ``forward`` takes any subset of modalities: a modality absent from ``x`` (or masked
    False for a sample) contributes no token for that sample.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.modality_names = list(spec.modalities)
        self.enc = nn.ModuleDict(
            {
                m: build_encoder(
                    ModalitySpec(m, info["kind"]), tuple(info["feature_shape"]), spec.dim
                )
                for m, info in spec.modalities.items()
            }
        )
        self.fusion = MaskedAttentionFusion(spec.dim, spec.fusion_heads, spec.fusion_layers)
        self.head = nn.ModuleDict({t: TaskHead(spec.dim, k) for t, k in spec.tasks.items()})
        # decoders that reconstruct a modality from its token (MMBind's self-supervised
        # shared-modality rounds); absent unless the spec asks for them
        self.dec = nn.ModuleDict(
            {
                m: ReconstructionHead(spec.dim, tuple(spec.modalities[m]["feature_shape"]))
                for m in spec.extra.get("decoders", [])
            }
        )

    def encode(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-modality tokens [B, D] (what MMBind binding exchanges between nodes)."""
        return {m: self.enc[m](x[m]) for m in self.modality_names if m in x}

    def fuse(
        self, tokens: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Fused embedding [B, D] from tokens, own or received from binding partners."""
        names = [m for m in self.modality_names if m in tokens]
        if not names:
            raise ValueError(
                "no modality given; expected some of " + ", ".join(self.modality_names)
            )
        stacked = torch.stack([tokens[m] for m in names], dim=1)
        mask = torch.stack([present[m] for m in names], dim=1)
        return self.fusion(stacked, mask)

    def embed(self, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused embedding [B, D] from whichever modalities are given."""
        if not self.spec.use_mask:
            return self._embed_zero_filled(x)
        return self.fuse(self.encode(x), mask)

    def classify(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: head(z) for t, head in self.head.items()}

    def _embed_zero_filled(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Naive baseline: every modality is fed (zeros where absent) and counts as observed."""
        ref = next(iter(x.values()))
        inputs = [
            x[m]
            if m in x
            else ref.new_zeros((ref.shape[0], *self.spec.modalities[m]["feature_shape"]))
            for m in self.modality_names
        ]
        tokens = torch.stack(
            [self.enc[m](v) for m, v in zip(self.modality_names, inputs, strict=True)], 1
        )
        present = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self.fusion(tokens, present)

    def forward(
        self, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if not self.spec.use_mask:
            return self.classify(self._embed_zero_filled(x))
        return self.logits_from_tokens(self.encode(x), mask)

    def logits_from_tokens(
        self, tokens: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Task logits from modality tokens (own, or received from binding partners).

        ``attention``: masked fusion, then the heads.  ``late`` (Harmony's first stage):
        each present modality classified alone by the shared heads, logits averaged.
        """
        if self.spec.fusion != "late":
            return self.classify(self.fuse(tokens, present))
        names = [m for m in self.modality_names if m in tokens]
        mask = torch.stack([present[m] for m in names], 1).float()  # [B, M]
        denom = mask.sum(1, keepdim=True).clamp(min=1.0)
        out = {}
        for t, head in self.head.items():
            logits = torch.stack([head(tokens[m]) for m in names], 1)  # [B, M, K]
            out[t] = (logits * mask[..., None]).sum(1) / denom
        return out
