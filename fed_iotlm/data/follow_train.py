"""Give each node its validation and test samples with the class mix of its training data.

A Dirichlet label partition describes a *node*: which classes it sees and how often.
Drawn again for the validation and test splits, it would describe a different node each
time, so a node's validation score would judge it on a class mix it never trained on,
and a small split can make the draw impossible (HAPT's 1 325 validation windows over 21
nodes at alpha 0.1, seed 1: no node assignment gave every node 5 windows).  Here the
draw is made once, on training data (``partition_indices``), and every other split
follows it: each class of the split is cut over the nodes in proportion to each node's
share of that class in training.

Rules, so the result is exact and reproducible:

* Counts per class are a largest-remainder apportionment in integers (each node gets
  the floor of its quota, the leftover samples go to the largest remainders, ties in a
  seeded random order): a node's count of class ``c`` differs from its quota
  ``n_c * train_share`` by less than one sample, and a node that trained on no sample of
  ``c`` gets none of it.
* Which samples of a class go to which node is a seeded shuffle.
* A class present in the split but absent from training (every node's share is 0) is
  spread in proportion to the nodes' training sizes: no node has a claim on it, and
  node size keeps each node's evaluation share close to its training share.
* Unlabelled samples (-1) are one more class, as in the training partition.
* Nothing is dropped and no minimum size is enforced: the minimum size belongs to the
  training draw.  A node with a tiny training share can get no sample of a small split;
  :func:`empty_nodes` names them so the caller can say so.
"""

from __future__ import annotations

import numpy as np


def partition_like_train(
    train_parts: list[np.ndarray],
    train_labels: np.ndarray,
    labels: np.ndarray,
    seed: int | tuple[int, ...],
) -> list[np.ndarray]:
    """Indices (into ``labels``) of each node: sorted int64 arrays covering 0..N-1 once.

    ``train_parts[i]`` indexes ``train_labels`` (node ``i``'s training samples);
    ``labels`` are the labels of the split to distribute (validation or test).
    """
    if not train_parts:
        raise ValueError("partition_like_train needs at least one node's training part")
    train_y = _labels(train_labels, "train_labels")
    y = _labels(labels, "labels")
    node_of = _node_of_each_sample(train_parts, len(train_y))
    classes = np.union1d(np.unique(train_y), np.unique(y))
    num_nodes = len(train_parts)
    # [node, class] training counts, one vectorised bincount
    cls_of_train = np.searchsorted(classes, train_y)
    held = node_of >= 0
    counts = np.bincount(
        node_of[held] * len(classes) + cls_of_train[held], minlength=num_nodes * len(classes)
    ).reshape(num_nodes, len(classes))
    sizes = counts.sum(axis=1)
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
    for k, c in enumerate(classes):
        members = np.flatnonzero(y == c)
        if members.size == 0:
            continue
        members = members[rng.permutation(members.size)]
        weights = counts[:, k] if counts[:, k].sum() > 0 else sizes
        per_node = apportion(members.size, weights, rng)
        for node, share in enumerate(np.split(members, np.cumsum(per_node)[:-1])):
            shares[node].append(share)
    return [
        np.sort(np.concatenate(s)).astype(np.int64) if s else np.zeros(0, dtype=np.int64)
        for s in shares
    ]


def apportion(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``total`` split in proportion to non-negative integer ``weights`` (largest remainder).

    Integer arithmetic throughout, so the parts always sum to ``total`` exactly; ties
    between equal remainders are broken in ``rng``'s order, not by node number (which
    would favour low node ids systematically).
    """
    w = np.asarray(weights, dtype=np.int64)
    whole = int(w.sum())
    if whole <= 0:
        raise ValueError("apportion needs at least one positive weight")
    scaled = np.int64(total) * w
    base, remainder = scaled // whole, scaled % whole
    leftover = total - int(base.sum())
    order = rng.permutation(w.size)
    order = order[np.argsort(-remainder[order], kind="stable")]
    base[order[:leftover]] += 1
    return base


def empty_nodes(parts: list[np.ndarray]) -> list[int]:
    """Nodes that got no sample of a split (allowed; the caller reports them)."""
    return [i for i, p in enumerate(parts) if len(p) == 0]


def _labels(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _node_of_each_sample(parts: list[np.ndarray], n: int) -> np.ndarray:
    """``node_of[j]`` = the node holding training sample ``j`` (-1: none, e.g. carved
    away for validation); an index on two nodes or out of range is an error."""
    node_of = np.full(n, -1, dtype=np.int64)
    for node, part in enumerate(parts):
        idx = np.asarray(part, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"train_parts[{node}] indexes outside 0..{n - 1}")
        if np.any(node_of[idx] >= 0):
            raise ValueError(f"train_parts[{node}] shares samples with an earlier node")
        node_of[idx] = node
    return node_of
