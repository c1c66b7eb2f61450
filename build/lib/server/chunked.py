"""Send a message to every node without flooding Flower's simulation engine.

Why this exists: under ``flwr.simulation.run_simulation`` (flwr 1.41), the Simulation
Runtime's feeder thread (``vce_api.add_messages_to_queue``) asks the in-memory link
state, every 0.1 s and for EACH of the N registered nodes, for that node's next
message; ``InMemoryLinkState.get_message_ins`` answers by scanning every message still
in the store (expiry check included).  One poll therefore costs O(N x messages in
flight) Python work under the GIL.  A roll call or a final evaluation that puts one
message per node in flight at once makes that O(N^2) per poll: at 1000 nodes each poll
took seconds and starved the threads that hand messages to the Ray actors.
Keeping at most ``chunk`` messages in flight bounds a poll at O(N x chunk).  Per-round
training is unaffected as long as the number of sampled nodes is small.

On a deployed SuperLink (``flwr run``) chunking only adds a little latency per chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

# Messages in flight at once for the once-per-run calls to every node (roll call, final
# evaluation): a few per simulated node worker keeps the workers busy, while the
# engine's per-poll scan stays small at 1000 nodes.
DEFAULT_CHUNK = 32


def send_and_receive_chunked(
    grid: Grid, messages: Iterable[Message], *, chunk: int = DEFAULT_CHUNK, timeout: float
) -> list[Message]:
    """``grid.send_and_receive`` in chunks of ``chunk`` messages; ``timeout`` bounds the
    whole call (not each chunk).  Replies of all chunks, in chunk order."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    pending = list(messages)
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    for start in range(0, len(pending), chunk):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        replies.extend(grid.send_and_receive(pending[start : start + chunk], timeout=left))
    return replies
