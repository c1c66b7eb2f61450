"""A hung ClientApp is cut off at the round deadline, so its SuperNode takes the next message.

A Flower 1.41 SuperNode handles one message at a time: it waits for the ClientApp's reply
before it pulls the next message.  A ClientApp that dies is noticed (its task heartbeat
stops and the SuperNode answers for it after up to 60 s); one that *hangs* (a stuck
sensor read, a deadlock) keeps its heartbeat going, so the site would miss every later
round of the run.  :func:`make_deadline_mod` runs each handler in a worker thread and
waits at most the round deadline (``strategy.round_timeout_s``, or ``secagg.timeout_s``
per protocol stage if that is longer; 900 s for the queries before the first round); past it the mod raises, Flower's
``flwr-clientapp`` sends that error as the node's reply and exits, which ends the hung
thread with its process.  The server has stopped waiting by then (it aggregated what
arrived in time, :mod:`server.participation`); the SuperNode pulls the next round's
message and the site takes part again.

Only where the ClientApp runs in a process of its own (``flwr-clientapp``, every
deployment): in the simulation engine a ClientApp shares a long-lived worker with
others, where an abandoned thread would keep running, so there the mod passes messages
through.  A hang that holds Python's GIL (a pure-C busy loop) cannot be cut off this way.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fed_iotlm.config_schema import block
from server.participation import round_timeout_s


class HandlerDeadlineExceeded(RuntimeError):
    """A handler was still running at the round deadline."""


# queries before the first round (roll call, statistics) need every node and the server
# waits this long for them (server/rounds.py, server/statistics.py): a cold start may be slow
QUERY_DEADLINE_S = 900.0


def handler_deadline_s(settings: dict, message_type: str = "train") -> float:
    """Seconds a handler may run: the round deadline, or a SecAgg+ stage's if longer;
    for ``query.*`` messages at least :data:`QUERY_DEADLINE_S`."""
    deadline = round_timeout_s(settings.get("strategy") or {})
    secure = block(settings, "secagg")
    if secure["enabled"]:
        deadline = max(deadline, float(secure["timeout_s"]))
    if message_type.startswith("query."):
        deadline = max(deadline, QUERY_DEADLINE_S)
    return deadline


def own_process() -> bool:
    """This ClientApp runs in Flower's one-message ``flwr-clientapp`` process."""
    return Path(sys.argv[0]).name == "flwr-clientapp"


def call_with_deadline(
    call_next: ClientAppCallable, msg: Message, context: Context, deadline_s: float
) -> Message:
    """``call_next(msg, context)`` in a daemon thread; an error past ``deadline_s``."""
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["reply"] = call_next(msg, context)
        except BaseException as err:  # re-raised in the calling thread below
            outcome["error"] = err

    worker = threading.Thread(target=work, name="clientapp-handler", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():
        raise HandlerDeadlineExceeded(
            f"{msg.metadata.message_type} handler still running after {deadline_s:g} s (the "
            "round deadline, strategy.round_timeout_s): cut off so this SuperNode can take "
            "the next message"
        )
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["reply"]  # type: ignore[return-value]


def make_deadline_mod(settings_of: Callable[[Context], dict]):
    """The Flower client mod (outermost) that cuts a hung handler off at the deadline."""

    def deadline_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not own_process():
            return call_next(msg, context)
        deadline = handler_deadline_s(settings_of(context), msg.metadata.message_type)
        return call_with_deadline(call_next, msg, context, deadline)

    return deadline_mod
