"""What one sensor node holds at run time: its data view, its model, its groups."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fed_iotlm.data.federation import build_layout
from fed_iotlm.experiment import model_spec, train_config
from fed_iotlm.federation.groups import keys_by_group, node_groups
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors, TrainConfig
from fed_iotlm.settings import to_json


@dataclass
class NodeRuntime:
    """A node's tensors, model and the parameter groups it owns, with their counts."""

    node: int
    modalities: list[str]
    train: SplitTensors
    test: SplitTensors
    model: MultisensoryModel
    group_counts: dict[str, float]
    train_cfg: TrainConfig
    sends_all_groups: bool
    method: str
    num_nodes: int  # of the federation (which partition ids attack is a share of it)

    @property
    def num_train(self) -> int:
        return len(self.train)


def get_node(cfg: dict, node: int) -> NodeRuntime:
    """The node's runtime, built once per process (Ray actors live across rounds)."""
    return _node_cached(to_json(cfg), node)


@lru_cache(maxsize=64)
def _node_cached(cfg_json: str, node: int) -> NodeRuntime:
    import json

    cfg = json.loads(cfg_json)
    layout = build_layout(cfg)
    if not 0 <= node < layout.num_nodes:
        raise ValueError(
            f"node {node} is outside the federation of {layout.num_nodes} nodes: set "
            "partition.num_nodes to the number of SuperNodes (options.num-supernodes)"
        )
    train, test = layout.node_data(node)
    torch.manual_seed(int(cfg["seed"]))
    model = MultisensoryModel(model_spec(cfg))
    labelled = {t: float((v >= 0).sum()) for t, v in train.y.items()}
    counts: dict[str, float] = {f"enc.{m}": float(train.mask[m].sum()) for m in train.x}
    counts["fusion"] = float(np.logical_or.reduce([v >= 0 for v in train.y.values()]).sum())
    counts.update({f"head.{t}": n for t, n in labelled.items()})
    held = node_groups(train.x, [t for t, n in labelled.items() if n > 0])
    sends_all = cfg["method"] == "fedavg"
    if sends_all:  # naive FedAvg: every group, weighted by the node's sample count
        groups = keys_by_group(model.state_dict())
        counts = {g: float(len(train)) for g in groups}
    else:
        counts = {g: counts[g] for g in held if counts.get(g, 0) > 0}
    return NodeRuntime(
        node=node,
        modalities=list(train.x),
        train=SplitTensors.from_split(train),
        test=SplitTensors.from_split(test),
        model=model,
        group_counts=counts,
        train_cfg=train_config(cfg),
        sends_all_groups=sends_all,
        method=cfg["method"],
        num_nodes=layout.num_nodes,
    )
