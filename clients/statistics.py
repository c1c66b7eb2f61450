"""A node's side of the federated input statistics (:mod:`fed_iotlm.federation.normalization`).

``query.stats``: per-channel sums of the node's training data, nothing per sample.
Every other message from the server carries the pooled mean/std; the node then trains
and evaluates on its data standardised with those (one cached view per statistics).
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.common import parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

from fed_iotlm.data.preprocess import ChannelSums
from fed_iotlm.federation.class_balance import ASK_COUNTS, COUNTS_KEY, counts_record
from fed_iotlm.federation.normalization import norm_from_message, normalization_mode, sums_record
from fed_iotlm.federation.secure import SecureSettings
from fed_iotlm.federation.secure_statistics import (
    KEY_MODALITIES,
    KEY_TASKS,
    STATS_PHASE,
    StatsLayout,
    held_modalities,
)
from fed_iotlm.models.class_weights import class_counts

from .node import NodeRuntime
from .secure import LEGACY_PARAMS, _legacy_reply, census_of, phase, released, train_config


def stats_reply(msg: Message, node: NodeRuntime) -> Message:
    """Sums, sums of squares and counts per channel of the node's training data, and,
    when the server asks (``train.class_weighting=balanced``), its per-task class counts
    of labelled training samples (:mod:`fed_iotlm.federation.class_balance`)."""
    if node.raw is None:
        raise RuntimeError(f"node {node.node} keeps no unstandardised data to sum")
    sums = ChannelSums.of(node.raw.train)
    reply = RecordDict({"stats": sums_record(sums)})
    if bool(train_config(msg).get(ASK_COUNTS, False)):
        counts = class_counts(node.raw.train.y, node.model.spec.tasks)
        reply[COUNTS_KEY] = counts_record(counts)
    return Message(reply, reply_to=msg)


def is_secure_statistics(msg: Message) -> bool:
    """A SecAgg+ message of the statistics round (its census or its sum)."""
    if phase(msg) == STATS_PHASE:
        return True
    return phase(msg) == "census" and census_of(msg) == STATS_PHASE


def secure_stats_reply(msg: Message, node: NodeRuntime, settings: dict) -> Message:
    """Under SecAgg+: the node's modality flags (census) or its fixed-length statistics
    vector (:class:`~fed_iotlm.federation.secure_statistics.StatsLayout`), masked by the
    mod; nothing of it is readable by the server alone."""
    if node.raw is None:
        raise RuntimeError(f"node {node.node} keeps no unstandardised data to sum")
    secure = SecureSettings.from_config(settings)
    config = train_config(msg)
    modalities = str(config.get(KEY_MODALITIES, ""))
    templates = parameters_to_ndarrays(
        arrayrecord_to_parameters(msg.content.array_records[LEGACY_PARAMS], keep_input=True)
    )
    if phase(msg) == "census":  # no templates go down with the census: flags only
        mods = [m for m in modalities.split(",") if m]
        layout = StatsLayout.of({m: (1,) for m in mods}, secure)
        return _legacy_reply(msg, layout.census(held_modalities(node.raw.train)))
    tasks = str(config.get(KEY_TASKS, ""))  # class_weighting=balanced: class counts too
    layout = StatsLayout.from_message(modalities, templates, secure, tasks)
    vector = layout.encode(node.raw.train, secure, released(msg) or set(), f"node {node.node}")
    return _legacy_reply(msg, vector)


def standardized_for(msg: Message, node: NodeRuntime, settings: dict) -> NodeRuntime:
    """The node as this message needs it: standardised with the statistics the server
    attached (``normalization=federated``) or with its own (``per_site``)."""
    mode = normalization_mode(settings)
    if mode == "per_site":
        return node
    found = norm_from_message(msg)
    if found is None:
        raise RuntimeError(
            f"node {node.node}: normalization=federated but the server's "
            f"{msg.metadata.message_type} message carries no pooled statistics ('norm')"
        )
    scaler, digest = found
    return node.standardized(scaler, digest)
