"""A node's part in MMBind: shared-modality rounds, the embedding upload, partners.

Partners are kept in the node's ``context.state`` (Flower persists it per node across
messages), so whichever worker runs the node's next round finds them.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fed_iotlm.binding.messages import PrivacyConfig, pack_upload, unpack_partners
from fed_iotlm.binding.training import BindTrainConfig, PartnerTensors, pretrain_shared
from fed_iotlm.experiment import shared_modality
from fed_iotlm.federation.groups import select_groups
from fed_iotlm.federation.records import counts_to_metrics, numpy_to_record, state_to_numpy

from .node import NodeRuntime

PARTNERS_KEY = "mmbind.partners"


def bind_train_config(cfg: dict) -> BindTrainConfig:
    b = cfg["binding"]
    return BindTrainConfig(
        pseudo_weight=float(b["pseudo_weight"]),
        contrastive_weight=float(b["contrastive_weight"]),
        temperature=float(b["temperature"]),
    )


def pretrain_reply(msg: Message, node: NodeRuntime, cfg: dict) -> Message:
    """Autoencoder round on the shared modality; reply with its encoder and decoder."""
    shared = shared_modality(cfg)
    rnd = int(msg.content["config"].get("server-round", 0))
    tcfg = node.train_cfg
    tcfg = type(tcfg)(**{**tcfg.__dict__, "epochs": int(cfg["binding"]["pretrain_epochs"])})
    stats = pretrain_shared(
        node.model,
        node.train,
        shared,
        tcfg,
        seed=rnd * 7919 + node.node,
        method=cfg["binding"]["ssl"],
    )
    n = stats["num_present"]
    groups = {f"enc.{shared}": n, f"dec.{shared}": n} if n > 0 else {}
    sent = select_groups(state_to_numpy(node.model), groups)
    metrics = counts_to_metrics(
        groups, {**stats, "num-examples": n, "partition-id": float(node.node)}
    )
    return Message(RecordDict({"arrays": numpy_to_record(sent), "metrics": metrics}), reply_to=msg)


@torch.no_grad()
def embed_reply(msg: Message, node: NodeRuntime, cfg: dict) -> Message:
    """Shared-modality embeddings + own-modality tokens of the node's samples; no raw data."""
    b = cfg["binding"]
    shared = shared_modality(cfg)
    node.model.eval()
    if shared not in node.train.x:
        raise ValueError(f"node {node.node} does not hold the shared modality {shared!r}")
    rows = torch.nonzero(node.train.mask[shared]).squeeze(1)
    x, mask, y = node.train.batch(rows)
    tokens = node.model.encode(x)
    labels = None
    if b["use_labels"]:
        task = b.get("label_task") or next(iter(y))
        labels = y[task].numpy()
    record, config = pack_upload(
        ids=rows.numpy(),
        shared=tokens[shared].numpy(),
        tokens={m: t.numpy() for m, t in tokens.items() if m != shared},
        present={m: mask[m].numpy() for m in tokens if m != shared},
        labels=labels,
        privacy=PrivacyConfig(float(b["noise_sigma"]), bool(b["quantize"])),
        seed=int(msg.content["config"].get("server-round", 0)) * 101 + node.node,
    )
    config["partition-id"] = node.node
    config["held"] = list(node.modalities)
    return Message(RecordDict({"embeddings": record, "config": config}), reply_to=msg)


def store_partners(msg: Message, context: Context, node: NodeRuntime) -> Message:
    """Keep the partners the server sent for the next rounds; reply with a summary."""
    record: ArrayRecord = msg.content["partners"]
    context.state[PARTNERS_KEY] = record
    summary = {"partition-id": float(node.node), "num-examples": float(node.num_train)}
    for m, (_, _, w) in unpack_partners(record).items():
        summary[f"partners.{m}"] = float((w > 0).sum())
        summary[f"refused.{m}"] = float((w <= 0).sum())
    return Message(RecordDict({"metrics": MetricRecord(summary)}), reply_to=msg)


def partner_tensors(context: Context, node: NodeRuntime) -> dict[str, PartnerTensors]:
    """Partners aligned to the node's own training samples (rows without one: weight 0)."""
    if PARTNERS_KEY not in context.state:
        return {}
    n = node.num_train
    out = {}
    for m, (ids, emb, w) in unpack_partners(context.state[PARTNERS_KEY]).items():
        full_e = np.zeros((n, *emb.shape[1:]), np.float32)
        full_w = np.zeros((n, w.shape[1]), np.float32)
        full_e[ids], full_w[ids] = emb, w
        out[m] = PartnerTensors(torch.from_numpy(full_e), torch.from_numpy(full_w))
    return out


def query_config(server_round: int) -> ConfigRecord:
    return ConfigRecord({"server-round": server_round})
