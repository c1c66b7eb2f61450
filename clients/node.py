"""What one sensor node holds at run time: its data view, its model, its groups.

A simulated node takes its share of the configured dataset (:func:`get_node`); a
deployed site reads its own data directory (:func:`get_site_node`, :mod:`.site`).
Both build the same model from the run config, so they can be federated together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch

from fed_iotlm.config_schema import block
from fed_iotlm.data.federation import NodeSplits, build_layout
from fed_iotlm.data.preprocess import Standardizer
from fed_iotlm.experiment import model_spec, train_config
from fed_iotlm.federation.adapter_sync import adapter_counts, attach_sync_adapters, sync_config
from fed_iotlm.federation.groups import keys_by_group, node_groups
from fed_iotlm.models.device import placement_of, train_placement
from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel
from fed_iotlm.models.training import SplitTensors, TrainConfig
from fed_iotlm.personal import personalise_node
from fed_iotlm.settings import to_json

from .site import SiteConfig, SiteConfigError, federation_size, federation_spec, load_site


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
    source: str = "partition"  # "partition" (simulation layout) | "site" (own data-dir)
    # personalised site adapters (fed_iotlm/personal.py): keys never uploaded, and the
    # adapters' identity initialisation a node starts from
    personal_keys: frozenset[str] = frozenset()
    personal_init: dict[str, np.ndarray] = field(default_factory=dict)
    # the node's featurized, unstandardised data: what the statistics round sums, and
    # what the federation's pooled statistics standardise (``train``/``val``/``test``
    # above use the node's own training statistics until the server sends those)
    raw: NodeSplits | None = None
    val: SplitTensors | None = None
    _views: dict[str, NodeRuntime] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_train(self) -> int:
        return len(self.train)

    def standardized(self, scaler: Standardizer, digest: str) -> NodeRuntime:
        """This node with its tensors standardised by ``scaler`` (the federation's pooled
        statistics, identified by ``digest``); built once per statistics, the same
        model object shared, so the received arrays load into one model."""
        if digest not in self._views:
            if self.raw is None:
                raise RuntimeError(f"node {self.node} keeps no unstandardised data")
            out = self.raw.standardized(scaler)
            place = placement_of(self.model)  # where train.device put the model
            self._views[digest] = replace(
                self,
                train=SplitTensors.from_split(out.train).placed(place),
                val=SplitTensors.from_split(out.val).placed(place),
                test=SplitTensors.from_split(out.test).placed(place),
                _views={},
            )
        return self._views[digest]


def get_node(cfg: dict, node: int) -> NodeRuntime:
    """The node's runtime, built once per process (Ray actors live across rounds)."""
    return _node_cached(to_json(cfg), node)


def get_site_node(cfg: dict, site: SiteConfig) -> NodeRuntime:
    """A deployed site's runtime from its own data directory (``--node-config data-dir``)."""
    return _site_cached(to_json(cfg), site)


@lru_cache(maxsize=64)
def _node_cached(cfg_json: str, node: int) -> NodeRuntime:
    cfg = json.loads(cfg_json)
    layout = build_layout(cfg)
    if not 0 <= node < layout.num_nodes:
        raise ValueError(
            f"node {node} is outside the federation of {layout.num_nodes} nodes: set "
            "partition.num_nodes to the number of SuperNodes (options.num-supernodes)"
        )
    return _runtime(cfg, node, layout.node_raw(node), layout.num_nodes, source="partition")


@lru_cache(maxsize=8)
def _site_cached(cfg_json: str, site: SiteConfig) -> NodeRuntime:
    cfg = json.loads(cfg_json)
    num_nodes = federation_size(cfg)
    if not 0 <= site.partition_id < num_nodes:
        raise SiteConfigError(
            f"node-config partition-id={site.partition_id} is outside the federation of "
            f"{num_nodes} sites: give each site a distinct id 0..{num_nodes - 1}, or set "
            "partition.num_nodes in the run config to the number of sites"
        )
    spec = federation_spec(cfg)  # not model_spec: no partitioning in every ClientApp process
    splits = load_site(site, spec, float(block(cfg, "partition")["val_fraction"]))
    return _runtime(cfg, site.partition_id, splits, num_nodes, source="site", spec=spec)


def _runtime(
    cfg: dict,
    node: int,
    raw: NodeSplits,
    num_nodes: int,
    *,
    source: str,
    spec: ModelSpec | None = None,
) -> NodeRuntime:
    """Model and parameter groups of a node holding ``raw`` (simulated or deployed)."""
    own = raw.standardized()  # own statistics until the server's pooled ones arrive
    train = own.train
    torch.manual_seed(int(cfg["seed"]))
    model = MultisensoryModel(spec or model_spec(cfg))
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
    if sync_config(cfg).adapters:  # frozen encoders: the node owns adapter.<m>, not enc.<m>
        attach_sync_adapters(model, sync_config(cfg), int(cfg["seed"]))
        counts = adapter_counts(counts)
    personal_keys, personal_init, counts = personalise_node(cfg, model, node, counts, list(train.x))
    place = train_placement(cfg)  # train.device: this node's GPU share, else the CPU
    return NodeRuntime(
        node=node,
        modalities=list(train.x),
        train=SplitTensors.from_split(train).placed(place),
        test=SplitTensors.from_split(own.test).placed(place),
        model=place.model(model),
        group_counts=counts,
        train_cfg=train_config(cfg),
        sends_all_groups=sends_all,
        method=cfg["method"],
        num_nodes=num_nodes,
        source=source,
        personal_keys=personal_keys,
        personal_init=personal_init,
        raw=raw,
        val=SplitTensors.from_split(own.val).placed(place),
    )
