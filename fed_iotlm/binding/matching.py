"""Cross-node matching: for each sample, partners on OTHER nodes for each modality it lacks.

Every node uploads shared-modality embeddings of its samples (plus the embeddings of
the modalities it holds, which partners will receive).  For node i and a modality m
that i lacks, the candidates are all samples of nodes j ≠ i that hold m; each of i's
samples gets its top-k candidates by cosine similarity of shared embeddings.
Label-aware matching (``use_labels``) restricts a labelled sample's candidates to
labelled samples of the same class; unlabelled samples are matched without it.
Embeddings are centred on their mean over all nodes first (``center``).
Pairs below the similarity floor keep their slot but get weight 0 and partner -1, so
the receiver sees how many were refused (nothing silently dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .index import SearchConfig, top_k
from .weights import pair_weight


@dataclass
class NodeEmbeddings:
    """One node's binding upload (embeddings only; ids are local to the node)."""

    node: str
    modalities: list[str]
    shared: np.ndarray  # [n, d] shared-modality embeddings
    ids: np.ndarray  # [n] node-local sample ids
    tokens: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> [n, D]
    labels: np.ndarray | None = None  # [n], -1 = unlabelled; only if use_labels
    token_present: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> bool [n]


@dataclass(frozen=True)
class MatchConfig:
    """How pairs are formed and weighted."""

    k: int = 1
    floor: float = 0.0
    weight_power: float = 1.0
    use_labels: bool = False
    center: bool = True
    search: SearchConfig = SearchConfig()


@dataclass
class Partners:
    """For one receiving node and one modality it lacks: k partners per local sample."""

    modality: str
    query_ids: np.ndarray  # [n] the receiver's local sample ids
    partner_node: np.ndarray  # [n, k] index into the node list (-1 = none)
    partner_ids: np.ndarray  # [n, k] the partner node's local sample id (-1 = none)
    similarity: np.ndarray  # [n, k]
    weight: np.ndarray  # [n, k] in [0, 1]
    embeddings: np.ndarray  # [n, k, D] the partners' embeddings of `modality` (0 if none)

    @property
    def refused(self) -> int:
        """Slots left empty (no candidate, or similarity under the floor)."""
        return int((self.partner_ids < 0).sum())


def match_nodes(nodes: list[NodeEmbeddings], cfg: MatchConfig) -> dict[str, dict[str, Partners]]:
    """Partners for every node and every modality it lacks that some other node holds.

    A node that lacks ``m`` never donates it, so every receiver of ``m`` draws from the
    same donors: one search per modality (one faiss index; label-aware, one per class)
    answers all receivers' queries in one batch."""
    if cfg.center:
        nodes = _centered(nodes)
    out: dict[str, dict[str, Partners]] = {n.node: {} for n in nodes}
    for m in sorted({m for n in nodes for m in n.modalities}):
        receivers = [n for n in nodes if m not in n.modalities]
        donors = [j for j, n in enumerate(nodes) if m in n.modalities and m in n.tokens]
        if receivers and donors:
            found = _match_modality(receivers, nodes, donors, m, cfg)
            for receiver, partners in zip(receivers, found, strict=True):
                out[receiver.node][m] = partners
    return out


def _match_modality(
    receivers: list[NodeEmbeddings],
    nodes: list[NodeEmbeddings],
    donors: list[int],
    m: str,
    cfg: MatchConfig,
) -> list[Partners]:
    """Every receiver's partners for modality ``m`` from the ``donors`` (positions in
    ``nodes``), in one batched search."""
    keep = np.concatenate([_donor_rows(nodes[j], m) for j in donors])
    db = np.concatenate([nodes[j].shared for j in donors])[keep]
    db_node = np.concatenate([np.full(len(nodes[j].shared), j) for j in donors])[keep]
    tokens = np.concatenate([nodes[j].tokens[m] for j in donors])[keep]
    ids = np.concatenate([nodes[j].ids for j in donors])[keep]
    queries = np.concatenate([r.shared for r in receivers])
    k = cfg.k
    sims = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    free = np.arange(len(queries))
    if cfg.use_labels:
        q_lab = np.concatenate([_labels_or_none(r) for r in receivers])
        db_lab = np.concatenate([_labels_or_none(nodes[j]) for j in donors])[keep]
        for c in np.unique(q_lab[q_lab >= 0]):
            q_sel, d_sel = np.nonzero(q_lab == c)[0], np.nonzero(db_lab == c)[0]
            s, r = top_k(queries[q_sel], db[d_sel], k, cfg.search)
            sims[q_sel], rows[q_sel] = s, np.where(r >= 0, d_sel[np.maximum(r, 0)], -1)
        free = np.nonzero(q_lab < 0)[0]  # unlabelled samples are matched without labels
    if len(free):
        sims[free], rows[free] = top_k(queries[free], db, k, cfg.search)
    valid = (rows >= 0) & (sims >= cfg.floor)
    safe = np.where(valid, rows, 0)
    weight = np.where(valid, pair_weight(sims, cfg.floor, cfg.weight_power), 0.0)
    out, start = [], 0
    for r in receivers:
        sl = slice(start, start + len(r.shared))
        start = sl.stop
        v = valid[sl]
        out.append(
            Partners(
                modality=m,
                query_ids=r.ids,
                partner_node=np.where(v, db_node[safe[sl]], -1),
                partner_ids=np.where(v, ids[safe[sl]], -1),
                similarity=sims[sl],
                weight=weight[sl].astype(np.float32),
                embeddings=np.where(v[..., None], tokens[safe[sl]], 0.0).astype(np.float32),
            )
        )
    return out


def _labels_or_none(node: NodeEmbeddings) -> np.ndarray:
    """A node's uploaded labels, or -1 (unlabelled) for all its samples if it sent none."""
    return node.labels if node.labels is not None else np.full(len(node.shared), -1)


def _centered(nodes: list[NodeEmbeddings]) -> list[NodeEmbeddings]:
    """Subtract the mean shared embedding over all uploads before cosine matching.

    Encoder outputs share a large common component (LayerNorm + modality token), which
    makes every cosine close to 1; removing the mean leaves what tells samples apart.
    """
    mean = np.concatenate([n.shared for n in nodes]).mean(axis=0, keepdims=True)
    return [replace(n, shared=(n.shared - mean).astype(np.float32)) for n in nodes]


def _donor_rows(node: NodeEmbeddings, m: str) -> np.ndarray:
    """Rows of a donor whose modality ``m`` was observed (others cannot donate it)."""
    present = node.token_present.get(m)
    return np.ones(len(node.shared), dtype=bool) if present is None else present.astype(bool)
