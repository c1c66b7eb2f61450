"""Modality-aware FedAvg as one sum, so SecAgg+ can compute it.

Group-wise FedAvg is a ratio of two sums (:mod:`.aggregation`):

    w_g ← w_g + Σ_i n_{i,g} · Δ_{i,g} / Σ_i n_{i,g}

where Δ_{i,g} = trained − current for the groups node i holds.  SecAgg+ (Flower's
``SecAggPlusWorkflow`` and ``secaggplus_mod``) lets the server learn Σ_i v_i of integer
vectors and nothing else, so each node submits a *Σ-ready vector* v_i: for every key of
the model, (n_{i,g}/N_max) · Δ_{i,g} where it holds group g and zeros elsewhere, followed
by one array of its per-group shares n_{i,g}/N_max and one of its holder flags (1 where
it holds g).  Summed over nodes, the first part is the numerator, the shares the
denominators, the flags the number of holders per group — the server never sees which
node holds which modality, how many samples it has, or its update.

A sum over a single holder is that holder's update.  So a group is released only when
at least ``secagg.min_holders`` (default 2, never fewer) nodes hold it: before each
round a *census* — its own SecAgg+ sum of the holder flags alone (:meth:`SumLayout.census`)
— tells the server, and then every node, how many nodes hold each group; nodes submit
zeros for the groups below the bar (``release``), and :meth:`SumLayout.decode` withholds
any group whose summed flags still fall below it (a holder that dropped out between the
census and the round).  What a census reveals is the count of holders per group: an
aggregate of the federation, not of any node.

Why deltas (not weights) and the share n/N_max (not n): SecAgg+ quantises every value in
[−clipping_range, clipping_range] to ``quantization_range`` levels; deltas scaled by a
share ≤ 1 stay small, so a small range (fine steps) holds them.  A value outside the range
would be clipped silently by the protocol, so :meth:`SumLayout.encode` refuses it with an
error naming the key instead.  The error of one aggregated coordinate is at most about
``nodes · step / Σ shares`` with ``step = 2 · clipping_range / quantization_range``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fed_iotlm.config_schema import block, setting

from .groups import group_of

# the weight every node reports to SecAgg+: the protocol then averages the vectors
# unweighted, and no node's sample count reaches the server through it
PUBLIC_WEIGHT = 1


class SecureRangeError(ValueError):
    """A Σ-ready value would fall outside the range SecAgg+ quantises without clipping."""


@dataclass(frozen=True)
class SecureSettings:
    """The ``secagg:`` config block (see configs/config.yaml)."""

    enabled: bool = False
    num_shares: float = 1.0  # < 1: fraction of sampled nodes; an integer ≥ 3: a count
    reconstruction_threshold: float = 0.67  # fraction of shares (or a count ≥ 2)
    clipping_range: float = 2.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_count: float = 10_000.0
    timeout_s: float = 600.0
    min_holders: int = 2  # a group's sum is released only over at least this many nodes
    # the statistics round (secure_statistics.py): public centre and bound of every input
    # value, a number or {modality: number}; |x - centre| > bound is refused on the node
    stats_centre: float | dict = 0.0
    stats_bound: float | dict = 1000.0

    @classmethod
    def from_config(cls, cfg: dict) -> SecureSettings:
        """Validated settings from the experiment config (absent block: the schema's,
        disabled; the schema refuses unknown keys)."""
        out = cls(**block(cfg, "secagg"))
        if not out.enabled:
            return out
        for name in ("clipping_range", "max_count", "timeout_s"):
            if float(getattr(out, name)) <= 0:
                raise ValueError(f"secagg.{name} must be > 0, got {getattr(out, name)}")
        q, m = int(out.quantization_range), int(out.modulus_range)
        if q <= 0 or m <= q or m & (m - 1) or m > 2**32:
            raise ValueError(
                f"secagg: need 0 < quantization_range ({q}) < modulus_range ({m}) ≤ 2**32, "
                "modulus_range a power of two"
            )
        if int(out.min_holders) < 2 or float(out.min_holders) != int(out.min_holders):
            raise ValueError(
                f"secagg.min_holders must be an integer >= 2, got {out.min_holders}: a sum "
                "over a single holder is that holder's update"
            )
        if float(out.num_shares) <= 0 or float(out.reconstruction_threshold) <= 0:
            raise ValueError("secagg.num_shares and secagg.reconstruction_threshold must be > 0")
        return out

    def max_nodes(self) -> int:
        """How many nodes can be summed before the modulus wraps around."""
        return int(self.modulus_range) // int(self.quantization_range) - 1

    def step(self) -> float:
        """Width of one quantisation level."""
        return 2.0 * float(self.clipping_range) / int(self.quantization_range)


def check_composable(cfg: dict) -> SecureSettings:
    """Secure aggregation hides each update, so nothing that must see one can run."""
    settings = SecureSettings.from_config(cfg)
    if not settings.enabled:
        return settings
    strategy = block(cfg, "strategy")
    if strategy["aggregation"] != "mean":
        raise ValueError(
            f"secagg.enabled=true needs strategy.aggregation=mean (got "
            f"{strategy['aggregation']!r}): robust rules need every update, which SecAgg+ hides"
        )
    if strategy["checks"]["max_update_norm"] is not None:
        raise ValueError(
            "secagg.enabled=true cannot check strategy.checks.max_update_norm on the server "
            "(it never sees an update); bound updates at the nodes instead"
        )
    if strategy["name"] not in ("fedavg", "fedprox"):
        raise ValueError(
            f"secagg.enabled=true composes with group-wise FedAvg/FedProx; "
            f"strategy={strategy['name']!r} (a server optimiser) is not composed with it"
        )
    dp = block(cfg, "dp")
    if dp["enabled"]:
        if dp["mode"] != "distributed":
            raise ValueError(
                "secagg.enabled=true with dp.enabled=true needs dp.mode=distributed: the "
                "server only ever sees the released sum, so the nodes add the noise "
                "(fed_iotlm/federation/secure_dp.py)"
            )
        from .privacy import dp_config
        from .secure_dp import check_range

        check_range(dp_config(cfg), settings)
    if float(block(cfg, "attack")["fraction"]) > 0:
        raise ValueError("secagg.enabled=true: attack studies need the plaintext path")
    if setting(cfg, "method") == "mmbind":
        binding = block(cfg, "binding")
        if not binding["quantize"] or float(binding["noise_sigma"]) <= 0:
            raise ValueError(
                "secagg.enabled=true with method=mmbind: binding uploads each node's "
                "embeddings individually (no sum can hide them), so they must leave the node "
                "noised and quantised: set binding.noise_sigma > 0 and binding.quantize=true "
                "(docs/deploy.md says what the server then learns)"
            )
    return settings


@dataclass(frozen=True)
class SumLayout:
    """The fixed order of a Σ-ready vector: the model's keys, then the group shares."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[str, ...]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> SumLayout:
        keys = tuple(state)
        return cls(
            keys,
            tuple(tuple(state[k].shape) for k in keys),
            tuple(sorted({group_of(k) for k in keys})),
        )

    def arrays_in_order(self, arrays: Sequence[np.ndarray], what: str) -> dict[str, np.ndarray]:
        """Name the positional arrays of a legacy ``Parameters`` message by this layout."""
        if len(arrays) != len(self.keys):
            raise ValueError(f"{what}: {len(arrays)} arrays, the model has {len(self.keys)}")
        out = {}
        for key, shape, arr in zip(self.keys, self.shapes, arrays, strict=True):
            if tuple(arr.shape) != shape:
                raise ValueError(f"{what}: {key!r} has shape {arr.shape}, expected {shape}")
            out[key] = arr
        return out

    def census(self, counts: Mapping[str, float]) -> list[np.ndarray]:
        """A node's holder flags alone (1 for each group it holds): summed by SecAgg+,
        the number of holders per group, before any update is submitted."""
        return [np.array([1.0 if counts.get(g, 0.0) > 0 else 0.0 for g in self.groups])]

    def holders(self, census_sum: Sequence[np.ndarray]) -> dict[str, int]:
        """Holders per group from the sum of every node's :meth:`census`."""
        if len(census_sum) != 1 or np.shape(census_sum[0]) != (len(self.groups),):
            raise ValueError(f"census sum: expected one array of {len(self.groups)} flags")
        return {g: int(round(float(v))) for g, v in zip(self.groups, census_sum[0], strict=True)}

    def encode(
        self,
        trained: Mapping[str, np.ndarray],
        current: Mapping[str, np.ndarray],
        counts: Mapping[str, float],
        settings: SecureSettings,
        node: str = "node",
        release: Collection[str] | None = None,
    ) -> list[np.ndarray]:
        """The Σ-ready vector of one node (``trained`` holds at least its groups); groups
        outside ``release`` (the census found too few holders) are submitted as zeros."""
        max_count = float(settings.max_count)
        shares = np.zeros(len(self.groups), dtype=np.float64)
        for i, g in enumerate(self.groups):
            if release is not None and g not in release:
                continue
            n = float(counts.get(g, 0.0))
            if n > max_count:
                raise SecureRangeError(
                    f"{node}: {n:.0f} samples for {g!r} exceed secagg.max_count={max_count:.0f}"
                )
            shares[i] = n / max_count if n > 0 else 0.0
        share_of = dict(zip(self.groups, shares, strict=True))
        vector = []
        limit = float(settings.clipping_range)
        for key, shape in zip(self.keys, self.shapes, strict=True):
            share = share_of[group_of(key)]
            if share == 0.0 or key not in trained:
                vector.append(np.zeros(shape, dtype=np.float64))
                continue
            value = share * (trained[key].astype(np.float64) - current[key])
            peak = float(np.max(np.abs(value))) if value.size else 0.0
            if not np.isfinite(peak) or peak > limit:
                raise SecureRangeError(
                    f"{node}: share × update of {key!r} reaches {peak:.3g}, outside "
                    f"secagg.clipping_range={limit}; raise secagg.clipping_range"
                )
            vector.append(value)
        vector.append(shares)
        vector.append((shares > 0).astype(np.float64))
        return vector

    def decode(
        self,
        sums: Sequence[np.ndarray],
        current: Mapping[str, np.ndarray],
        max_count: float,
        min_holders: int = 2,
    ) -> Decoded:
        """The new state from the sum of every node's vector: each group held by at least
        ``min_holders`` nodes moves to its FedAvg; the others keep their current value
        (a group nobody held, or one withheld for too few holders)."""
        if len(sums) != len(self.keys) + 2:
            raise ValueError(f"sum has {len(sums)} arrays, expected {len(self.keys) + 2}")
        shares = np.asarray(sums[-2], dtype=np.float64)
        flags = np.rint(np.asarray(sums[-1], dtype=np.float64)).astype(int)
        holders = {g: int(h) for g, h in zip(self.groups, flags, strict=True) if h > 0}
        withheld = sorted(g for g, h in holders.items() if h < min_holders)
        # a group nobody held sums to exactly 0; anything below half a sample is noise
        held = {
            g: float(s)
            for g, s in zip(self.groups, shares, strict=True)
            if s * max_count > 0.5 and g in holders and g not in withheld
        }
        state: dict[str, np.ndarray] = {}
        for key, total in zip(self.keys, sums[:-2], strict=True):
            base = current[key]
            weight = held.get(group_of(key))
            state[key] = base if weight is None else (base + total / weight).astype(base.dtype)
        counts = {g: w * max_count for g, w in held.items()}
        return Decoded(state, counts, {g: h for g, h in holders.items()}, withheld)


@dataclass(frozen=True)
class Decoded:
    """A decoded secure round: the new state, summed counts and holders of the released
    groups, and the groups withheld for holding by fewer than ``min_holders`` nodes."""

    state: dict[str, np.ndarray]
    counts: dict[str, float]
    holders: dict[str, int]
    withheld: list[str]
