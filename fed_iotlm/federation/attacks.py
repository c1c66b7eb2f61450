"""Model-poisoning attackers for robustness studies (client side, off by default).

Robust aggregation is only worth its accuracy cost if it stops attacks that break the
mean, so studies need attackers that are reproducible from the config alone: the first
``round(fraction · num_nodes)`` partition ids attack, and each sends, for the groups
it holds, ``current + factor · (trained − current)`` with ``factor = scale``
(``scale``: an exaggerated honest step) or ``−scale`` (``sign_flip``: a large step
against the descent direction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fed_iotlm.config_schema import block

KINDS = ("none", "scale", "sign_flip")


@dataclass(frozen=True)
class AttackConfig:
    """``attack`` of the config tree."""

    fraction: float = 0.0
    kind: str = "none"
    scale: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attack.kind={self.kind!r}: choose one of {KINDS}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"attack.fraction must be in [0, 1], got {self.fraction}")

    @property
    def factor(self) -> float:
        """Multiplier of the honest step (1 = honest)."""
        return {"none": 1.0, "scale": self.scale, "sign_flip": -self.scale}[self.kind]


def attack_config(cfg: Mapping) -> AttackConfig:
    """The attack settings of a composed config (absent = the schema's: no attack)."""
    a = block(cfg, "attack")
    return AttackConfig(fraction=float(a["fraction"]), kind=str(a["kind"]), scale=float(a["scale"]))


def num_attackers(fraction: float, num_nodes: int) -> int:
    """``round(fraction · num_nodes)``, halves rounded up (Python's round would go to even)."""
    return min(num_nodes, math.floor(fraction * num_nodes + 0.5))


def is_attacker(attack: AttackConfig, partition_id: int, num_nodes: int) -> bool:
    """Whether this node attacks: the first ``num_attackers`` partition ids do."""
    return attack.kind != "none" and partition_id < num_attackers(attack.fraction, num_nodes)


def poison(
    trained: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], factor: float
) -> dict[str, np.ndarray]:
    """``current + factor · (trained − current)`` per floating-point key, dtype kept;
    integer buffers (e.g. counters) are sent as trained."""
    out: dict[str, np.ndarray] = {}
    for key, value in trained.items():
        if np.issubdtype(value.dtype, np.floating):
            base = current[key].astype(np.float64)
            out[key] = (base + factor * (value.astype(np.float64) - base)).astype(value.dtype)
        else:
            out[key] = value
    return out


def maybe_attack(
    sent: Mapping[str, np.ndarray],
    current: Mapping[str, np.ndarray],
    attack: AttackConfig,
    partition_id: int,
    num_nodes: int,
) -> dict[str, np.ndarray]:
    """What the node uploads: its trained arrays, poisoned if it is an attacker."""
    if not is_attacker(attack, partition_id, num_nodes):
        return dict(sent)
    return poison(sent, current, attack.factor)
