"""Split samples over nodes, and decide which modalities each node holds.

Two independent questions make a federated multisensory setup: *which samples* a node
sees (``partition_indices``: IID, label-skewed Dirichlet, or natural per-site/subject
splits) and *which sensors* it has (``modality_plan``).  Keeping them apart lets a study
vary one while holding the other fixed.

Sample partitioning is delegated to flwr-datasets' partitioners so that our splits are
the ones the Flower community reports results with; we only adapt numpy arrays to the
``datasets.Dataset`` they expect and hand back plain index arrays.  The one exception is
IID, the default: every simulated node builds the layout in its own process, where
importing ``datasets`` and ``flwr_datasets`` (which loads seaborn and scipy.stats) costs
more than the rest of the layout; its split is a seeded permutation cut into contiguous
shards, computed here exactly as ``IidPartitioner`` cuts it (tests/test_partition.py
checks the two agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "natural")


# ------------------------------------------------------------------------------- samples


def partition_indices(
    num_nodes: int,
    scheme: str,
    seed: int,
    *,
    labels: np.ndarray | None = None,
    natural_ids: np.ndarray | None = None,
    alpha: float = 0.5,
    min_partition_size: int = 5,
) -> list[np.ndarray]:
    """Sample indices of each node: ``num_nodes`` sorted int64 arrays covering 0..N-1 once.

    - ``"iid"``: a seeded shuffle, then equal contiguous shards.  N is taken from
      ``labels`` or ``natural_ids`` (whichever is given), which is all it needs from them.
    - ``"dirichlet"``: per-class proportions drawn from Dir(``alpha``) (small alpha = strong
      label skew); needs ``labels``.  Unlabelled samples (-1) are partitioned as one more
      class, so they still land on some node instead of being lost.
    - ``"natural"``: one node per distinct value of ``natural_ids`` (site, subject, ...),
      in sorted id order; the number of distinct ids must equal ``num_nodes``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {list(SCHEMES)}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int | np.integer) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    labels_arr = _as_vector(labels, "labels", integer=True)
    ids_arr = _as_vector(natural_ids, "natural_ids", integer=False)
    n = _num_samples(labels_arr, ids_arr, scheme)
    if num_nodes > n:
        raise ValueError(f"cannot split {n} samples over {num_nodes} nodes")

    if scheme == "iid":
        parts = _iid(num_nodes, n, seed)
    elif scheme == "dirichlet":
        if labels_arr is None:
            raise ValueError("scheme 'dirichlet' needs labels (one integer label per sample)")
        parts = _dirichlet(num_nodes, labels_arr, seed, alpha, min_partition_size)
    else:
        if ids_arr is None:
            raise ValueError("scheme 'natural' needs natural_ids (one site/subject id per sample)")
        parts = _natural(num_nodes, ids_arr)
    _check_cover(parts, n)
    return parts


def _as_vector(values: np.ndarray | None, name: str, *, integer: bool) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array [N], got shape {arr.shape}")
    if integer and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr


def _num_samples(labels: np.ndarray | None, ids: np.ndarray | None, scheme: str) -> int:
    """N from whichever per-sample array is given (they must agree when both are)."""
    if labels is not None and ids is not None and len(labels) != len(ids):
        raise ValueError(f"labels has {len(labels)} samples but natural_ids has {len(ids)}")
    if labels is not None:
        return len(labels)
    if ids is not None:
        return len(ids)
    raise ValueError(
        f"scheme {scheme!r} needs labels or natural_ids (one value per sample) to know the "
        "samples it splits"
    )


def _load_all(partitioner: Any, num_nodes: int) -> list[np.ndarray]:
    """The ``idx`` column of every partition, as sorted int64 index arrays."""
    return [
        np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
        for i in range(num_nodes)
    ]


def _iid(num_nodes: int, n: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation cut into ``num_nodes`` contiguous shards, the first
    ``n % num_nodes`` one sample longer: ``IidPartitioner``'s split of the permuted
    indices (``Dataset.shard(contiguous=True)``), without importing flwr-datasets."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_nodes)]


def _dirichlet(
    num_nodes: int, labels: np.ndarray, seed: int, alpha: float, min_partition_size: int
) -> list[np.ndarray]:
    """Label-skewed split; -1 is simply another value of the ``label`` column."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    partitioner = DirichletPartitioner(
        num_partitions=num_nodes,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_partition_size,
        self_balancing=False,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict(
        {"idx": np.arange(len(labels)).tolist(), "label": labels.astype(np.int64).tolist()}
    )
    try:
        return _load_all(partitioner, num_nodes)
    except ValueError as exc:
        raise ValueError(
            f"dirichlet split of {len(labels)} samples over {num_nodes} nodes could not give "
            f"every node >= {min_partition_size} samples with alpha={alpha}; raise alpha or "
            f"lower min_partition_size ({exc})"
        ) from exc


def _natural(num_nodes: int, ids: np.ndarray) -> list[np.ndarray]:
    """One node per distinct id; a count mismatch is an error, not a silent regroup."""
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    distinct = np.unique(ids)
    if len(distinct) != num_nodes:
        raise ValueError(
            f"scheme 'natural' makes one node per distinct id: natural_ids has "
            f"{len(distinct)} distinct ids but num_nodes is {num_nodes}"
        )
    partitioner = NaturalIdPartitioner(partition_by="natural")
    partitioner.dataset = Dataset.from_dict(
        {"idx": np.arange(len(ids)).tolist(), "natural": ids.tolist()}
    )
    return _load_all(partitioner, num_nodes)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    """Every sample on exactly one node; guards against a partitioner dropping rows."""
    counts = np.bincount(np.concatenate(parts), minlength=n)
    if counts.shape[0] != n or not np.all(counts == 1):
        raise RuntimeError("partition does not cover every sample exactly once")


# ---------------------------------------------------------------------------- modalities


def modality_plan(
    modalities: Sequence[str],
    num_nodes: int,
    *,
    plan: Sequence[Sequence[str]] | None = None,
    missing_rate: float = 0.0,
    shared: str | None = None,
    seed: int = 0,
    withhold: Sequence[Sequence[str]] | None = None,
) -> list[list[str]]:
    """Which modalities each node holds, each list in the order of ``modalities``.

    With ``plan`` the user states it node by node and we only validate.  Otherwise each
    node drops each non-``shared`` modality independently with probability
    ``missing_rate``.  ``shared`` is a modality every node keeps (the anchor that lets
    nodes with different sensors be bound together).

    ``withhold`` (groups of modalities; not with ``plan``) takes group ``i % len(groups)``
    away from node ``i`` and leaves it everything else.  With two groups ``[A, B]`` even
    nodes lack A and odd nodes lack B, so no node ever holds a modality of A together
    with one of B (ExtraSensory's audio and watch, ``extrasensory_withheld``); with more
    groups each node simply lacks one.  The random drops and their repairs then work
    within what is left: a repair never gives a node a modality withheld from it.
    """
    names = list(modalities)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"modalities must be non-empty and distinct, got {names}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int | np.integer) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if shared is not None and shared not in names:
        raise ValueError(f"shared modality {shared!r} is not one of the modalities {names}")
    if plan is not None:
        if withhold:
            raise ValueError(
                "partition.plan and partition.withhold both given: a plan already states "
                "every node's modalities; give one of them"
            )
        return _check_plan(names, num_nodes, plan, shared)
    allowed = _allowed(names, num_nodes, withhold, shared)
    return _random_plan(names, num_nodes, missing_rate, shared, seed, allowed)


def _check_plan(
    names: list[str], num_nodes: int, plan: Sequence[Sequence[str]], shared: str | None
) -> list[list[str]]:
    if len(plan) != num_nodes:
        raise ValueError(f"plan has {len(plan)} node entries but num_nodes is {num_nodes}")
    out: list[list[str]] = []
    for node, entry in enumerate(plan):
        if isinstance(entry, str):
            raise ValueError(f"plan node {node}: expected a list of modality names, got {entry!r}")
        held = list(entry)
        if not held:
            raise ValueError(f"plan node {node}: holds no modality; every node needs at least one")
        for name in held:
            if name not in names:
                raise ValueError(f"plan node {node}: unknown modality {name!r} (known: {names})")
        dups = sorted({m for m in held if held.count(m) > 1})
        if dups:
            raise ValueError(f"plan node {node}: modality {dups[0]!r} listed more than once")
        if shared is not None and shared not in held:
            raise ValueError(f"plan node {node}: lacks the shared modality {shared!r}")
        out.append([m for m in names if m in held])
    return out


def _allowed(
    names: list[str],
    num_nodes: int,
    withhold: Sequence[Sequence[str]] | None,
    shared: str | None,
) -> np.ndarray:
    """[node, modality] True where ``withhold`` lets the node hold the modality.

    Every refusal names the group: an unknown or repeated modality, the shared modality
    (every node must keep it), a group that would leave a node with nothing, and a
    modality withheld from every node (its encoder could never train)."""
    allowed = np.ones((num_nodes, len(names)), dtype=bool)
    if not withhold:
        return allowed
    groups = []
    for g, entry in enumerate(withhold):
        if isinstance(entry, str):
            raise ValueError(
                f"partition.withhold group {g}: expected a list of modality names, got {entry!r}"
            )
        group = list(entry)
        for name in group:
            if name not in names:
                raise ValueError(
                    f"partition.withhold group {g}: unknown modality {name!r} (known: {names})"
                )
        if len(set(group)) != len(group):
            raise ValueError(f"partition.withhold group {g}: a modality is listed twice")
        if shared is not None and shared in group:
            raise ValueError(
                f"partition.withhold group {g}: withholds the shared modality {shared!r}, "
                "which every node must keep"
            )
        if set(group) == set(names):
            raise ValueError(
                f"partition.withhold group {g}: withholds every modality; its nodes would "
                "hold nothing"
            )
        groups.append([names.index(m) for m in group])
    for node in range(num_nodes):
        allowed[node, groups[node % len(groups)]] = False
    never = [names[c] for c in np.flatnonzero(~allowed.any(axis=0))]
    if never:
        raise ValueError(
            f"partition.withhold takes {never} from every one of the {num_nodes} nodes; "
            "no node could train its encoder (to drop a modality, use data.modalities)"
        )
    return allowed


def _random_plan(
    names: list[str],
    num_nodes: int,
    missing_rate: float,
    shared: str | None,
    seed: int,
    allowed: np.ndarray,
) -> list[list[str]]:
    """Independent drops, then two repairs that keep the setup trainable.

    A node left with nothing gets one random modality (a node with no sensor has no data).
    A modality no node holds is then given to one random node: its encoder could never be
    trained, so the federation would carry dead parameters and its evaluation would be
    meaningless.  Neither repair can undo the other, since both only add modalities.
    Both repairs choose only among ``allowed`` cells (``partition.withhold``); with
    everything allowed they draw exactly what they drew before withholding existed.
    """
    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate!r}")
    rng = np.random.default_rng(seed)
    held = (rng.random((num_nodes, len(names))) >= missing_rate) & allowed
    if shared is not None:
        held[:, names.index(shared)] = True
    for node in np.flatnonzero(~held.any(axis=1)):
        choices = np.flatnonzero(allowed[node])
        held[node, choices[rng.integers(len(choices))]] = True
    for col in np.flatnonzero(~held.any(axis=0)):
        choices = np.flatnonzero(allowed[:, col])
        held[choices[rng.integers(len(choices))], col] = True
    return [[m for m, h in zip(names, row, strict=True) if h] for row in held]
