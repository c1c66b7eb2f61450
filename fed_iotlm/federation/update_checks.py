"""Screen each node's update against the server's current state before aggregating it.

A real site can send garbage: a different model version (unknown keys, other shapes or
dtypes), a diverged run (NaN/Inf), half a parameter group, a negative or NaN sample
count, or an update far larger than honest training produces (a faulty or malicious
node).  Without this screen one such reply either crashes the round
(:class:`~fed_iotlm.federation.aggregation.UpdateMismatchError`) or silently poisons
the average.  Here each bad update is *dropped* with a reason naming the node, the key
and the problem, and the round goes on with the others.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fed_iotlm.config_schema import section

from .aggregation import NodeUpdate
from .groups import group_of, keys_by_group
from .packing import PackedUpdate

# every kind of rejection, in the order the checks run (one reason per update: the first)
REJECTION_KINDS = (
    "bad_count",
    "unknown_key",
    "missing_key",
    "shape",
    "dtype",
    "non_finite",
    "norm",
)


@dataclass(frozen=True)
class CheckConfig:
    """What the server tolerates; ``max_update_norm=None`` turns the norm bound off."""

    max_update_norm: float | None = None

    def __post_init__(self) -> None:
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(
                f"strategy.checks.max_update_norm must be > 0 or null, got {self.max_update_norm}"
            )


@dataclass(frozen=True)
class Rejection:
    """Why one node's update was dropped."""

    node: str
    kind: str
    key: str | None
    problem: str

    @property
    def reason(self) -> str:
        where = f" at {self.key!r}" if self.key else ""
        return f"node {self.node} rejected ({self.kind}){where}: {self.problem}"


@dataclass
class Screened:
    """The updates that passed, the rejections, and the update norms that were measured."""

    accepted: list[NodeUpdate | PackedUpdate] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)  # node -> ||update - current||₂

    def metrics(self) -> dict[str, float]:
        """Round metrics: totals always, one ``rejected.<kind>`` per kind that occurred."""
        out: dict[str, float] = {
            "accepted_updates": float(len(self.accepted)),
            "rejected_updates": float(len(self.rejected)),
        }
        for kind, n in sorted(Counter(r.kind for r in self.rejected).items()):
            out[f"rejected.{kind}"] = float(n)
        if self.norms:
            values = np.fromiter(self.norms.values(), float)
            out["update_norm_max"] = float(values.max())
            out["update_norm_median"] = float(np.median(values))
        return out


def check_config(strategy_cfg: Mapping) -> CheckConfig:
    """``strategy.checks`` of the config tree (absent = the schema's defaults)."""
    bound = section("strategy", strategy_cfg)["checks"]["max_update_norm"]
    return CheckConfig(max_update_norm=None if bound is None else float(bound))


def check_update(
    update: NodeUpdate,
    current: Mapping[str, np.ndarray],
    config: CheckConfig,
    expected: Mapping[str, list[str]] | None = None,
) -> tuple[Rejection | None, float | None]:
    """The first problem of ``update`` (or None) and its norm (None if not measurable);
    ``expected`` is ``keys_by_group(current)``, computed once per round by the caller."""

    def reject(kind: str, key: str | None, problem: str) -> tuple[Rejection, None]:
        return Rejection(update.node, kind, key, problem), None

    for group, n in update.counts.items():
        if not np.isfinite(n) or n < 0:
            return reject("bad_count", group, f"sample count {n} is not a finite count >= 0")
    for key in update.arrays:
        if key not in current:
            return reject("unknown_key", key, "not a parameter of the server's model")
    expected = keys_by_group(current) if expected is None else expected
    for group in sorted({group_of(k) for k in update.arrays}):
        missing = [k for k in expected[group] if k not in update.arrays]
        if missing:
            return reject(
                "missing_key", missing[0], f"group {group} sent without {len(missing)} of its keys"
            )
    for key, value in update.arrays.items():
        ref = current[key]
        if value.shape != ref.shape:
            return reject("shape", key, f"shape {value.shape}, expected {ref.shape}")
        if value.dtype != ref.dtype:
            return reject("dtype", key, f"dtype {value.dtype}, expected {ref.dtype}")
    squares = 0.0  # ||update - current||² and the NaN/Inf check in one pass over the data
    for key, value in update.arrays.items():
        sq = _squared_distance(value, current[key])
        if not np.isfinite(sq):  # a NaN/Inf value, or finite values too far for float32
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            if bad:
                return reject("non_finite", key, f"{bad} NaN/Inf value(s)")
            sq = _squared_distance(value.astype(np.float64), current[key])
        squares += sq
    return norm_verdict(update.node, float(squares), config)


def check_packed(
    update: PackedUpdate,
    current: Mapping[str, np.ndarray],
    config: CheckConfig,
    scratch: dict[str, np.ndarray] | None = None,
) -> tuple[Rejection | None, float | None]:
    """:func:`check_update` for an update decoded into group buffers
    (:func:`~fed_iotlm.federation.records.decode_update`): the same checks, in the same
    order, with the same reasons; ``current`` is the server's state as group buffers in
    the same layout.  Per group, not per key: one subtraction and one BLAS dot each
    (into ``scratch``, one reusable buffer per group, where given: it then holds this
    update's ``buffer − current`` per group, for
    :func:`~fed_iotlm.federation.streaming_mean.screen_and_mean` to accumulate)."""

    def reject(kind: str, key: str | None, problem: str) -> tuple[Rejection, None]:
        return Rejection(update.node, kind, key, problem), None

    for group, n in update.counts.items():
        if not math.isfinite(n) or n < 0:
            return reject("bad_count", group, f"sample count {n} is not a finite count >= 0")
    if update.problem is not None:
        return reject(update.problem.kind, update.problem.key, update.problem.text)
    squares = 0.0
    for group, flat in update.buffers.items():
        ref = current[group]
        if scratch is None:
            sq = _squared_distance(flat, ref)
        else:
            diff = scratch.get(group)
            # the usual case (one dtype throughout) without np.result_type's cost
            if diff is None or not diff.dtype == flat.dtype == ref.dtype:
                dtype = np.result_type(flat, ref)
                if diff is None or diff.dtype != dtype:
                    diff = scratch[group] = np.empty(flat.size, dtype)
            np.subtract(flat, ref, out=diff)
            sq = float(diff.dot(diff))
        if not math.isfinite(sq):  # a NaN/Inf value, or finite values too far for float32
            finite = np.isfinite(flat)
            if not finite.all():
                layout = update.layout.groups[group]
                key = layout.key_at(int(np.argmin(finite)))
                span = layout.span(key)
                bad = int(span.stop - span.start - np.count_nonzero(finite[span]))
                return reject("non_finite", key, f"{bad} NaN/Inf value(s)")
            wide = flat.astype(np.float64) - ref  # finite values too far apart for float32
            sq = float(np.dot(wide, wide))
            if scratch is not None:
                scratch[group] = wide
        squares += sq
    return norm_verdict(update.node, float(squares), config)


def update_norm(arrays: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update − current) over every key the node sent."""
    return float(np.sqrt(sum(_squared_distance(v, current[k]) for k, v in arrays.items())))


def _squared_distance(value: np.ndarray, ref: np.ndarray) -> float:
    """||value − ref||² by one subtraction and a BLAS dot in the arrays' own dtype (the
    sum over keys is taken in Python floats); NaN/Inf in ``value`` make it non-finite."""
    diff = (value - ref).reshape(-1)
    return float(np.dot(diff, diff))


def screen_updates(
    current: Mapping[str, np.ndarray],
    updates: Iterable[NodeUpdate | PackedUpdate],
    config: CheckConfig,
    current_buffers: Mapping[str, np.ndarray] | None = None,
) -> Screened:
    """Split ``updates`` into accepted and rejected ones (checked one by one); packed
    updates are checked against ``current_buffers`` (``current`` packed in their layout)."""
    out = Screened()
    expected = keys_by_group(current)
    scratch: dict[str, np.ndarray] = {}  # one difference buffer per group, reused
    for upd in updates:
        if isinstance(upd, PackedUpdate):
            if current_buffers is None:
                current_buffers = upd.layout.pack(current)
            rejection, norm = check_packed(upd, current_buffers, config, scratch)
        else:
            rejection, norm = check_update(upd, current, config, expected)
        if norm is not None:
            out.norms[upd.node] = norm
        if rejection is None:
            out.accepted.append(upd)
        else:
            out.rejected.append(rejection)
    return out


def norm_verdict(node: str, squares: float, config: CheckConfig) -> tuple[Rejection | None, float]:
    """The update's L2 distance from the current model, and a rejection if it exceeds the
    configured bound: the last check of both the per-key and the packed screen."""
    norm = math.sqrt(squares)
    bound = config.max_update_norm
    if bound is not None and norm > bound:
        return Rejection(
            node, "norm", None, f"||update - current||₂ = {norm:.4g} > bound {bound:.4g}"
        ), norm
    return None, norm
