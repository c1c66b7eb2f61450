"""A node's upload to the central LM stage (``query.llm_upload``): tokens, never windows.

After the federation's last round the server sends the final model; the node runs its
frozen encoders on its own standardised training and test windows and answers with one
``ArrayRecord`` per part: a token per modality it holds, presence flags and the labels it
has (:mod:`fed_iotlm.llm.uploads`).  The noise and int8 knobs are the node's own run
config (``llm.upload``): the node, not the server, decides what leaves it.

The node's personal adapters (``personal.enabled``) are not put back for this message:
the centre recomputes fused embeddings and head predictions with the global bundle, so
the tokens must come from the same global encoders.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from fed_iotlm.federation.records import load_into, state_to_numpy
from fed_iotlm.llm.uploads import (
    PARTS,
    encode_tensors,
    pack_upload,
    upload_privacy,
    upload_seed,
)
from fed_iotlm.personal import without_personal

from .node import NodeRuntime
from .secure import received_state


def upload_reply(msg: Message, node: NodeRuntime, settings: dict) -> Message:
    """Load the final global model the server sent and answer with this node's upload
    of each part (``train``: its training samples, labels beyond its label fraction
    hidden as they are in training; ``test``: its test samples)."""
    shared = without_personal(state_to_numpy(node.model), node.personal_keys)
    load_into(node.model, received_state(msg, shared))
    privacy = upload_privacy(settings)
    seed = int(settings["seed"])
    content = RecordDict(
        {
            part: pack_upload(
                encode_tensors(node.model, getattr(node, part)),
                privacy,
                upload_seed(seed, node.node, part),
            )
            for part in PARTS
        }
    )
    content["config"] = ConfigRecord(
        {
            "partition-id": node.node,
            "modalities": list(node.modalities),
            "noise-sigma": privacy.noise_sigma,
            "quantize": privacy.quantize,
        }
    )
    return Message(content, reply_to=msg)
