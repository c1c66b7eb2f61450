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

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .aggregation import NodeUpdate
from .groups import group_of, keys_by_group

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

    accepted: list[NodeUpdate] = field(default_factory=list)
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
    """``strategy.checks`` of the config tree (absent = defaults)."""
    checks = strategy_cfg.get("checks") or {}
    bound = checks.get("max_update_norm")
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
    norm = float(np.sqrt(squares))
    bound = config.max_update_norm
    if bound is not None and norm > bound:
        rejection = Rejection(
            update.node, "norm", None, f"||update - current||₂ = {norm:.4g} > bound {bound:.4g}"
        )
        return rejection, norm
    return None, norm


def update_norm(arrays: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update − current) over every key the node sent."""
    return float(np.sqrt(sum(_squared_distance(v, current[k]) for k, v in arrays.items())))


def _squared_distance(value: np.ndarray, ref: np.ndarray) -> float:
    """||value − ref||² by one subtraction and a BLAS dot in the arrays' own dtype (the
    sum over keys is taken in Python floats); NaN/Inf in ``value`` make it non-finite."""
    diff = (value - ref).reshape(-1)
    return float(np.dot(diff, diff))


def screen_updates(
    current: Mapping[str, np.ndarray], updates: Iterable[NodeUpdate], config: CheckConfig
) -> Screened:
    """Split ``updates`` into accepted and rejected ones (checked one by one)."""
    out = Screened()
    expected = keys_by_group(current)
    for upd in updates:
        rejection, norm = check_update(upd, current, config, expected)
        if norm is not None:
            out.norms[upd.node] = norm
        if rejection is None:
            out.accepted.append(upd)
        else:
            out.rejected.append(rejection)
    return out
