"""Nearest-neighbour search by cosine similarity: faiss on CPU, chunked torch on CUDA.

MMBind pairs samples by the similarity of their shared-modality embeddings.  That is
an inner-product top-k over L2-normalised vectors, which faiss already does at BLAS
speed; we never materialise an N×M similarity matrix beyond ``memory_budget_bytes``.

* ``size <= exact_limit``: ``IndexFlatIP`` (exact).
* larger: ``IndexHNSWFlat`` with inner-product metric (approximate); its recall@1
  against exact search on a sample of queries is measured by :func:`recall_at_1`.
* ``device="cuda"``: exact top-k with torch matmuls in query chunks sized to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SearchConfig:
    """Index choice and memory limits for one search."""

    exact_limit: int = 200_000  # database size up to which search is exact
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_search: int = 128  # HNSW breadth at query time (recall vs speed)
    hnsw_ef_construction: int = 80
    memory_budget_bytes: int = 512 * 2**20  # for the torch path's similarity blocks
    device: str = "cpu"


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32, contiguous), so inner product = cosine."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def top_k(
    queries: np.ndarray, database: np.ndarray, k: int, cfg: SearchConfig = SearchConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k of each query row among database rows: (similarities, indices) [Q, k].

    Where the database has fewer than ``k`` rows, missing slots hold index -1 and
    similarity -inf.
    """
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"top_k: need [Q, d] and [M, d], got {queries.shape} and {database.shape}")
    q, db = normalize(queries), normalize(database)
    if len(q) == 0 or len(db) == 0:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    if cfg.device.startswith("cuda"):
        return _torch_top_k(q, db, k, cfg)
    return _faiss_top_k(q, db, k, cfg)


def build_faiss_index(db: np.ndarray, cfg: SearchConfig):
    """Exact flat index for small databases, HNSW beyond ``exact_limit``."""
    from fed_iotlm.extras import require

    faiss = require("faiss", "MMBind's binding search (method=mmbind)")

    d = db.shape[1]
    if len(db) <= cfg.exact_limit:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = max(cfg.hnsw_ef_search, 1)
    index.add(db)
    return index


def _faiss_top_k(q: np.ndarray, db: np.ndarray, k: int, cfg: SearchConfig):
    index = build_faiss_index(db, cfg)
    sims, ids = index.search(q, k)
    sims = np.where(ids < 0, -np.inf, sims).astype(np.float32)
    return sims, ids.astype(np.int64)


def _torch_top_k(q: np.ndarray, db: np.ndarray, k: int, cfg: SearchConfig):
    import torch

    dev = torch.device(cfg.device)
    dbt = torch.from_numpy(db).to(dev)
    kk = min(k, len(db))
    rows = max(1, cfg.memory_budget_bytes // (4 * len(db)))
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    for start in range(0, len(q), rows):
        block = torch.from_numpy(q[start : start + rows]).to(dev) @ dbt.T
        s, i = torch.topk(block, kk, dim=1)
        out_s[start : start + rows, :kk] = s.cpu().numpy()
        out_i[start : start + rows, :kk] = i.cpu().numpy()
    return out_s, out_i


def recall_at_1(
    queries: np.ndarray,
    database: np.ndarray,
    approx_ids: np.ndarray,
    sample: int = 1000,
    seed: int = 0,
) -> float:
    """Share of sampled queries whose approximate top-1 equals the exact top-1."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(queries), size=min(sample, len(queries)), replace=False)
    _, exact = _faiss_top_k(
        normalize(queries[pick]), normalize(database), 1, SearchConfig(exact_limit=len(database))
    )
    return float(np.mean(exact[:, 0] == approx_ids[pick, 0]))
