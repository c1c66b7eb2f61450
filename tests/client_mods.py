"""Flower client mods the tests install to see what nodes send."""

from __future__ import annotations

import json
from pathlib import Path


def train_keys_recorder(path: Path):
    """A client mod that appends the sorted array keys of every train reply to ``path``
    (one JSON list per line; Ray workers are other processes, so a file)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and "arrays" in reply.content:
            with path.open("a") as f:
                f.write(json.dumps(sorted(reply.content["arrays"].keys())) + "\n")
        return reply

    return mod
