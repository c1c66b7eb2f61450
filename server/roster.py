"""Who serves each partition id: the roll call before round 1 and the live roster.

The roll call before round 1 (:func:`identify_nodes`, ``query.identify``, a chunk of
nodes at a time: :mod:`.chunked`) maps partition
ids to Flower node ids.  A site that crashes and is restarted keeps its
``--node-config partition-id`` but may come back under a *new* node id (a SuperNode
without a registered key draws a fresh key, hence a fresh id, at every start), while
the SuperLink keeps listing the dead id as online until it has missed its heartbeats
(up to 2 × 30 s in Flower 1.41).  So before every round the roster asks only the node
ids it has not seen (``query.identify``), lets a known partition's newest node replace
its older one, and hands the strategy a Grid whose ``get_node_ids`` lists exactly one
live node per partition: flwr's node sampling then draws from sites that can answer,
and never sends one site's round twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from .chunked import send_and_receive_chunked

log = logging.getLogger(__name__)

IDENTIFY = "query.identify"


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


class LiveNodesGrid(Grid):
    """A Grid that delegates everything to ``inner`` but lists only ``node_ids``.

    flwr's strategies sample from ``grid.get_node_ids()``; this is how the roster's
    choice reaches them without re-implementing their sampling."""

    def __init__(self, inner: Grid, node_ids: Iterable[int]) -> None:
        self.inner = inner
        self.node_ids = list(node_ids)

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class LiveRoster:
    """Partition id -> the newest Flower node id that answered for it.

    ``identify_timeout_s`` bounds the roll call of newcomers; ``wait_s`` how long a
    round waits for enough sites to be connected before the run stops."""

    def __init__(
        self, roster: Roster, expected: int, *, identify_timeout_s: float, wait_s: float
    ) -> None:
        self.node_ids: dict[int, int] = dict(roster.node_ids)
        self.modalities: dict[int, list[str]] = dict(roster.modalities)
        self.expected = expected
        self.identify_timeout_s = identify_timeout_s
        self.wait_s = wait_s
        # rejoins since the round engine last asked (take_rejoins): each lands in the
        # record of the round it happened in, never accumulates here
        self._rejoins: list[dict] = []

    @property
    def partition_of(self) -> dict[int, int]:
        """Flower node id -> partition id (current entries only)."""
        return {n: p for p, n in self.node_ids.items()}

    def refresh(self, grid: Grid, rnd: int = 0) -> list[int]:
        """Identify connected nodes the roster has not seen; return the live node id of
        every partition that has one, in partition order."""
        connected = list(grid.get_node_ids())
        known = set(self.node_ids.values())
        newcomers = [n for n in connected if n not in known]
        if newcomers:
            self._admit(grid, newcomers, rnd)
        online = set(connected)
        return [self.node_ids[p] for p in sorted(self.node_ids) if self.node_ids[p] in online]

    def _admit(self, grid: Grid, newcomers: list[int], rnd: int) -> None:
        identities, errors = ask_identities(grid, newcomers, self.identify_timeout_s)
        for node_id, reason in errors.items():  # asked again next round
            log.warning("round %s: node %s cannot join: %s", rnd, node_id, reason)
        for node_id, (pid, mods, _source) in sorted(identities.items()):
            if not 0 <= pid < self.expected:
                log.warning("round %s: node %s has partition-id %s, outside 0..%s; not admitted",
                    rnd, node_id, pid, self.expected - 1,
                )  # fmt: skip
                continue
            old = self.node_ids.get(pid)
            if mods != self.modalities.get(pid):
                log.warning("round %s: partition %s now reports modalities %s (was %s)",
                    rnd, pid, mods, self.modalities.get(pid),
                )  # fmt: skip
            self.node_ids[pid], self.modalities[pid] = node_id, mods
            self._rejoins.append({"round": rnd, "partition": pid, "node": node_id, "was": old})
            log.info("round %s: partition %s rejoined as node %s (was %s)", rnd, pid, node_id, old)

    def take_rejoins(self) -> list[dict]:
        """The rejoins since the last call (``{"round", "partition", "node", "was"}``),
        handed over: the round engine puts them into that round's record."""
        taken, self._rejoins = self._rejoins, []
        return taken

    def live_grid(self, grid: Grid, minimum: int, rnd: int = 0) -> LiveNodesGrid:
        """A Grid listing one live node per partition, once at least ``minimum`` are
        connected; fails after ``wait_s`` (the last checkpoint allows ``resume=true``)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            live = self.refresh(grid, rnd)
            if len(live) >= minimum:
                return LiveNodesGrid(grid, live)
            if time.monotonic() > deadline:
                have = sorted(self.partition_of[n] for n in live)
                raise RuntimeError(
                    f"round {rnd}: only {len(live)} site(s) connected (partitions {have}) after "
                    f"{self.wait_s:.0f} s, strategy.min_nodes={minimum}; restart the missing "
                    "SuperNodes and continue with resume=true"
                )
            time.sleep(1.0)  # sites are (re)connecting; polling the Grid is all it offers
