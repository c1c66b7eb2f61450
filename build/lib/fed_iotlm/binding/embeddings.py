"""A node's binding view of its own data: shared-modality embeddings and tokens."""

from __future__ import annotations

import numpy as np
import torch

from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors

from .matching import NodeEmbeddings
from .training import PartnerTensors


@torch.no_grad()
def node_embeddings(
    model: MultisensoryModel,
    data: SplitTensors,
    shared: str,
    node: str,
    label_task: str | None = None,
) -> NodeEmbeddings:
    """Embeddings of the samples whose shared modality is present (ids = row numbers)."""
    if shared not in data.x:
        raise ValueError(f"node {node} does not hold the shared modality {shared!r}")
    model.eval()
    rows = torch.nonzero(data.mask[shared]).squeeze(1)
    x, mask, y = data.batch(rows)
    tokens = model.encode(x)
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
