"""Stop the ServerApp when Flower's simulation runtime fails under it.

Why this exists: ``flwr.simulation.run_simulation`` (flwr 1.41) starts the ServerApp in
a non-daemon thread, then builds the backend (``ray.init`` and the actor pool) on the
calling thread.  When that fails (Ray's raylet aborts on a loaded machine, no simulated
node fits the resources, ...) ``run_simulation`` raises at once, but nothing tells the
ServerApp: its Grid keeps polling a link state nobody serves, so the roll call
(``server/roster.py``) waits out its 900 s timeout, and the interpreter waits for that
thread before it can exit.  Flower hands the ServerApp no stop signal, only its Grid,
so the stop travels through the Grid: once the runtime has failed, every Grid call
raises :class:`SimulationBackendError`, which names the failure and what to change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from server.roster import LiveNodesGrid

# how often a waiting send_and_receive pulls replies (flwr's InMemoryGrid: 0.1 s too)
PULL_INTERVAL_S = 0.1
# how long the caller waits for the ServerApp thread to end once stopped: it ends at
# its next Grid call (within PULL_INTERVAL_S while waiting for replies), then marks
# its MLflow run FAILED
JOIN_TIMEOUT_S = 30.0


class SimulationBackendError(RuntimeError):
    """The simulation runtime (Flower's backend, e.g. Ray) failed, so the run cannot go on."""


class RuntimeWatch:
    """Links the thread that runs ``run_simulation`` to the ServerApp thread it starts.

    The ServerApp runs :meth:`around` its own (on a Grid that can be stopped); when
    ``run_simulation`` raises, :meth:`ended` stops it and says what to raise."""

    def __init__(self, hint: str) -> None:
        self.hint = hint  # which settings to check, from the caller's simulation block
        self._stop = threading.Event()
        self._message = ""
        self.interrupted = False  # a Grid call was cut short by the stop
        self.server_thread: threading.Thread | None = None

    def wrap(self, grid: Grid) -> Grid:
        """The ServerApp's Grid, stoppable; called in the ServerApp's own thread."""
        self.server_thread = threading.current_thread()
        return StoppableGrid(grid, self)

    def around(self, app: ServerApp) -> ServerApp:
        """``app`` run on a stoppable Grid (whatever ``app`` wraps its Grid in, e.g. a
        test's recorder, wraps the stoppable one)."""
        watched = ServerApp()

        @watched.main()
        def main(grid: Grid, context: Context) -> None:
            app(self.wrap(grid), context)

        return watched

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the stop; True once stopped."""
        return self._stop.wait(seconds)

    def check(self) -> None:
        """Raise in the ServerApp thread once the runtime has failed."""
        if self._stop.is_set():
            self.interrupted = True
            raise SimulationBackendError(self._message)

    def ended(self, err: BaseException) -> BaseException:
        """``run_simulation`` raised ``err``: stop the ServerApp, wait for its thread,
        and return what the caller should raise: ``err`` itself where the ServerApp
        ended on its own (Flower re-raises the ServerApp's error) or ``err`` is not an
        ``Exception`` (Ctrl-C); otherwise a :class:`SimulationBackendError`."""
        self._message = backend_failure_message(err, self.hint)
        self._stop.set()
        thread = self.server_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT_S)
        ended_on_its_own = thread is not None and not thread.is_alive() and not self.interrupted
        if ended_on_its_own or not isinstance(err, Exception):
            return err
        return SimulationBackendError(self._message)


def run_watched(server_app: ServerApp, hint: str, **simulation: Any) -> None:
    """``flwr.simulation.run_simulation(server_app=..., **simulation)``; where the
    backend fails, the ServerApp is stopped too and a :class:`SimulationBackendError`
    naming the failure and ``hint`` (the settings to check) is raised."""
    from flwr.simulation import run_simulation

    watch = RuntimeWatch(hint)
    try:
        run_simulation(server_app=watch.around(server_app), **simulation)
    except BaseException as err:
        raised = watch.ended(err)
        if raised is err:
            raise
        raise raised from err


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s chain (Flower wraps the backend's error twice)."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or err.__context__
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def backend_failure_message(err: BaseException, hint: str) -> str:
    """One message: the runtime failed, the backend's own error, and what to change."""
    cause = root_cause(err)
    what = f"{type(cause).__name__}: {cause}".strip()
    return (
        f"the Flower simulation backend failed before the federation could run ({what}); "
        f"the ServerApp was stopped instead of waiting out its roll call. {hint}"
    )


class StoppableGrid(LiveNodesGrid):
    """The ServerApp's Grid, delegating to ``inner`` until the watch is stopped; then
    every call raises.  ``send_and_receive`` is flwr's push-then-pull loop, with the
    wait between pulls cut short by the stop."""

    def __init__(self, inner: Grid, watch: RuntimeWatch) -> None:
        super().__init__(inner, [])
        self.watch = watch

    def get_node_ids(self) -> Iterable[int]:
        self.watch.check()
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.watch.check()
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.watch.check()
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            self.watch.wait(PULL_INTERVAL_S)  # wakes at once on the stop; next pull raises
        return replies
