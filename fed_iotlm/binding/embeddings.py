"""A node's binding view of its own data: shared-modality embeddings and tokens."""

from __future__ import annotations

import numpy as np
import torch

from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors

from .matching import NodeEmbeddings, Partners
from .training import PartnerTensors


@torch.no_grad()
def node_embeddings(
    model: MultisensoryModel,
    data: SplitTensors,
    shared: str,
    node: str,
    label_task: str | None = None,
    batch_size: int = 1024,
) -> NodeEmbeddings:
    """Embeddings of the samples whose shared modality is present (ids = row numbers),
    encoded ``batch_size`` rows at a time so memory stays flat at any node size."""
    if shared not in data.x:
        raise ValueError(f"node {node} does not hold the shared modality {shared!r}")
    model.eval()
    rows = torch.nonzero(data.mask[shared]).squeeze(1)
    _, mask, y = data.batch(rows)
    chunks = [
        model.encode(data.batch(rows[i : i + batch_size])[0])
        for i in range(0, len(rows), batch_size)
    ]
    tokens = (
        {m: torch.cat([c[m] for c in chunks]) for m in chunks[0]}
        if chunks
        else {m: data.x[m].new_zeros((0, model.spec.dim)) for m in data.x}
    )
    return NodeEmbeddings(
        node=node,
        modalities=list(data.x),
        shared=tokens[shared].numpy(),
        ids=rows.numpy().astype(np.int64),
        tokens={m: t.numpy() for m, t in tokens.items() if m != shared},
        labels=None if label_task is None else y[label_task].numpy(),
        token_present={m: mask[m].numpy() for m in tokens if m != shared},
    )


def align_partners(
    n: int, partners: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> dict[str, PartnerTensors]:
    """Partners (ids, embeddings, weights) laid out over a node's ``n`` own samples;
    rows without a partner get weight 0."""
    out = {}
    for m, (ids, emb, w) in partners.items():
        full_e = np.zeros((n, *emb.shape[1:]), np.float32)
        full_w = np.zeros((n, w.shape[1]), np.float32)
        full_e[ids], full_w[ids] = emb, w
        out[m] = PartnerTensors(torch.from_numpy(full_e), torch.from_numpy(full_w))
    return out


def raw_partners(partners: Partners, n: int, nodes: list[SplitTensors]) -> PartnerTensors:
    """Partners laid out over a receiver's ``n`` samples with their raw features too
    (centralized MMBind, where every node's samples are at hand): ``nodes[j]`` is the
    training data of the node at position ``j`` of the matching.  Rows without a
    partner get weight 0 and zero features."""
    m = partners.modality
    aligned = align_partners(n, {m: (partners.query_ids, partners.embeddings, partners.weight)})
    ok = partners.partner_ids >= 0
    ref = next(d.x[m] for d in nodes if m in d.x)
    raw = ref.new_zeros((*partners.partner_ids.shape, *ref.shape[1:]))
    for j in np.unique(partners.partner_node[ok]):
        sel = ok & (partners.partner_node == j)
        raw[torch.from_numpy(sel)] = nodes[int(j)].x[m][torch.from_numpy(partners.partner_ids[sel])]
    inputs = ref.new_zeros((n, *raw.shape[1:]))
    inputs[torch.from_numpy(partners.query_ids)] = raw
    return PartnerTensors(aligned[m].embeddings, aligned[m].weight, inputs)
