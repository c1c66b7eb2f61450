"""Test hook: a node announces that a training round has started on it.

A fault test must kill a SuperNode while a round is *in flight*, and must know that
without guessing from timings.  A SuperNode started with
``--node-config '... fault-marker="/some/dir"'`` writes
``<dir>/train-p<partition-id>-r<round>`` (atomically, holding the ClientApp's process
id) when its ``train`` handler starts; tests/test_faults.py waits for that file and
then kills the node.  Without the key nothing is written: it is a test hook, not a
feature of a deployment.

``fault-hang=<round>`` (also a test hook) makes the node's ``train`` handler hang, alive
but never answering, in that server round after writing its marker: what
tests/test_hung_clientapp.py needs to show that a hung ClientApp is cut off at the round
deadline (clients/deadline.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fed_iotlm.atomic import atomic_write_text

FAULT_MARKER = "fault-marker"
FAULT_HANG = "fault-hang"


def marker_path(directory: str | Path, partition: int, server_round: int) -> Path:
    """Where the node of ``partition`` marks the start of ``server_round``."""
    return Path(directory) / f"train-p{partition}-r{server_round}"


def mark_train_start(node_config: Mapping[str, Any], partition: int, server_round: int) -> None:
    """Write the marker if the node config names a ``fault-marker`` directory."""
    directory = node_config.get(FAULT_MARKER)
    if not directory:
        return
    atomic_write_text(marker_path(str(directory), partition, server_round), f"{os.getpid()}\n")


def maybe_hang(node_config: Mapping[str, Any], server_round: int) -> None:
    """Block forever if the node config asks this round to hang (``fault-hang``)."""
    hang = node_config.get(FAULT_HANG)
    if hang is not None and int(hang) == server_round:
        threading.Event().wait()  # alive, heartbeating, never answering
