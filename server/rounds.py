"""The round loop and the roll call, as the ServerApp runs them.

``run_rounds`` is what flwr's ``Strategy.start`` does (configure_train, send, aggregate,
server-side evaluation), minus client-side evaluation (this project sets
``fraction_evaluate=0`` and evaluates nodes once after the last round), but it can
start at any round: a resumed run continues at the round after its checkpoint with the
same calls an uninterrupted run makes there.

``identify_nodes`` asks every connected node for its partition id and modalities
(``query.identify``) before the first round, a chunk of nodes at a time
(:mod:`.chunked`: one message to each of 1000 simulated nodes at once is quadratic work
in Flower's simulation engine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .chunked import send_and_receive_chunked

IDENTIFY = "query.identify"


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    *,
    first: int,
    last: int,
    evaluate_fn: Callable[[int, ArrayRecord], object],
    on_round: Callable[[int, ArrayRecord], None] | None = None,
    before_round: Callable[[int, ArrayRecord], None] | None = None,
    timeout: float = 3600.0,
) -> ArrayRecord:
    """Rounds ``first``..``last``; ``before_round`` (MMBind's re-binding) runs before each,
    ``on_round`` (the checkpoint) after each."""
    for rnd in range(first, last + 1):
        log(INFO, "[ROUND %s/%s]", rnd, last)
        if before_round is not None:
            before_round(rnd, arrays)
        messages = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        new, _ = strategy.aggregate_train(rnd, replies)
        if new is None:
            log(30, "round %s: no update aggregated; keeping the model", rnd)
        else:
            arrays = new
        evaluate_fn(rnd, arrays)
        if on_round is not None:
            on_round(rnd, arrays)
    return arrays


@dataclass(frozen=True)
class Roster:
    """Who answered the roll call: partition id -> Flower node id, modalities, source."""

    node_ids: dict[int, int]
    modalities: dict[int, list[str]]
    sources: dict[int, str]

    @property
    def plan(self) -> dict[str, list[str]]:
        """``{"0": ["imu", "audio"], ...}`` as results.json records it."""
        return {str(p): self.modalities[p] for p in sorted(self.modalities)}

    @property
    def deployed(self) -> bool:
        """Some node reads its own data directory (the server's layout is not its data)."""
        return any(s == "site" for s in self.sources.values())


def identify_nodes(grid: Grid, expected: int, timeout: float = 900.0) -> Roster:
    """Every connected node's identity; a node that cannot serve the run fails it here,
    with that node's own error (e.g. an unusable ``data-dir``), before any round."""
    node_ids = list(grid.get_node_ids())
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=IDENTIFY)
        for n in node_ids
    ]
    replies = send_and_receive_chunked(grid, messages, timeout=timeout)
    errors = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
    if errors:
        raise RuntimeError("SuperNode(s) cannot join the run:\n  " + "\n  ".join(errors))
    if len(replies) != len(node_ids):
        raise RuntimeError(
            f"only {len(replies)} of {len(node_ids)} nodes answered the roll call in {timeout:.0f}s"
        )
    ids: dict[int, int] = {}
    mods: dict[int, list[str]] = {}
    sources: dict[int, str] = {}
    for r in replies:
        identity = r.content["identity"]
        pid = int(identity["partition-id"])
        if pid in ids:
            raise RuntimeError(
                f"SuperNodes {ids[pid]} and {r.metadata.src_node_id} both have partition-id "
                f"{pid}: give each SuperNode a distinct --node-config partition-id"
            )
        ids[pid] = r.metadata.src_node_id
        mods[pid] = list(identity["modalities"])
        sources[pid] = str(identity["source"])
    missing = sorted(set(range(expected)) - set(ids))
    if missing:
        raise RuntimeError(f"no SuperNode has partition-id {missing} (expected 0..{expected - 1})")
    return Roster(ids, mods, sources)
