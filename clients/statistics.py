"""A node's side of the federated input statistics (:mod:`fed_iotlm.federation.normalization`).

``query.stats``: per-channel sums of the node's training data, nothing per sample.
Every other message from the server carries the pooled mean/std; the node then trains
and evaluates on its data standardised with those (one cached view per statistics).
"""

from __future__ import annotations

from flwr.app import Message, RecordDict

from fed_iotlm.data.preprocess import ChannelSums
from fed_iotlm.federation.normalization import norm_from_message, normalization_mode, sums_record

from .node import NodeRuntime


def stats_reply(msg: Message, node: NodeRuntime) -> Message:
    """Sums, sums of squares and counts per channel of the node's training data."""
    if node.raw is None:
        raise RuntimeError(f"node {node.node} keeps no unstandardised data to sum")
    sums = ChannelSums.of(node.raw.train)
    return Message(RecordDict({"stats": sums_record(sums)}), reply_to=msg)


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
