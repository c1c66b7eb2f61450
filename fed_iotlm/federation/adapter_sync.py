"""Adapter-delta federation (``sync.mode=adapters``): frozen encoders, federated adapters.

In ``sync.mode=full`` (default) a node uploads every group it holds, encoders included.
In ``adapters`` mode the shared encoders stay frozen at their initial weights, or at
those of a model bundle (``sync.bundle``: e.g. an earlier federation, so the encoders
are already good), and each encoder gets a low-rank adapter that IS federated: the
modules of :mod:`fed_iotlm.personal` (``sync.kind``: ``adapter`` = low-rank input map
+ bottleneck token adapter, ``lora`` = LoRA on the encoder's Linear layers), there
kept on the node, here averaged by the server.  Nodes train adapters, fusion and heads
and upload only those, so an upload shrinks by the encoders' size.

How it fits the rest without touching the aggregation: adapter parameters live under
``adapter.<m>.*``, which :func:`~fed_iotlm.federation.groups.group_of` maps to the
group ``adapter.<m>``.  A node holding modality ``m`` owns ``adapter.<m>`` instead of
``enc.<m>`` (same sample count), so the node's usual group selection sends the adapter
and never the frozen encoder, the server averages ``adapter.<m>`` over exactly the
holders of ``m``, and ``enc.<m>``, sent by nobody, keeps its value on the server ("a
group nobody sent stays as it was").  Both the server's model and every node's model
carry the same adapters (same seed), so the keys agree on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fed_iotlm.config_schema import block, setting
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.personal import KINDS, attach_adapter, attach_lora

PREFIX = "adapter"  # state-dict prefix, and group name prefix (``adapter.<m>``)
MODES = ("full", "adapters")
METHODS = ("federated", "harmony")  # modality-aware strategies: keys nobody sends are kept


@dataclass(frozen=True)
class SyncConfig:
    """``cfg['sync']``: what nodes federate."""

    mode: str = "full"
    kind: str = "adapter"
    rank: int = 4
    alpha: float = 1.0
    bundle: str | None = None

    @property
    def adapters(self) -> bool:
        return self.mode == "adapters"


def sync_config(cfg: Mapping) -> SyncConfig:
    """The validated ``sync`` block (absent: the schema's ``full``), checked against the
    run's method."""
    s = block(cfg, "sync")
    scfg = SyncConfig(
        mode=str(s["mode"]),
        kind=str(s["kind"]),
        rank=int(s["rank"]),
        alpha=float(s["alpha"]),
        bundle=str(s["bundle"]) if s["bundle"] else None,
    )
    if scfg.mode not in MODES:
        raise ValueError(f"sync.mode={scfg.mode!r}: expected one of {', '.join(MODES)}")
    if scfg.kind not in KINDS:
        raise ValueError(f"sync.kind={scfg.kind!r}: expected one of {', '.join(KINDS)}")
    if scfg.rank < 1:
        raise ValueError(f"sync.rank must be >= 1, got {scfg.rank}")
    if scfg.adapters:
        method = setting(cfg, "method")
        if method not in METHODS:
            raise ValueError(
                f"sync.mode=adapters needs a modality-aware method ({', '.join(METHODS)}), "
                f"not method={method!r}: flwr's plain FedAvg drops the frozen encoders no node "
                "sends, and MMBind trains the shared encoder"
            )
        if block(cfg, "diagnostics")["enabled"]:
            raise ValueError("diagnostics.enabled is not supported with sync.mode=adapters yet")
    return scfg


def attach_sync_adapters(model: MultisensoryModel, scfg: SyncConfig, seed: int) -> None:
    """Give every encoder of ``model`` its federated adapter (``model.adapter[m]``) and
    freeze the encoders.  ``seed`` fixes the adapters' random halves (LoRA's ``A``) the
    same way on the server and on every node; the global torch RNG is left untouched."""
    if hasattr(model, PREFIX):
        raise ValueError("federated adapters are already attached to this model")
    adapters = nn.ModuleDict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m, enc in model.enc.items():
            own = nn.ModuleDict()
            if scfg.kind == "adapter":
                attach_adapter(own, m, enc, model, scfg.rank, prefix="")
            else:
                attach_lora(own, m, enc, scfg.rank, scfg.alpha, prefix="")
            adapters[m] = own
    model.add_module(PREFIX, adapters)
    for p in model.enc.parameters():
        p.requires_grad_(False)


def adapter_counts(counts: Mapping[str, float]) -> dict[str, float]:
    """A node's group counts in adapters mode: ``enc.<m>`` becomes ``adapter.<m>``."""
    return {
        (f"{PREFIX}.{g[len('enc.') :]}" if g.startswith("enc.") else g): n
        for g, n in counts.items()
    }


def sync_meta(cfg: Mapping) -> dict:
    """What a bundle records so :func:`~fed_iotlm.federation.bundle.load_bundle` can
    rebuild the adapters (nothing in ``full`` mode)."""
    scfg = sync_config(cfg)
    return {"sync": {**asdict(scfg), "seed": int(cfg["seed"])}} if scfg.adapters else {}
