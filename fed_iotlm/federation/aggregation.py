"""Modality-aware FedAvg: each group is averaged only over the nodes that sent it.

For group g with holders H_g:  w_g = Σ_{i∈H_g} n_{i,g} · w_{i,g} / Σ_{i∈H_g} n_{i,g}.
This is a ratio of two sums, so secure aggregation can compute it when every node
submits n·w for the groups it holds and zeros elsewhere.  A group nobody sent keeps
its current value.  Accumulation is streaming (one running sum per key), so memory is
O(model), not O(nodes × model).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.linalg.blas import saxpy as _saxpy
from threadpoolctl import ThreadpoolController

from .groups import group_of
from .packing import PackedUpdate


class UpdateMismatchError(ValueError):
    """An update names an unknown key or has the wrong shape for it."""


@dataclass
class NodeUpdate:
    """What one node sent: arrays for the groups it trained and a count per group."""

    node: str
    arrays: Mapping[str, np.ndarray]
    counts: Mapping[str, float]


@dataclass
class GroupAggregate:
    """Result of one aggregation: the new state and, per group, which nodes held it
    (``selected``: the holders a selecting rule such as Krum kept, where one ran)."""

    state: dict[str, np.ndarray]
    holders: dict[str, list[str]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    selected: dict[str, list[str]] = field(default_factory=dict)


def aggregate_groups(
    current: Mapping[str, np.ndarray], updates: Iterable[NodeUpdate]
) -> GroupAggregate:
    """Count-weighted mean of each group over its holders; other groups stay as they were.

    The hot loop runs once per (node, key), with the group and its count looked up once
    per node and group (``group_of`` is cached).  float32 updates (every model here) are
    accumulated in float32 by BLAS ``saxpy`` — ``acc += n · value`` in one pass, in place,
    about the speed of a plain ``acc += value`` (``benchmarks/aggregation.py``); the
    float32 sum of N terms is within about N·2⁻²⁴ relative of a float64 one, far below
    SGD's own noise.  Other dtypes go through a float64 accumulator.
    """
    sums: dict[str, np.ndarray] = {}
    weight: dict[str, float] = {}
    holders: dict[str, list[str]] = {}
    with single_threaded_blas():
        for upd in updates:
            counts = upd.counts
            node_weight: dict[str, float] = {}  # group -> this node's count
            for key, value in upd.arrays.items():
                ref = current.get(key)
                if ref is None:
                    raise UpdateMismatchError(f"node {upd.node}: unknown parameter {key!r}")
                if value.shape != ref.shape:
                    raise UpdateMismatchError(
                        f"node {upd.node}: {key!r} has shape {value.shape}, expected {ref.shape}"
                    )
                g = _group(key)
                n = node_weight.get(g)
                if n is None:
                    n = node_weight[g] = float(counts.get(g, 0.0))
                if n <= 0:
                    continue
                _add_term(sums, key, value.reshape(-1), n)
            for g, n in node_weight.items():
                if n > 0:
                    weight[g] = weight.get(g, 0.0) + n
                    holders.setdefault(g, []).append(upd.node)
    state: dict[str, np.ndarray] = {}
    for key, value in current.items():
        acc = sums.get(key)
        if acc is None:
            state[key] = value
        else:
            mean = np.divide(acc, weight[_group(key)], out=acc).reshape(value.shape)
            state[key] = mean.astype(value.dtype, copy=False)
    return GroupAggregate(state, holders, weight)


def aggregate_packed(
    current: Mapping[str, np.ndarray], updates: Iterable[PackedUpdate]
) -> GroupAggregate:
    """:func:`aggregate_groups` on updates decoded into group buffers (one flat buffer per
    group, in the server's layout; :mod:`~fed_iotlm.federation.packing`): the same
    count-weighted mean per group, one ``saxpy`` per (node, group) instead of one per
    (node, key).  The new state's keys are views into the group means."""
    sums: dict[str, np.ndarray] = {}
    weight: dict[str, float] = {}
    holders: dict[str, list[str]] = {}
    layout = None
    with single_threaded_blas():
        for upd in updates:
            layout = upd.layout
            counts = upd.counts
            for g, flat in upd.buffers.items():
                n = float(counts.get(g, 0.0))
                if n <= 0:
                    continue
                _add_term(sums, g, flat, n)
                weight[g] = weight.get(g, 0.0) + n
                holders.setdefault(g, []).append(upd.node)
    state = dict(current)
    for g, acc in sums.items():
        group = layout.groups[g]
        mean = np.divide(acc, weight[g], out=acc).astype(group.dtype, copy=False)
        state.update(group.unpack(mean))
    return GroupAggregate(state, holders, weight)


def axpy_in_place(acc: np.ndarray, x: np.ndarray, a: float) -> None:
    """``acc += a · x`` for flat float32 arrays, in place (BLAS ``saxpy``); call it under
    :func:`single_threaded_blas`."""
    if _saxpy(x, acc, a=a) is not acc:  # never: f2py hands a float32 C-order ``y`` back
        raise RuntimeError("saxpy did not accumulate in place")


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """OpenBLAS on one thread for the duration: it runs ``?axpy`` on several threads
    above 10 000 values, and on a busy machine waking them cost up to 1000× the work
    itself (26 ms for one 20 k-value group, measured); slicing every sum into 10 000
    values, as this module did before, cost 30 % of the server's sums in calls.
    threadpoolctl sets the limit through OpenBLAS's own API and restores it after."""
    with _openblas().limit(limits=1):
        yield


@lru_cache(maxsize=1)
def _openblas() -> ThreadpoolController:
    # made once, after numpy's and scipy's OpenBLAS are loaded (this module imports
    # both); only OpenBLAS: torch's own thread pools are not ours to change
    return ThreadpoolController().select(internal_api="openblas")


def _add_term(sums: dict[str, np.ndarray], name: str, flat: np.ndarray, n: float) -> None:
    """``sums[name] += n · flat`` (the first term starts the sum; float32 by ``saxpy``)."""
    acc = sums.get(name)
    if acc is None:
        sums[name] = _first_term(flat, n)
    elif acc.dtype == np.float32:
        axpy_in_place(acc, flat, n)
    else:
        acc += flat * n


def _first_term(value: np.ndarray, n: float) -> np.ndarray:
    """A fresh flat accumulator holding ``n · value`` (float32 stays float32)."""
    dtype = np.float32 if value.dtype == np.float32 else np.float64
    return np.multiply(value.reshape(-1), n, dtype=dtype)


# parameter names repeat every round and for every node: split each one once
_group = lru_cache(maxsize=1 << 16)(group_of)
