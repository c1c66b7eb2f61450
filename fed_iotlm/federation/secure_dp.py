"""Distributed DP under SecAgg+ (``secagg.enabled`` with ``dp.mode=distributed``).

Central DP-FedAvg (:mod:`.privacy`) adds ``N(0, (σC)²)`` to each group's sum at the
server, which needs the server to see that sum before the noise: SecAgg+ forbids it
and the sum it unmasks is what gets released.  So the noise is added at the nodes, in
shares that add up to the central noise:

* each node clips its update ``trained − received`` over the groups it holds (and the
  census released) to joint L2 norm ``C``, as in central mode;
* each holder of group g adds ``N(0, σ²C²/h_g)`` to every coordinate of its clipped
  update of g, where ``h_g`` is the number of holders the census counted; the sum over
  the ``h_g`` holders then carries ``N(0, σ²C²)``, the central noise on the group's sum;
* the Σ-ready vector weighs every holder the same (share 1: DP needs the unweighted
  mean, or a large node could move the average by more than ``C/h_g``), so decoding
  divides the noisy sum by ``h_g``: the released average has noise ``σC/h_g`` exactly
  as in central mode, and the same accountant (opacus' RDP, sampled Gaussian) applies.

A holder that drops out after the census would leave the sum short of noise; decoding
then withholds the group (:class:`server.secure_rounds.SecureRounds` compares the
round's holders with the census).  Each node draws its noise from the OS entropy pool
unless ``dp.seed`` is set (tests only: a known seed voids the guarantee).  The noise is
not hidden from the node that adds it, and a node that adds less than its share weakens
the guarantee for everyone: distributed DP trusts nodes to follow the protocol, as
SecAgg+ trusts them to mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import sqrt

import numpy as np

from .groups import group_of
from .privacy import DPConfig, clip_update
from .secure import SecureSettings, SumLayout

KEY_HOLDERS = "dp-holders"  # round config: "group:holders,..." of the released groups
KEY_SIGMA = "dp-noise-multiplier"
KEY_CLIP = "dp-clipping-norm"


def holder_noise_std(noise_multiplier: float, clipping_norm: float, holders: int) -> float:
    """Std each of ``holders`` nodes adds, so that their sum carries ``σC``."""
    if holders < 1:
        raise ValueError(f"a group with {holders} holders is not released")
    return noise_multiplier * clipping_norm / sqrt(holders)


def round_config(dp: DPConfig, holders: Mapping[str, int]) -> dict[str, float | str]:
    """What nodes need to clip and noise their share (added to the round's config)."""
    return {
        KEY_SIGMA: float(dp.noise_multiplier),
        KEY_CLIP: float(dp.clipping_norm),
        KEY_HOLDERS: ",".join(f"{g}:{int(h)}" for g, h in holders.items()),
    }


def parse_holders(value: str) -> dict[str, int]:
    """``"enc.imu:3,fusion:3"`` -> ``{"enc.imu": 3, "fusion": 3}``."""
    out = {}
    for item in filter(None, str(value).split(",")):
        group, _, h = item.rpartition(":")
        out[group] = int(h)
    return out


def noisy_vector(
    layout: SumLayout,
    trained: Mapping[str, np.ndarray],
    current: Mapping[str, np.ndarray],
    counts: Mapping[str, float],
    holders: Mapping[str, int],
    noise_multiplier: float,
    clipping_norm: float,
    settings: SecureSettings,
    rng: np.random.Generator,
    node: str = "node",
) -> list[np.ndarray]:
    """One node's Σ-ready vector under distributed DP: its clipped update of the groups
    it holds among ``holders`` (the released ones), plus its noise share, weight 1."""
    held = [g for g in layout.groups if counts.get(g, 0.0) > 0 and g in holders]
    sent = {k: trained[k] for k in layout.keys if group_of(k) in held}
    clipped = clip_update(sent, current, clipping_norm) if sent else {}
    noised = {
        k: v.astype(np.float64)
        + rng.normal(
            0.0, holder_noise_std(noise_multiplier, clipping_norm, holders[group_of(k)]), v.shape
        )
        for k, v in clipped.items()
    }
    weights = {g: float(settings.max_count) for g in held}  # share 1: the unweighted mean
    return layout.encode(noised, current, weights, settings, node, release=set(held))


def check_range(dp: DPConfig, settings: SecureSettings) -> None:
    """Refuse a ``secagg.clipping_range`` that the noisy updates would overflow: a
    coordinate reaches ``C`` plus about 6 noise stds (``σC/√min_holders``) at most,
    over any model size this project trains."""
    need = dp.clipping_norm * (1 + 6 * dp.noise_multiplier / sqrt(int(settings.min_holders)))
    if float(settings.clipping_range) < need:
        raise ValueError(
            f"dp.mode=distributed: secagg.clipping_range={settings.clipping_range} is below "
            f"{need:.2f} = C·(1 + 6σ/√min_holders); the noisy updates would leave the range "
            "SecAgg+ quantises: raise secagg.clipping_range"
        )
