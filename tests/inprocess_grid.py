"""A Grid that runs the whole federation in this process, without Ray or a SuperLink.

Each message goes to the real ClientApp of its node (each node keeps its own state, so
SecAgg+'s per-node keys survive between stages), with a distinct message id so replies
pair up; a ClientApp that raises answers with an error reply, as Flower's engines do.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

NODES = {101: 0, 102: 1, 103: 2}  # node id -> partition id (experiment=quick: 3 nodes)


class Crash(RuntimeError):
    """The server dying between two rounds."""


class AppGrid:
    """``crash_at``: a (plaintext) train message of that round raises :class:`Crash`
    instead of being delivered (the server dies there)."""

    def __init__(self, app, crash_at: int | None = None, nodes: dict[int, int] | None = None):
        from flwr.app import RecordDict

        self.app, self.crash_at = app, crash_at
        self.nodes = dict(nodes or NODES)
        self.states = {node: RecordDict() for node in self.nodes}
        self.sent = 0
        self.run = SimpleNamespace(run_id=1)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            if self.crash_at is not None and _train_round(m) == self.crash_at:
                raise Crash(f"server died before round {self.crash_at}")
            self.sent += 1
            m.metadata.__dict__["_message_id"] = f"m{self.sent}"
            replies.append(self._deliver(m))
        return replies

    def _deliver(self, m):
        """``m`` to its node's ClientApp, as a copy: Flower serialises every message, and
        a handler (SecAgg+'s mod) that edits the content it gets must not edit what the
        server sends the next node."""
        from flwr.app import Context, Error, Message

        m = copy.deepcopy(m)
        node = m.metadata.dst_node_id
        node_config = {"partition-id": self.nodes[node], "num-partitions": len(self.nodes)}
        context = Context(1, node, node_config, self.states[node], {})
        try:
            return self.app(m, context)
        except Exception as err:  # as Flower's simulation engine reports it
            return Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=m)


def _train_round(m) -> int | None:
    """The round of a plaintext train message (None: another message)."""
    if m.metadata.message_type != "train" or "config" not in m.content:
        return None
    return int(m.content["config"].get("server-round", 0))
