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
    """Partners for every node and every modality it lacks that some other node holds."""
    if cfg.center:
        nodes = _centered(nodes)
    all_mods = sorted({m for n in nodes for m in n.modalities})
    out: dict[str, dict[str, Partners]] = {}
    for i, receiver in enumerate(nodes):
        out[receiver.node] = {}
        for m in all_mods:
            if m in receiver.modalities:
                continue
            donors = [
                j for j, n in enumerate(nodes) if j != i and m in n.modalities and m in n.tokens
            ]
            if donors:
                out[receiver.node][m] = _match_one(receiver, nodes, donors, m, cfg)
    return out


def _match_one(
    receiver: NodeEmbeddings,
    nodes: list[NodeEmbeddings],
    donors: list[int],
    m: str,
    cfg: MatchConfig,
) -> Partners:
    keep = np.concatenate([_donor_rows(nodes[j], m) for j in donors])
    db = np.concatenate([nodes[j].shared for j in donors])[keep]
    db_node = np.concatenate([np.full(len(nodes[j].shared), j) for j in donors])[keep]
    n, k = len(receiver.shared), cfg.k
    sims = np.full((n, k), -np.inf, np.float32)
    rows = np.full((n, k), -1, np.int64)
    if cfg.use_labels and receiver.labels is not None:
        db_lab = np.concatenate(
            [
                nodes[j].labels
                if nodes[j].labels is not None
                else np.full(len(nodes[j].shared), -1)
                for j in donors
            ]
        )
        q_lab = receiver.labels
        for c in np.unique(q_lab[q_lab >= 0]):
            q_sel, d_sel = np.nonzero(q_lab == c)[0], np.nonzero(db_lab == c)[0]
            s, r = top_k(receiver.shared[q_sel], db[d_sel], k, cfg.search)
            sims[q_sel], rows[q_sel] = s, np.where(r >= 0, d_sel[np.maximum(r, 0)], -1)
        free = np.nonzero(q_lab < 0)[0]
    else:
        free = np.arange(n)
    if len(free):
        s, r = top_k(receiver.shared[free], db, k, cfg.search)
        sims[free], rows[free] = s, r
    valid = (rows >= 0) & (sims >= cfg.floor)
    safe = np.where(valid, rows, 0)
    partner_node = np.where(valid, db_node[safe], -1)
    tokens = np.concatenate([nodes[j].tokens[m] for j in donors])[keep]
    emb = np.where(valid[..., None], tokens[safe], 0.0).astype(np.float32)
    ids = np.concatenate([nodes[j].ids for j in donors])[keep]
    partner_ids = np.where(valid, ids[safe], -1)
    return Partners(
        modality=m,
        query_ids=receiver.ids,
        partner_node=partner_node,
        partner_ids=partner_ids,
        similarity=sims,
        weight=np.where(valid, pair_weight(sims, cfg.floor, cfg.weight_power), 0.0).astype(
            np.float32
        ),
        embeddings=emb,
    )


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
