"""Flower client mods the tests install to see what nodes send."""

from __future__ import annotations

import json
from pathlib import Path

from fed_iotlm.federation.records import record_to_numpy


def train_keys_recorder(path: Path):
    """A client mod that appends the sorted array keys of every train reply to ``path``
    (one JSON list per line; Ray workers are other processes, so a file)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and "arrays" in reply.content:
            with path.open("a") as f:
                keys = record_to_numpy(reply.content["arrays"])  # packed or per key
                f.write(json.dumps(sorted(keys)) + "\n")
        return reply

    return mod
