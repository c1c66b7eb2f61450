"""The nodes' LM-stage uploads on disk: what a federated run collected over Flower.

``server/llm_uploads.py`` writes the records the nodes sent (``query.llm_upload``) to
``<run>/uploads``; the central stage reads them back with ``llm.upload.dir``.  One
safetensors file per node and part, holding exactly the arrays of the node's
``ArrayRecord``; ``meta.json`` (the dataset's public description: modalities, tasks,
class names, the form :func:`fed_iotlm.data.exchange.load_meta` checks) and
``manifest.json`` (which partition wrote which file, the privacy knobs, the bytes).

Written into a temporary directory beside the target and renamed into place, so a
crash leaves either the old directory or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

from fed_iotlm.data.dataset import DatasetMeta

from .uploads import PARTS, upload_bytes

MANIFEST, META = "manifest.json", "meta.json"


@dataclass
class StoredUploads:
    """Uploads as read back: per part, one record per node in partition order."""

    meta: DatasetMeta
    records: dict[str, list[ArrayRecord]]
    partitions: list[int]
    manifest: dict


def save_uploads(
    directory: Path,
    by_partition: dict[int, dict[str, ArrayRecord]],
    meta: DatasetMeta,
    info: dict,
) -> Path:
    """Write every node's records (``partition -> part -> record``) to ``directory``;
    ``info`` (privacy knobs, missing nodes, ...) goes into the manifest as given."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        files: dict[str, list[str]] = {p: [] for p in PARTS}
        sizes: dict[str, list[int]] = {p: [] for p in PARTS}
        for pid in sorted(by_partition):
            for part in PARTS:
                record = by_partition[pid].get(part)
                if record is None:
                    raise ValueError(f"partition {pid}'s upload lacks its {part!r} part")
                name = f"node{pid}.{part}.safetensors"
                save_file({k: np.ascontiguousarray(a.numpy()) for k, a in record.items()},
                          str(tmp / name))  # fmt: skip
                files[part].append(name)
                sizes[part].append(upload_bytes(record))
        manifest = {
            **info,
            "partitions": sorted(by_partition),
            "files": files,
            "upload_bytes": sizes,
        }
        (tmp / META).write_text(json.dumps(meta.to_json(), indent=2))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if directory.exists():  # an earlier collection of this run: replaced whole
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_uploads(directory: str | os.PathLike[str]) -> StoredUploads:
    """Read what :func:`save_uploads` wrote; a missing or altered file is an error that
    names it."""
    from fed_iotlm.data.exchange import load_meta

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"llm.upload.dir={directory}: no {MANIFEST} there; point it at the uploads a "
            "federated run collected (<run>/uploads, written with llm.upload.collect=true)"
        )
    manifest = json.loads(manifest_path.read_text())
    records: dict[str, list[ArrayRecord]] = {}
    for part in PARTS:
        records[part] = []
        for name, size in zip(manifest["files"][part], manifest["upload_bytes"][part], strict=True):
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {manifest_path} but missing")
            record = ArrayRecord({k: Array(v) for k, v in load_file(str(path)).items()})
            if upload_bytes(record) != int(size):
                raise ValueError(
                    f"{path}: {upload_bytes(record)} bytes of arrays, {manifest_path} "
                    f"says {size}: the file was altered after the run wrote it"
                )
            records[part].append(record)
    return StoredUploads(load_meta(directory), records, list(manifest["partitions"]), manifest)
