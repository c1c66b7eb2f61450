"""The round loop and the roll call, as the ServerApp runs them.

``run_rounds`` is what flwr's ``Strategy.start`` does (configure_train, send, aggregate,
server-side evaluation), minus client-side evaluation (this project sets
``fraction_evaluate=0`` and evaluates nodes once after the last round), but it can
start at any round: a resumed run continues at the round after its checkpoint with the
same calls an uninterrupted run makes there.

``identify_nodes`` asks every connected node for its partition id and modalities
(``query.identify``) before the first round, a chunk of nodes at a time
(:mod:`.chunked`: one message to each of 1000 simulated nodes at once is quadratic work
in Flower's simulation engine); :mod:`server.membership` asks newcomers the same
question before later rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .participation import RoundOutcome, sort_replies

if TYPE_CHECKING:
    from .membership import LiveRoster
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
    train_round: Callable[[int, ArrayRecord], ArrayRecord | None] | None = None,
    timeout: float = 3600.0,
    roster: LiveRoster | None = None,
    outcomes: dict[int, RoundOutcome] | None = None,
) -> ArrayRecord:
    """Rounds ``first``..``last``; ``before_round`` (MMBind's re-binding) runs before each,
    ``on_round`` (the checkpoint) after each.  ``train_round`` replaces the strategy's
    configure/send/aggregate step (secure aggregation, :mod:`server.secure_rounds`, which
    handles dropouts inside the SecAgg+ protocol).

    ``timeout`` is the round's reply deadline: what arrived by then is aggregated if at
    least the strategy's ``min_train_nodes`` answered, else the round is skipped and
    the model kept (:mod:`server.participation`; ``outcomes[rnd]`` says which, before
    ``evaluate_fn`` runs).  With a ``roster`` the strategy samples from one live node
    per partition, refreshed every round, so a restarted site is picked up again."""
    min_nodes = int(getattr(strategy, "min_train_nodes", 1))
    for rnd in range(first, last + 1):
        log(INFO, "[ROUND %s/%s]", rnd, last)
        if before_round is not None:
            before_round(rnd, arrays)
        if train_round is not None:
            new = train_round(rnd, arrays)
            if new is None:
                log(30, "round %s: no secure aggregate; keeping the model", rnd)
        else:
            new = _plaintext_round(
                grid, strategy, arrays, rnd, min_nodes, timeout, roster, outcomes
            )
        if new is not None:
            arrays = new
        evaluate_fn(rnd, arrays)
        if on_round is not None:
            on_round(rnd, arrays)
    return arrays


def _plaintext_round(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    rnd: int,
    min_nodes: int,
    timeout: float,
    roster: LiveRoster | None,
    outcomes: dict[int, RoundOutcome] | None,
) -> ArrayRecord | None:
    """configure_train, send, wait until ``timeout``, aggregate if enough answered."""
    minimum = int(getattr(strategy, "min_available_nodes", min_nodes))
    round_grid = grid if roster is None else roster.live_grid(grid, minimum, rnd)
    messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), round_grid))
    replies = grid.send_and_receive(messages, timeout=timeout)
    outcome = sort_replies(
        rnd, messages, replies, min_nodes, timeout, roster.partition_of if roster else None
    )
    if outcomes is not None:
        outcomes[rnd] = outcome
    new = None
    if not outcome.skipped:
        new, _ = strategy.aggregate_train(rnd, outcome.answered)
        if new is None:
            log(30, "round %s: no update aggregated; keeping the model", rnd)
    return new


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


def ask_identities(
    grid: Grid, node_ids: list[int], timeout: float
) -> tuple[dict[int, tuple[int, list[str], str]], dict[int, str]]:
    """``query.identify`` to ``node_ids``: node id -> (partition id, modalities, source)
    for those that answered, node id -> reason for those that failed or stayed silent."""
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=IDENTIFY)
        for n in node_ids
    ]
    identities: dict[int, tuple[int, list[str], str]] = {}
    errors: dict[int, str] = {}
    for r, sent in _pair_replies(
        messages, send_and_receive_chunked(grid, messages, timeout=timeout)
    ):
        node = sent.metadata.dst_node_id
        if r is None:
            errors[node] = f"no answer to the roll call in {timeout:.0f}s"
        elif r.has_error():
            errors[node] = r.error.reason
        else:
            identity = r.content["identity"]
            identities[node] = (
                int(identity["partition-id"]),
                list(identity.get("modalities", [])),  # none under SecAgg+: liveness only
                str(identity["source"]),
            )
    return identities, errors


def _pair_replies(sent: list[Message], replies: Iterable[Message]):
    by_id = {r.metadata.reply_to_message_id: r for r in replies}
    return [(by_id.get(m.metadata.message_id), m) for m in sent]


def identify_nodes(grid: Grid, expected: int, timeout: float = 900.0) -> Roster:
    """Every connected node's identity; a node that cannot serve the run fails it here,
    with that node's own error (e.g. an unusable ``data-dir``), before any round."""
    node_ids = list(grid.get_node_ids())
    identities, errors = ask_identities(grid, node_ids, timeout)
    if errors:
        raise RuntimeError(
            "SuperNode(s) cannot join the run:\n  "
            + "\n  ".join(f"node {n}: {reason}" for n, reason in errors.items())
        )
    ids: dict[int, int] = {}
    mods: dict[int, list[str]] = {}
    sources: dict[int, str] = {}
    for node_id, (pid, modalities, source) in identities.items():
        if pid in ids:
            raise RuntimeError(
                f"SuperNodes {ids[pid]} and {node_id} both have partition-id "
                f"{pid}: give each SuperNode a distinct --node-config partition-id"
            )
        ids[pid] = node_id
        mods[pid] = modalities
        sources[pid] = source
    missing = sorted(set(range(expected)) - set(ids))
    if missing:
        raise RuntimeError(f"no SuperNode has partition-id {missing} (expected 0..{expected - 1})")
    return Roster(ids, mods, sources)
