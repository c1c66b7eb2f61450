"""Server checkpoints: what a ServerApp needs to continue a run after its last round.

A federated run across real sites takes hours and the server is one process: if it
dies at round 40 of 50 the sites' work must not be lost.  After every completed round
the server writes, into ``output_dir/checkpoint/``:

* ``round-<phase>-<round>.safetensors``: the global parameters, the server optimiser's
  state (FedAdam's ``m_t``/``v_t``), MMBind's last binding (the partners each node was
  sent), and the numpy/torch RNG states, as named sections;
* ``state.json``: the round, the phase, the run's history and bookkeeping, Python's RNG
  state, the config it was written under, and the name and SHA-256 of the tensors file.

Both are written to a temp file and renamed (:mod:`fed_iotlm.atomic`), the tensors
first: ``state.json`` is the commit point, so a crash at any moment leaves either the
previous round's checkpoint or this one, never a mix.  Older tensor files are removed
only after the new ``state.json`` is in place.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from fed_iotlm.atomic import atomic_write, atomic_write_text

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
FORMAT = 1
SEP = "/"  # section/key in the tensors file; parameter names never contain it

# config keys that may change between the interrupted run and its resumption
RESUMABLE_KEYS = ("rounds", "resume", "output_dir", "mlflow", "simulation", "llm")
# deadlines inside a block: an operator may give a resumed run more (or less) time
RESUMABLE_NESTED = {
    "strategy": ("round_timeout_s", "wait_for_nodes_s"),
    "secagg": ("timeout_s",),
}
# keys added after checkpoints were first written, with the value their absence meant:
# at that value a key is left out of the comparison, so a checkpoint written before the
# key existed still resumes under the default (and one written under another value does not)
ADDED_KEYS = {"select_round": "last"}


class CheckpointError(ValueError):
    """A checkpoint is unreadable or was written by a different configuration."""


@dataclass
class Checkpoint:
    """One round's server state.  ``sections`` hold arrays by name (``arrays`` is the
    global model); ``meta`` anything JSON can carry."""

    round: int
    phase: str
    sections: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot checkpoint {type(obj).__name__}")


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks (a checkpoint or a bundle's weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically into ``directory``; returns the path of ``state.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat: dict[str, np.ndarray] = {}
    for name, arrays in ckpt.sections.items():
        if SEP in name:
            raise ValueError(f"section name {name!r} contains {SEP!r}")
        for key, value in arrays.items():
            flat[f"{name}{SEP}{key}"] = np.ascontiguousarray(value)
    tensors = directory / f"round-{ckpt.phase}-{ckpt.round:05d}.safetensors"
    atomic_write(tensors, lambda tmp: save_file(flat, tmp))
    state = {
        "format": FORMAT,
        "round": int(ckpt.round),
        "phase": ckpt.phase,
        "tensors": tensors.name,
        "sha256": file_sha256(tensors),
        "sections": sorted(ckpt.sections),
        # safetensors stores keys sorted; the order they had is part of the state (a
        # model's key order decides its packed layout, hence its float sums' order)
        "key_order": {name: list(arrays) for name, arrays in ckpt.sections.items()},
        "meta": ckpt.meta,
    }
    path = directory / STATE_FILE
    atomic_write_text(path, json.dumps(state, default=_jsonable))
    for old in directory.glob("round-*.safetensors"):
        if old.name != tensors.name:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none (a fresh run)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {FORMAT}")
        tensors = Path(directory) / state["tensors"]
        if file_sha256(tensors) != state["sha256"]:
            raise CheckpointError(f"{tensors}: contents do not match {path} (sha256)")
        flat = load_file(str(tensors))
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc
    sections: dict[str, dict[str, np.ndarray]] = {name: {} for name in state["sections"]}
    for flat_key, value in flat.items():
        name, key = flat_key.split(SEP, 1)
        sections[name][key] = value
    for name, keys in state.get("key_order", {}).items():
        if set(keys) != set(sections.get(name, {})):
            raise CheckpointError(f"{path}: section {name!r} does not hold the keys it lists")
        sections[name] = {key: sections[name][key] for key in keys}
    return Checkpoint(int(state["round"]), str(state["phase"]), sections, state["meta"])


# ------------------------------------------------------------------------------ RNG


def capture_rng() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Python's, numpy's (global) and torch's (CPU) generator states as (JSON, arrays)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    arrays = {"numpy_keys": np.asarray(keys), "torch": torch.get_rng_state().numpy().copy()}
    return meta, arrays


def restore_rng(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    n = meta["numpy"]
    np.random.set_state(("MT19937", arrays["numpy_keys"], n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(torch.from_numpy(np.array(arrays["torch"], dtype=np.uint8)))


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Whatever runs inside leaves the generators :func:`capture_rng` covers as they were:
    for work between a resumed run's RNG restore and its first round (opening the MLflow
    run, whose store may draw retry delays from Python's ``random``)."""
    meta, arrays = capture_rng()
    try:
        yield
    finally:
        restore_rng(meta, arrays)


# --------------------------------------------------------------------------- config


def resumable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of the config a resumed run must share with the interrupted one."""
    kept = json.loads(json.dumps({k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS}))
    for key, absent in ADDED_KEYS.items():
        if kept.get(key) == absent:
            del kept[key]
    for block, keys in RESUMABLE_NESTED.items():
        if isinstance(kept.get(block), dict):
            for key in keys:
                kept[block].pop(key, None)
    return kept


def config_differences(saved: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between the checkpoint's config and ``cfg``."""
    from fed_iotlm.settings import flatten

    a, b = flatten(saved), flatten(resumable_config(cfg))
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
