"""Which training instructions each federated-LoRA site holds (``llm.federated.site_split``).

* ``nodes`` (the default when the stage's rows come from the nodes, ``llm.data=nodes``):
  site k *is* federation node k, so it trains only on instructions about the rows node k
  uploaded: its plan's modalities and the labels it holds (rows beyond its
  ``partition.label_fraction`` carry -1, which gives no answer and hence no task
  question).  The number of sites is the plan's node count: ``llm.federated.sites`` is
  ``auto`` or must restate it.  Without this, "federated" LoRA was an IID deal of the
  pooled rows, which no federation of nodes with their own plans and labels looks like.
* ``iid``: the stage's training instructions shuffled (seeded) and dealt round robin over
  ``sites`` (the first version's split), kept as an explicit, named baseline; the only
  split of the toy data, which has no nodes (``auto`` there: :data:`TOY_SITES` sites).

Both split the same pool (the central recipe's instructions: fit rows after the
validation share and the ``llm.train_samples`` cap), so the two differ only in who holds
what.  A question about recordings of two different nodes (``comparison``, ``count``)
belongs to no node and is left out of node sites (counted in :meth:`SiteSplit.report`).

A node without a single training row is an error naming it (a site would serve nothing
it could ever train on, which is a partition mistake).  A node with rows but no
instruction example (none of them labelled, or all of them held for validation or
capped away) makes an *idle* site: the server sends it no round and each round's record
names it (``server/lora_step.py``), never silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .instructions import Example

SPLITS = ("nodes", "iid")
AUTO = "auto"
TOY_SITES = 3  # sites=auto on data without nodes (the toy set): the old default


def resolve_split(requested: str, has_nodes: bool) -> str:
    """``auto``: ``nodes`` when the data has nodes, else ``iid``; ``nodes`` on data
    without nodes is refused (there is no node to make a site of)."""
    if requested == AUTO:
        return "nodes" if has_nodes else "iid"
    if requested not in SPLITS:
        raise ValueError(
            f"llm.federated.site_split={requested!r}: choose {AUTO}, {' or '.join(SPLITS)}"
        )
    if requested == "nodes" and not has_nodes:
        raise ValueError(
            "llm.federated.site_split=nodes needs rows uploaded by the federation's nodes "
            "(llm.data=nodes with llm.bundle); this data has no nodes: use site_split=iid"
        )
    return requested


def site_count(requested: int | str, split: str, num_nodes: int | None) -> int:
    """The number of sites: ``auto`` or a number; node sites must match the plan."""
    if requested == AUTO:
        return num_nodes if num_nodes is not None else TOY_SITES
    try:
        n = int(requested)
    except (TypeError, ValueError):
        raise ValueError(
            f"llm.federated.sites={requested!r}: give {AUTO} or a number of sites"
        ) from None
    if isinstance(requested, bool) or n < 1 or str(n) != str(requested).strip():
        raise ValueError(f"llm.federated.sites={requested!r}: give {AUTO} or a number >= 1")
    if split == "nodes" and n != num_nodes:
        raise ValueError(
            f"llm.federated.sites={n} but the federation's plan has {num_nodes} nodes and "
            f"node sites are the plan's nodes: set llm.federated.sites={AUTO} (or "
            f"{num_nodes}), or llm.federated.site_split=iid for an IID split over {n} sites"
        )
    return n


@dataclass(frozen=True)
class SiteSplit:
    """Each site's training instructions and the rows behind them."""

    split: str
    examples: tuple[tuple[Example, ...], ...]
    rows: tuple[int, ...]  # training rows per site: its node's (nodes), its examples' (iid)
    labelled_rows: tuple[int, ...]  # of those, rows with at least one label
    nodes: tuple[int, ...] | None = None  # the node each site is (nodes)
    dropped: int = 0  # cross-node questions no node site can hold

    @property
    def num_sites(self) -> int:
        return len(self.examples)

    def idle(self) -> dict[int, str]:
        """Sites with no instruction example, and why: they are sent no round."""
        return {
            k: f"partition {k} (node {k}): {self.rows[k]} training rows, "
            f"{self.labelled_rows[k]} labelled, no instruction example"
            if self.split == "nodes"
            else f"partition {k}: no instruction example in its IID share"
            for k, ex in enumerate(self.examples)
            if not ex
        }

    def report(self) -> dict:
        """results.json's ``sites`` block: which split ran, per-site counts, idle sites."""
        return {
            "split": self.split,
            "num_sites": self.num_sites,
            "per_site": [
                {
                    "site": k,
                    **({"node": self.nodes[k]} if self.nodes is not None else {}),
                    "rows": self.rows[k],
                    "labelled_rows": self.labelled_rows[k],
                    "examples": len(ex),
                }
                for k, ex in enumerate(self.examples)
            ],
            "cross_node_examples_left_out": self.dropped,
            "idle": {str(k): why for k, why in self.idle().items()},
        }


def split_sites(
    examples: Sequence[Example],
    split: str,
    sites: int | str,
    seed: int,
    train_nodes: np.ndarray | None = None,
    labelled: np.ndarray | None = None,
    num_nodes: int | None = None,
) -> SiteSplit:
    """The ``split`` (resolved: ``nodes`` or ``iid``) of ``examples`` over ``sites``.

    ``train_nodes``: the node of each training row (``nodes`` needs it), ``labelled``:
    whether each training row has a label (None: all), ``num_nodes``: the plan's count."""
    if split not in SPLITS:
        raise ValueError(f"site split {split!r}: choose {' or '.join(SPLITS)}")
    n_rows = len(train_nodes) if train_nodes is not None else 1 + max(
        (r for ex in examples for r in ex.rows), default=-1
    )  # fmt: skip
    has_label = np.ones(n_rows, bool) if labelled is None else np.asarray(labelled, bool)
    if split == "iid":
        n = site_count(sites, split, num_nodes)
        perm = np.random.default_rng(seed).permutation(len(examples))
        shares = [tuple(examples[i] for i in sorted(perm[k::n])) for k in range(n)]
        used = [sorted({r for ex in share for r in ex.rows}) for share in shares]
        return SiteSplit(
            split, tuple(shares), tuple(len(u) for u in used),
            tuple(int(has_label[u].sum()) for u in used),
        )  # fmt: skip
    if train_nodes is None or num_nodes is None:
        raise ValueError("site_split=nodes needs the node of every training row")
    n = site_count(sites, split, num_nodes)
    owner = np.asarray(train_nodes)
    rows = np.bincount(owner, minlength=n)[:n] if len(owner) else np.zeros(n, np.int64)
    empty = [k for k in range(n) if rows[k] == 0]
    if empty:
        raise ValueError(
            f"node {empty[0]} holds no training rows, so its federated-LoRA site would "
            f"serve nothing (empty nodes: {empty}); fix the partition (e.g. "
            "partition.min_partition_size, fewer nodes) or use site_split=iid"
        )
    held: list[list[Example]] = [[] for _ in range(n)]
    dropped = 0
    for ex in examples:
        nodes = {int(owner[r]) for r in ex.rows}
        if len(nodes) == 1:
            held[nodes.pop()].append(ex)
        else:
            dropped += 1
    return SiteSplit(
        split,
        tuple(tuple(h) for h in held),
        tuple(int(r) for r in rows),
        tuple(int(has_label[owner == k].sum()) for k in range(n)),
        tuple(range(n)),
        dropped,
    )
