"""Parameter groups: the unit of ownership and aggregation.

A key ``enc.imu.backbone.net.0.weight`` belongs to group ``enc.imu``; ``head.activity.*``
to ``head.activity``; ``dec.imu.*`` (MMBind's shared-modality decoder) to ``dec.imu``;
``adapter.imu.*`` (the federated adapters of ``sync.mode=adapters``) to ``adapter.imu``;
``fusion.*`` (and any other top-level module) to its first name.
A node owns the encoder groups of the modalities it holds, the heads of the tasks it
has labels for, and the fusion.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

NESTED_PREFIXES = ("enc", "head", "dec", "adapter")


def group_of(key: str) -> str:
    """Group name of a state-dict key."""
    parts = key.split(".")
    if parts[0] in NESTED_PREFIXES and len(parts) > 2:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def keys_by_group(keys: Iterable[str]) -> dict[str, list[str]]:
    """Group name -> its keys, in the given order."""
    out: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        out[group_of(k)].append(k)
    return dict(out)


def node_groups(modalities: Iterable[str], labelled_tasks: Iterable[str]) -> list[str]:
    """The groups a node trains: its encoders, the fusion, its labelled tasks' heads."""
    return [f"enc.{m}" for m in modalities] + ["fusion"] + [f"head.{t}" for t in labelled_tasks]


def select_groups(state: Mapping[str, np.ndarray], groups: Iterable[str]) -> dict[str, np.ndarray]:
    """The entries of ``state`` whose group is in ``groups``."""
    wanted = set(groups)
    return {k: v for k, v in state.items() if group_of(k) in wanted}
