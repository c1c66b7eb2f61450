"""A node's part in MMBind: shared-modality rounds, the embedding upload, partners.

Partners are kept in the node's ``context.state`` (Flower persists it per node across
messages), so whichever worker runs the node's next round finds them.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from fed_iotlm.binding.embeddings import align_partners, node_embeddings
from fed_iotlm.binding.messages import PrivacyConfig, pack_upload, unpack_partners
from fed_iotlm.binding.ssl import pretrain_shared, ssl_head
from fed_iotlm.binding.training import PartnerTensors
from fed_iotlm.experiment import shared_modality, ssl_config, ssl_train_config
from fed_iotlm.federation.groups import select_groups
from fed_iotlm.federation.records import counts_to_metrics, numpy_to_record, state_to_numpy
from fed_iotlm.federation.secure import SecureSettings

from .node import NodeRuntime

PARTNERS_KEY = "mmbind.partners"


def pretrain_local(node: NodeRuntime, cfg: dict, rnd: int) -> tuple[dict[str, float], dict]:
    """SSL round on the shared modality (contrastive, semi-supervised or autoencoder), in
    place; returns the groups it trained with their counts (none if the node lacks the
    modality) and stats."""
    shared = shared_modality(cfg)
    tcfg = ssl_train_config(cfg, node.train_cfg)
    ssl = ssl_config(cfg)
    stats = pretrain_shared(
        node.model, node.train, shared, tcfg, seed=rnd * 7919 + node.node, ssl=ssl
    )
    return pretrain_groups(node, cfg), stats


def pretrain_groups(node: NodeRuntime, cfg: dict) -> dict[str, float]:
    """The groups a shared-modality round trains at this node, with their counts."""
    shared = shared_modality(cfg)
    mask = node.train.mask.get(shared)
    n = float(mask.sum()) if mask is not None else 0.0
    return {f"enc.{shared}": n, ssl_head(shared, ssl_config(cfg).method): n} if n > 0 else {}


def pretrain_reply(msg: Message, node: NodeRuntime, cfg: dict) -> Message:
    """Shared-modality round; reply with its encoder and SSL head (plaintext path)."""
    rnd = int(msg.content["config"].get("server-round", 0))
    groups, stats = pretrain_local(node, cfg, rnd)
    n = stats["num_present"]
    sent = select_groups(state_to_numpy(node.model), groups)
    metrics = counts_to_metrics(
        groups, {**stats, "num-examples": n, "partition-id": float(node.node)}
    )
    return Message(RecordDict({"arrays": numpy_to_record(sent), "metrics": metrics}), reply_to=msg)


def embed_reply(msg: Message, node: NodeRuntime, cfg: dict) -> Message:
    """Shared-modality embeddings + own-modality tokens of the node's samples; no raw data."""
    b = cfg["binding"]
    label_task = None
    if b["use_labels"]:
        label_task = b.get("label_task") or next(iter(node.train.y))
    emb = node_embeddings(node.model, node.train, shared_modality(cfg), str(node.node), label_task)
    record, config = pack_upload(
        ids=emb.ids,
        shared=emb.shared,
        tokens=emb.tokens,
        present=emb.token_present,
        labels=emb.labels,
        privacy=PrivacyConfig(float(b["noise_sigma"]), bool(b["quantize"])),
        seed=int(msg.content["config"].get("server-round", 0)) * 101 + node.node,
    )
    config["partition-id"] = node.node
    config["held"] = list(node.modalities)
    return Message(RecordDict({"embeddings": record, "config": config}), reply_to=msg)


def store_partners(msg: Message, context: Context, node: NodeRuntime, cfg: dict) -> Message:
    """Keep the partners the server sent for the next rounds; reply with a summary
    (under SecAgg+ only the partition id: the node's counts stay hidden)."""
    record: ArrayRecord = msg.content["partners"]
    context.state[PARTNERS_KEY] = record
    if SecureSettings.from_config(cfg).enabled:
        return Message(
            RecordDict({"metrics": MetricRecord({"partition-id": float(node.node)})}),
            reply_to=msg,
        )
    summary = {"partition-id": float(node.node), "num-examples": float(node.num_train)}
    for m, (_, _, w) in unpack_partners(record).items():
        summary[f"partners.{m}"] = float((w > 0).sum())
        summary[f"refused.{m}"] = float((w <= 0).sum())
    return Message(RecordDict({"metrics": MetricRecord(summary)}), reply_to=msg)


def partner_tensors(context: Context, node: NodeRuntime) -> dict[str, PartnerTensors]:
    """Partners aligned to the node's own training samples (rows without one: weight 0)."""
    if PARTNERS_KEY not in context.state:
        return {}
    return align_partners(node.num_train, unpack_partners(context.state[PARTNERS_KEY]))
