"""The global model a run starts from: plain, or frozen encoders with federated adapters.

It composes a saved bundle (:mod:`.bundle`, ``sync.bundle``) with the adapters of
:mod:`.adapter_sync`; it lives apart from both so that ``bundle`` (which rebuilds a
bundle's adapters) can import ``adapter_sync`` without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel

from .adapter_sync import attach_sync_adapters, sync_config
from .bundle import load_bundle


def sync_model(cfg: Mapping, spec: ModelSpec) -> MultisensoryModel:
    """The model of a run: plain in ``full`` mode; in ``adapters`` mode loaded from
    ``sync.bundle`` (if given) and carrying frozen encoders with federated adapters.
    The server builds its global model with it; nodes call :func:`attach_sync_adapters`
    (their weights come from the server each round)."""
    model = MultisensoryModel(spec)
    scfg = sync_config(cfg)
    if not scfg.adapters:
        return model
    if scfg.bundle:
        loaded, _ = load_bundle(Path(scfg.bundle))
        try:
            model.load_state_dict(loaded.state_dict())  # strict: same architecture only
        except RuntimeError as err:
            raise ValueError(f"sync.bundle={scfg.bundle}: not this run's model: {err}") from err
    attach_sync_adapters(model, scfg, int(cfg["seed"]))
    return model
