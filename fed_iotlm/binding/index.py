"""Nearest-neighbour search by cosine similarity: faiss on CPU, chunked torch on CUDA.

MMBind pairs samples by the similarity of their shared-modality embeddings.  That is
an inner-product top-k over L2-normalised vectors, which faiss already does at BLAS
speed; we never materialise an N×M similarity matrix beyond ``memory_budget_bytes``.

* ``size <= exact_limit``: ``IndexFlatIP`` (exact).
* larger: ``IndexHNSWFlat`` with inner-product metric (approximate); its recall@1
  against exact search on a sample of queries is measured by :func:`recall_at_1`.
* ``device="cuda"`` (``binding.device``): exact top-k at any size with torch matmuls in
  blocks sized to the budget (:func:`torch_top_k`).  faiss-gpu is not used: the wheel
  installed here is faiss-cpu, and the torch path is exact and needs nothing more.
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
    device: str = "cpu"  # cpu: faiss; cuda[:N]: torch_top_k (binding.device)


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
        return torch_top_k(q, db, k, cfg)
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


def torch_top_k(q: np.ndarray, db: np.ndarray, k: int, cfg: SearchConfig):
    """Exact top-k of normalised rows with torch matmuls on ``cfg.device`` (any torch
    device: the CPU runs it too, which is how tests compare it with faiss).

    Memory stays within ``memory_budget_bytes`` of similarity scores: queries go in row
    chunks and the database in column chunks (a running top-k merges the chunks), so a
    1M x 1M search never holds more than one [rows, cols] block.  float32 throughout
    (TF32 matmuls are off unless the caller enabled them), hence equal to faiss's
    ``IndexFlatIP`` up to float rounding of near-ties.
    """
    import torch

    dev = torch.device(cfg.device)
    dbt = torch.from_numpy(db).to(dev)
    kk = min(k, len(db))
    rows, cols = chunk_shape(len(q), len(db), kk, cfg.memory_budget_bytes)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    host = torch.from_numpy(q)
    if dev.type == "cuda":
        host = host.pin_memory()
    for start in range(0, len(q), rows):
        qt = host[start : start + rows].to(dev, non_blocking=dev.type == "cuda")
        best_s = best_i = None
        for c0 in range(0, len(db), cols):
            block = qt @ dbt[c0 : c0 + cols].T
            s, i = torch.topk(block, min(kk, block.shape[1]), dim=1)
            i = i + c0
            if best_s is not None:  # merge with the columns seen so far
                s, pos = torch.topk(torch.cat([best_s, s], 1), kk, dim=1)
                i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
            best_s, best_i = s, i
        out_s[start : start + rows, :kk] = best_s.cpu().numpy()
        out_i[start : start + rows, :kk] = best_i.cpu().numpy()
    return out_s, out_i


def chunk_shape(n_q: int, n_db: int, k: int, budget_bytes: int) -> tuple[int, int]:
    """(query rows, database columns) of one float32 similarity block within the budget:
    all columns when at least ``MIN_ROWS`` rows fit, else column chunks of the database."""
    cells = max(1, budget_bytes // 4)
    cols = n_db if n_db * min(MIN_ROWS, n_q) <= cells else max(k, cells // MIN_ROWS)
    rows = max(1, min(n_q, cells // cols))
    return rows, cols


MIN_ROWS = 256  # fewer query rows per block would leave a GPU mostly idle


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
