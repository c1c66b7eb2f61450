"""Collect the nodes' LM-stage uploads over Flower after the federation's last round.

With ``llm.upload.collect`` the server sends the final model in a ``query.llm_upload``
message to every live node (a chunk at a time, :mod:`.chunked`); each answers with its
frozen-encoder tokens and labels (``clients/llm_upload.py``), never a raw window.  The
records are written to ``<run>/uploads`` (:mod:`fed_iotlm.llm.upload_store`), where the
central stage reads them (``fed-iotlm tune llm.upload.dir=<run>/uploads``).  A node that
fails or stays silent is named in the manifest and in results.json (``llm_uploads``),
not dropped silently; the stage says how many nodes its rows come from.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fed_iotlm.config_schema import block
from fed_iotlm.data.dataset import DatasetMeta
from fed_iotlm.federation.bundle import bundle_digest
from fed_iotlm.llm.upload_store import save_uploads
from fed_iotlm.llm.uploads import PARTS, UPLOAD_QUERY

from .chunked import send_and_receive_chunked

log = logging.getLogger(__name__)

UPLOAD_TYPE = f"{MessageType.QUERY}.{UPLOAD_QUERY}"  # clients/llm_upload.py answers it


def collect_enabled(cfg: dict) -> bool:
    """``llm.upload.collect`` (off by default: a run without an LM stage sends nothing)."""
    return "llm" in cfg and bool(block(cfg, "llm.upload").get("collect", False))


def collect_uploads(
    grid: Grid,
    arrays: ArrayRecord,
    meta: DatasetMeta,
    num_nodes: int,
    out_dir: Path,
    timeout: float,
) -> dict:
    """Ask every node ``grid`` lists for its upload of the final model ``arrays`` (the
    bundle already written to ``out_dir / "bundle"``); write the answers to
    ``out_dir / "uploads"`` with the bundle's digest, so a stage run on another bundle is
    refused; return results.json's ``llm_uploads`` block."""
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 0})}),
            message_type=UPLOAD_TYPE,
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    replies = send_and_receive_chunked(grid, messages, timeout=timeout)
    by_partition: dict[int, dict[str, ArrayRecord]] = {}
    sent_by: dict[str, dict] = {}  # partition -> its modalities and its own privacy knobs
    failed: list[str] = []
    for reply in replies:
        if reply.has_error():
            failed.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        config = reply.content["config"]
        pid = int(config["partition-id"])
        by_partition[pid] = {part: reply.content[part] for part in PARTS}
        sent_by[str(pid)] = {
            "modalities": list(config["modalities"]),
            "noise_sigma": float(config["noise-sigma"]),
            "quantize": bool(config["quantize"]),
        }
    missing = sorted(set(range(num_nodes)) - set(by_partition))
    for line in failed:
        log.warning("llm upload: %s", line)
    if missing:
        log.warning("llm upload: no upload from partition(s) %s", missing)
    if not by_partition:
        raise RuntimeError(
            f"llm.upload.collect: none of the {len(messages)} node(s) sent an upload "
            f"within {timeout:.0f} s ({'; '.join(failed) or 'no reply'})"
        )
    info = {
        "note": "frozen-encoder tokens and labels the nodes sent over Flower (query.llm_upload)",
        "raw_samples_at_centre": 0,
        "nodes_expected": num_nodes,
        "bundle_sha256": bundle_digest(out_dir / "bundle"),  # the encoders behind the tokens
        "missing_partitions": missing,
        "failures": failed,
        "nodes": dict(sorted(sent_by.items(), key=lambda kv: int(kv[0]))),
    }
    path = save_uploads(out_dir / "uploads", by_partition, meta, info)
    log.info("llm upload: %s node(s) -> %s", len(by_partition), path)
    return {**info, "dir": str(path), "partitions": sorted(by_partition)}
