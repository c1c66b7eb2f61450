"""``query.identify``: a node tells the server who it is before any round.

The server needs each node's partition id and modalities without waiting for a
training round: to report the real plan of a deployed federation (each site reads its
own data, so the server cannot derive it from the run config), to fail at once with
the site's own error when a SuperNode's data directory is unusable, and, on resume, to
re-deliver MMBind partners to the right node (Flower node ids change across runs).
Nothing about the samples is sent.  Under secure aggregation (``secagg.enabled``) the
node answers with liveness only (its partition id and data source, no modality list):
which groups it holds, and how many samples it has, travel only inside its masked
vectors (:mod:`fed_iotlm.federation.secure`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from fed_iotlm.federation.secure import SecureSettings

from .node import NodeRuntime

MESSAGE_TYPE = "query.identify"


def identify_reply(msg: Message, node: NodeRuntime, settings: dict) -> Message:
    """Partition id, data source (``partition`` or ``site``) and, unless secure
    aggregation hides them, the node's modalities."""
    identity = {"partition-id": int(node.node), "source": node.source}
    if not SecureSettings.from_config(settings).enabled:
        identity["modalities"] = list(node.modalities)
    return Message(RecordDict({"identity": ConfigRecord(identity)}), reply_to=msg)
