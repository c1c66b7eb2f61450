"""``query.identify``: a node tells the server who it is before any round.

The server needs each node's partition id and modalities without waiting for a
training round: to report the real plan of a deployed federation (each site reads its
own data, so the server cannot derive it from the run config), to fail at once with
the site's own error when a SuperNode's data directory is unusable, and, on resume, to
re-deliver MMBind partners to the right node (Flower node ids change across runs).
Nothing about the samples is sent beyond their count.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from .node import NodeRuntime

MESSAGE_TYPE = "query.identify"


def identify_reply(msg: Message, node: NodeRuntime) -> Message:
    """Partition id, modalities, data source (``partition`` or ``site``), train count."""
    config = ConfigRecord(
        {
            "partition-id": int(node.node),
            "modalities": list(node.modalities),
            "source": node.source,
            "num-train": int(node.num_train),
        }
    )
    return Message(RecordDict({"identity": config}), reply_to=msg)
