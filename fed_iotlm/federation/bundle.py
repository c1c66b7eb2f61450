"""The model bundle handed to later stages: safetensors weights + JSON meta.

Written atomically (temp file, then rename) so a crash never leaves half a bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fed_iotlm.atomic import atomic_write
from fed_iotlm.data.preprocess import (
    Standardizer,
    standardizer_from_arrays,
    standardizer_to_arrays,
)
from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel

from .adapter_sync import SyncConfig, attach_sync_adapters
from .records import load_into

WEIGHTS = "model.safetensors"
META = "model.json"


def save_bundle(directory: Path, state: dict[str, np.ndarray], spec: ModelSpec, meta: dict) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (architecture + provenance)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    doc = {"format": "fed-iotlm-bundle/1", "spec": spec.to_json(), **meta}

    def write_meta(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(doc, indent=2))

    atomic_write(directory / META, write_meta)
    return directory


def bundle_digest(directory: Path) -> str:
    """SHA-256 of the bundle's weights file: what ties data derived from a bundle (the LM
    stage's uploaded tokens) to the exact weights that produced it."""
    from .checkpoint import file_sha256

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a model bundle (missing {WEIGHTS})")
    return file_sha256(path)


def load_bundle(directory: Path) -> tuple[MultisensoryModel, dict]:
    """Rebuild the model from a bundle; returns the model and the bundle's meta."""
    directory = Path(directory)
    for name in (WEIGHTS, META):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a model bundle (missing {name})")
    doc = json.loads((directory / META).read_text())
    model = MultisensoryModel(ModelSpec(**doc["spec"]))
    if doc.get("sync"):  # sync.mode=adapters: frozen encoders + the federated adapters
        seed = doc["sync"].get("seed", 0)  # bundle.json (a file payload, not config)
        fields = {k: v for k, v in doc["sync"].items() if k != "seed"}
        attach_sync_adapters(model, SyncConfig(**fields), int(seed))
    load_into(model, load_file(str(directory / WEIGHTS)))
    return model, doc


def statistics_meta(scaler: Standardizer | None) -> dict:
    """The pooled input statistics the bundle's encoders were trained on, for its
    ``model.json``: whoever uses the bundle (the LM stage, ``fed-iotlm ask``, a new
    site) standardises its inputs with these rather than with their own data's."""
    if scaler is None:
        return {}
    arrays = standardizer_to_arrays(scaler)
    return {"input_statistics": {k: np.asarray(v).tolist() for k, v in arrays.items()}}


def bundle_standardizer(doc: dict) -> Standardizer | None:
    """The statistics :func:`statistics_meta` stored (None for bundles without them:
    ``normalization=per_site`` runs and bundles from before they were recorded)."""
    stats = doc.get("input_statistics")
    if not stats:
        return None
    return standardizer_from_arrays({k: np.asarray(v, np.float32) for k, v in stats.items()})
