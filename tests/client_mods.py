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


def round_marker(directory: Path, by_method: bool = False):
    """A client mod that marks every round a node runs: one line appended to
    ``directory/<message type>-r<server round>-p<partition id>`` per message, so a test
    can list which rounds ran (and catch one that ran twice) after the run.  ``by_method``
    (federated LoRA, several methods per run): ``<message type>.<method>`` instead."""

    def mod(msg, context, call_next):
        content = msg.content
        if "config" in content.config_records:
            config = content.config_records["config"]
        else:  # SecAgg+ train messages carry the round in the legacy fit config
            config = content.config_records.get("fitins.config", {})
        if "server-round" in config:
            kind = msg.metadata.message_type
            if by_method:
                kind = f"{kind}.{config['method']}"
            rnd, pid = int(config["server-round"]), int(context.node_config["partition-id"])
            name = f"{kind}-r{rnd}-p{pid}"
            with (directory / name).open("a") as f:
                f.write(f"{msg.metadata.message_id}\n")
        return call_next(msg, context)

    return mod


def rounds_run(directory: Path) -> dict[str, list[tuple[int, int]]]:
    """What :func:`round_marker` saw: message type -> sorted (round, partition) pairs,
    a pair listed once per message (so a repeated round shows twice)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for path in directory.iterdir():
        kind, rnd, part = path.name.rsplit("-", 2)
        times = len(path.read_text().splitlines())
        out.setdefault(kind, []).extend([(int(rnd[1:]), int(part[1:]))] * times)
    return {k: sorted(v) for k, v in out.items()}


def failing_train(failures: dict[str, dict[int, set[int]]]):
    """A client mod that makes the ``train`` handler raise, as a broken ClientApp would:
    in federated-LoRA method m's round r on the partitions ``failures[m][r]``."""

    def mod(msg, context, call_next):
        if msg.metadata.message_type == "train":
            config = msg.content["config"]
            method, rnd = str(config["method"]), int(config["server-round"])
            pid = int(context.node_config["partition-id"])
            if pid in failures.get(method, {}).get(rnd, ()):
                raise RuntimeError(f"injected failure: {method} round {rnd}, partition {pid}")
        return call_next(msg, context)

    return mod
