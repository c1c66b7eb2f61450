"""The statistics round as one SecAgg+ sum: the server learns the pooled totals only.

``normalization=federated`` with ``secagg.enabled``: every node submits one vector of a
fixed layout, the same for every node, covering EVERY modality of the federation (zeros
for those it lacks, or those with too few holders): for each modality and channel

* ``S1 = Σ_j mean_t((x_jt − c) / B) / max_count``, the per-sample means summed,
* ``S2 = Σ_j mean_t(((x_jt − c) / B)²) / max_count``, the per-sample mean squares summed,

then one share ``n / max_count`` and one holder flag per modality.  ``c`` (a public
centre, ``secagg.stats_centre``) and ``B`` (a public bound, ``secagg.stats_bound``) come
from the config, so every term lies in [−1, 1]; a value with ``|x − c| > B`` is refused
on the node with an error naming it (SecAgg+ would otherwise clip it silently).  Every
sample of a modality has the same number of positions t, so the mean of the per-sample
means is the mean over all positions: the pooled mean/std are those of the plain round.

Why per-sample means, and why limbs: SecAgg+ quantises each value in
[−clipping_range, clipping_range] to ``quantization_range`` levels of width ``step``
(2**-20 at the default range).  Sums scaled by the public ``max_count`` and ``B`` are
small next to that range, so one fixed-point number per value would lose the variance
(a 9.81 ± 0.05 signal under B = 1000: the std comes out wrong by a factor of 200).
Each value v is sent as ``LIMBS`` = 3 numbers, ``v = l_0 + step·l_1 + step²·l_2``: the
first two are quantisation levels (quantised without error), the last lies in [−½, ½]
and is quantised with an error ≤ step, so the sum is off by about ``nodes · step³``
(~1e-18) per value instead of ``nodes · step``.  Measured against the plain round
(tests/test_secure_statistics.py): mean and std agree to float32 resolution (≤ 1.2e-7
of the std; the test's stated tolerance is 1e-5); with two limbs that case is off by
2 %.

With ``train.class_weighting=balanced`` the vector ends with each task's class counts of
the node's labelled training samples, ``counts / max_count`` as limbs (``tasks`` of the
layout, sent down as ``stats-tasks``): the server learns only their sum over every
node, the global counts the balanced weights need (:mod:`.class_balance`).

A census first (a SecAgg+ sum of the holder flags alone) tells the server how many nodes
hold each modality; a modality with fewer than ``secagg.min_holders`` holders is not
released: nodes submit zeros for it and the run logs and records it.  What the server
learns: the holders per modality and, per released modality, the pooled totals.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fed_iotlm.data.dataset import Split
from fed_iotlm.data.preprocess import Standardizer
from fed_iotlm.models.class_weights import class_counts

from .secure import SecureRangeError, SecureSettings

STATS_PHASE = "stats"  # the SecAgg+ train message's phase for the statistics sum
KEY_MODALITIES = "stats-modalities"  # config: the federation's modalities, in vector order
KEY_TASKS = "stats-tasks"  # config: "task:classes,..." whose class counts the vector ends with


def _channel_axes(ndim: int) -> tuple[int, ...]:
    """Per-sample reduction axes of one sample (no batch axis): [T,C] -> (0,),
    [C,H,W] -> (1, 2), [D] -> () (see :func:`fed_iotlm.data.preprocess._channel_axes`)."""
    if ndim == 2:
        return (0,)
    if ndim == 3:
        return (1, 2)
    return ()


def channel_shape(arr: np.ndarray) -> tuple[int, ...]:
    """The keepdims per-channel shape of a batch ``arr`` ([N,T,C] -> (1,1,C), ...):
    the shape of the pooled mean/std the plain round produces."""
    axes = {0, *(a + 1 for a in _channel_axes(arr.ndim - 1))}
    return tuple(1 if a in axes else s for a, s in enumerate(arr.shape))


LIMBS = 3  # fixed-point digits per value (see the module docstring)


def split_limbs(value: np.ndarray, step: float, limbs: int | None = None) -> list[np.ndarray]:
    """``value`` as ``Σ_k step^k · l_k``: every limb but the last a quantisation level
    (quantised exactly), the last in [−½, ½] (quantised with an error ≤ step)."""
    out, rest = [], np.asarray(value, dtype=np.float64)
    for _ in range((LIMBS if limbs is None else limbs) - 1):
        level = np.round(rest / step) * step
        out.append(level)
        rest = (rest - level) / step
    out.append(rest)
    return out


def join_limbs(limbs: Sequence[np.ndarray], step: float) -> np.ndarray:
    """Inverse of :func:`split_limbs` (on sums of limbs as well)."""
    return sum(np.asarray(limb, dtype=np.float64) * step**k for k, limb in enumerate(limbs))


@dataclass(frozen=True)
class StatsLayout:
    """The fixed order of a statistics vector: modalities, their channel shapes, the
    public centre and bound per modality."""

    modalities: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    centre: tuple[float, ...]
    bound: tuple[float, ...]
    # (task, classes) whose class counts end the vector (class_weighting=balanced); () none
    tasks: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(
        cls,
        shapes: Mapping[str, Sequence[int]],
        settings: SecureSettings,
        tasks: Mapping[str, int] | None = None,
    ) -> StatsLayout:
        """Layout for ``shapes`` (modality -> keepdims channel shape) and the config's
        ``stats_centre``/``stats_bound`` (a number, or a number per modality); with
        ``tasks`` (task -> classes) the class counts of those tasks as well."""
        mods = tuple(sorted(shapes))
        centre = tuple(_per_modality(settings.stats_centre, m, "stats_centre") for m in mods)
        bound = tuple(_per_modality(settings.stats_bound, m, "stats_bound") for m in mods)
        for m, b in zip(mods, bound, strict=True):
            if not b > 0:
                raise ValueError(f"secagg.stats_bound for {m!r} must be > 0, got {b}")
        counted = tuple((t, int(k)) for t, k in sorted((tasks or {}).items()))
        shaped = tuple(tuple(int(d) for d in shapes[m]) for m in mods)
        return cls(mods, shaped, centre, bound, counted)

    def tasks_text(self) -> str:
        """``tasks`` as the config carries them (``KEY_TASKS``)."""
        return ",".join(f"{t}:{k}" for t, k in self.tasks)

    def templates(self) -> list[np.ndarray]:
        """Zeros of each modality's channel shape: what the server sends down, so a node
        learns the shapes of modalities it does not hold."""
        return [np.zeros(s, dtype=np.float64) for s in self.shapes]

    @classmethod
    def from_message(
        cls,
        modalities: str,
        templates: Sequence[np.ndarray],
        settings: SecureSettings,
        tasks: str = "",
    ) -> StatsLayout:
        """The layout a node rebuilds from the server's message."""
        mods = [m for m in modalities.split(",") if m]
        if len(mods) != len(templates):
            raise ValueError(
                f"statistics message: {len(mods)} modalities ({modalities!r}) but "
                f"{len(templates)} shape templates"
            )
        counted = {}
        for item in (t for t in tasks.split(",") if t):
            name, _, k = item.rpartition(":")
            if not name or not k.isdigit():
                raise ValueError(f"statistics message: bad task entry {item!r} in {tasks!r}")
            counted[name] = int(k)
        shapes = {m: np.shape(t) for m, t in zip(mods, templates, strict=True)}
        return cls.of(shapes, settings, counted)

    def census(self, held: Collection[str]) -> list[np.ndarray]:
        """A node's holder flags alone (1 per modality it holds present samples of)."""
        return [np.array([1.0 if m in held else 0.0 for m in self.modalities])]

    def holders(self, census_sum: Sequence[np.ndarray]) -> dict[str, int]:
        if len(census_sum) != 1 or np.shape(census_sum[0]) != (len(self.modalities),):
            raise ValueError(f"census sum: expected one array of {len(self.modalities)} flags")
        return {
            m: int(round(float(v))) for m, v in zip(self.modalities, census_sum[0], strict=True)
        }

    def encode(
        self,
        split: Split,
        settings: SecureSettings,
        release: Collection[str],
        node: str = "node",
    ) -> list[np.ndarray]:
        """One node's statistics vector: per modality ``S1`` and ``S2`` as (hi, lo) limbs,
        then the shares n/max_count as (hi, lo), then the holder flags.  Modalities
        outside ``release`` or not held go as zeros."""
        if float(settings.clipping_range) < 1.0:
            raise ValueError(
                f"secagg.clipping_range={settings.clipping_range}: the statistics round "
                "needs at least 1 (its values lie in [-1, 1])"
            )
        step, max_count = settings.step(), float(settings.max_count)
        vector: list[np.ndarray] = []  # [S1 limbs, S2 limbs] per modality, shares, flags
        shares = np.zeros(len(self.modalities))
        flags = np.zeros(len(self.modalities))
        for i, (m, shape) in enumerate(zip(self.modalities, self.shapes, strict=True)):
            s1 = np.zeros(shape)
            s2 = np.zeros(shape)
            present = _present(split, m)
            if present is not None and m in release:
                n = present.shape[0]
                if n > max_count:
                    raise SecureRangeError(
                        f"{node}: {n} samples of {m!r} exceed secagg.max_count={max_count:.0f}"
                    )
                if tuple(channel_shape(present)[1:]) != shape[1:]:
                    raise ValueError(
                        f"{node}: {m!r} has channel shape {channel_shape(present)[1:]}, the "
                        f"federation's is {shape[1:]} (a different featurisation?)"
                    )
                z = self._scaled(present, i, node)
                axes = tuple(a + 1 for a in _channel_axes(present.ndim - 1))
                s1 = z.mean(axis=axes, keepdims=True).sum(axis=0, keepdims=True) / max_count
                s2 = np.square(z).mean(axis=axes, keepdims=True).sum(0, keepdims=True) / max_count
                shares[i], flags[i] = n / max_count, 1.0
            vector.extend((*split_limbs(s1, step), *split_limbs(s2, step)))
        vector.extend((*split_limbs(shares, step), flags))
        vector.extend(self._class_counts(split, max_count, step, node))
        return vector

    def _class_counts(
        self, split: Split, max_count: float, step: float, node: str
    ) -> list[np.ndarray]:
        """Per task of ``tasks``: the node's class counts / max_count, as limbs."""
        if not self.tasks:
            return []
        counts = class_counts(split.y, dict(self.tasks))
        out: list[np.ndarray] = []
        for task, _ in self.tasks:
            if counts[task].sum() > max_count:
                raise SecureRangeError(
                    f"{node}: {int(counts[task].sum())} labels of {task!r} exceed "
                    f"secagg.max_count={max_count:.0f}"
                )
            out.extend(split_limbs(counts[task] / max_count, step))
        return out

    def _scaled(self, present: np.ndarray, i: int, node: str) -> np.ndarray:
        """(x − c) / B, refusing any value beyond the public bound."""
        m, c, b = self.modalities[i], self.centre[i], self.bound[i]
        z = (present.astype(np.float64) - c) / b
        peak = float(np.max(np.abs(z))) if z.size else 0.0
        if not np.isfinite(peak) or peak > 1.0:
            where = np.unravel_index(int(np.nanargmax(np.abs(z))), z.shape)
            raise SecureRangeError(
                f"{node}: {m!r} value {present[where]:.6g} at {tuple(map(int, where))} lies "
                f"outside secagg.stats_centre ± secagg.stats_bound ({c:g} ± {b:g}); raise "
                "secagg.stats_bound (SecAgg+ would clip it silently)"
            )
        return z

    def decode(self, sums: Sequence[np.ndarray], settings: SecureSettings) -> SecureStatistics:
        """Pooled mean/std per released modality from the sum of every node's vector; a
        modality below ``secagg.min_holders`` holders in this sum is withheld."""
        per, k = 2 * LIMBS, LIMBS
        base = per * len(self.modalities) + k + 1
        expected = base + LIMBS * len(self.tasks)
        if len(sums) != expected:
            raise ValueError(f"statistics sum has {len(sums)} arrays, expected {expected}")
        step, max_count = settings.step(), float(settings.max_count)
        counted: dict[str, np.ndarray] = {}
        for i, (t, _) in enumerate(self.tasks):
            limbs = sums[base + LIMBS * i : base + LIMBS * (i + 1)]
            counted[t] = np.rint(join_limbs(limbs, step) * max_count).astype(np.int64)
        sums = sums[:base]
        shares = join_limbs(sums[-k - 1 : -1], step) * max_count
        flags = np.rint(np.asarray(sums[-1], dtype=np.float64)).astype(int)
        mean, std, counts, holders, withheld = {}, {}, {}, {}, []
        for i, m in enumerate(self.modalities):
            if flags[i] <= 0:
                continue
            holders[m] = int(flags[i])
            n = float(np.rint(shares[i]))
            if flags[i] < int(settings.min_holders) or n < 0.5:
                withheld.append(m)
                continue
            s1 = join_limbs(sums[per * i : per * i + k], step) * max_count / n
            s2 = join_limbs(sums[per * i + k : per * (i + 1)], step) * max_count / n
            c, b = self.centre[i], self.bound[i]
            mean[m] = (c + b * s1).astype(np.float32)
            var = np.maximum(s2 - np.square(s1), 0.0) * b * b
            std[m] = np.maximum(np.sqrt(var), 1e-6).astype(np.float32)
            counts[m] = n
        return SecureStatistics(Standardizer(mean, std), counts, holders, sorted(withheld), counted)


@dataclass(frozen=True)
class SecureStatistics:
    """What the server learns from the secure statistics round."""

    scaler: Standardizer  # released modalities only
    counts: dict[str, float]  # pooled samples per released modality
    holders: dict[str, int]  # holders per modality held by anyone
    withheld: list[str]  # held, but by fewer than secagg.min_holders nodes
    # per task, the class counts summed over every node (layout.tasks; else empty)
    class_counts: dict[str, np.ndarray] = field(default_factory=dict)


def _present(split: Split, m: str) -> np.ndarray | None:
    if m not in split.x:
        return None
    present = split.x[m][split.mask[m]]
    return present if present.shape[0] > 0 else None


def held_modalities(split: Split) -> list[str]:
    """The modalities a node has present training samples of."""
    return [m for m in split.x if _present(split, m) is not None]


def _per_modality(value: float | Mapping[str, float], m: str, name: str) -> float:
    if isinstance(value, Mapping):
        if m not in value:
            raise ValueError(f"secagg.{name} names no value for modality {m!r}")
        return float(value[m])
    return float(value)
