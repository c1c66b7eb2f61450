"""What binding puts on the wire, both ways, as Flower records.

Upload (node -> server): node-local sample ids, shared-modality embeddings, the tokens
of the modalities the node holds (with a presence flag), and labels only when the
configuration allows it.  Embeddings are optionally noised, then int8-quantised.
Delivery (server -> node): per lacking modality, the partners' tokens and pair weights
aligned to the node's own sample ids.  No raw sample travels either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from .matching import NodeEmbeddings, Partners
from .privacy import add_noise, dequantize_int8, quantize_int8


@dataclass(frozen=True)
class PrivacyConfig:
    noise_sigma: float = 0.0
    quantize: bool = False


def _put(record: dict, name: str, x: np.ndarray, privacy: PrivacyConfig, seed: int) -> None:
    x = add_noise(np.asarray(x, np.float32), privacy.noise_sigma, seed)
    if privacy.quantize:
        q, scale = quantize_int8(x)
        record[f"{name}.q"], record[f"{name}.scale"] = q, scale
    else:
        record[name] = x


def _get(record: ArrayRecord, name: str) -> np.ndarray:
    if f"{name}.q" in record:
        return dequantize_int8(record[f"{name}.q"].numpy(), record[f"{name}.scale"].numpy())
    return record[name].numpy()


def pack_upload(
    ids: np.ndarray,
    shared: np.ndarray,
    tokens: dict[str, np.ndarray],
    present: dict[str, np.ndarray],
    labels: np.ndarray | None,
    privacy: PrivacyConfig,
    seed: int,
) -> tuple[ArrayRecord, ConfigRecord]:
    arrays: dict[str, np.ndarray] = {"ids": np.asarray(ids, np.int64)}
    _put(arrays, "shared", shared, privacy, seed)
    for i, (m, tok) in enumerate(tokens.items()):
        _put(arrays, f"tok.{m}", tok, privacy, seed + 1 + i)
        arrays[f"present.{m}"] = np.asarray(present[m], np.uint8)
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int64)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return record, ConfigRecord({"modalities": list(tokens)})


def unpack_upload(
    node: str, record: ArrayRecord, config: ConfigRecord, held: list[str]
) -> NodeEmbeddings:
    mods = list(config.get("modalities", []))
    return NodeEmbeddings(
        node=node,
        modalities=held,
        shared=_get(record, "shared"),
        ids=record["ids"].numpy(),
        tokens={m: _get(record, f"tok.{m}") for m in mods},
        labels=record["labels"].numpy() if "labels" in record else None,
        token_present={m: record[f"present.{m}"].numpy().astype(bool) for m in mods},
    )


def pack_partners(partners: dict[str, Partners]) -> ArrayRecord:
    arrays: dict[str, np.ndarray] = {}
    for m, p in partners.items():
        arrays[f"{m}.ids"] = p.query_ids.astype(np.int64)
        arrays[f"{m}.emb"] = p.embeddings.astype(np.float32)
        arrays[f"{m}.weight"] = p.weight.astype(np.float32)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def unpack_partners(record: ArrayRecord) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """modality -> (query ids [n], embeddings [n, k, D], weights [n, k])."""
    mods = sorted({k.rsplit(".", 1)[0] for k in record})
    return {
        m: (record[f"{m}.ids"].numpy(), record[f"{m}.emb"].numpy(), record[f"{m}.weight"].numpy())
        for m in mods
    }
