"""A simulation whose backend fails stops its ServerApp at once (simulations/runtime_watch.py).

Flower's ``run_simulation`` raises when its Ray backend cannot start, but the ServerApp
thread it started kept waiting in the roll call for 900 s (and held the interpreter
open).  The unit tests drive :class:`StoppableGrid` with a Grid that never answers; the
integration test runs a real simulation whose Ray backend cannot hold one node.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import pytest
from flwr.app import Message
from flwr.serverapp import Grid

from server.roster import LiveNodesGrid
from simulations.runtime_watch import RuntimeWatch, SimulationBackendError, root_cause


class SilentGrid(LiveNodesGrid):
    """Takes every message, answers none (a link state no backend serves)."""

    def __init__(self) -> None:
        super().__init__(None, [1, 2])  # type: ignore[arg-type]
        self.pushed = threading.Event()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed.set()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return []


def _serve_in_thread(watch: RuntimeWatch, silent: SilentGrid, outcome: dict) -> threading.Thread:
    """A stand-in ServerApp thread: it takes its Grid from the watch (as the watched
    ServerApp does), then one send_and_receive without a timeout."""

    def main() -> None:
        grid = watch.wrap(silent)
        try:
            outcome["replies"] = grid.send_and_receive([object(), object()], timeout=None)
        except SimulationBackendError as err:
            outcome["error"] = err
        outcome["grid"] = grid

    thread = threading.Thread(target=main, daemon=True)  # a broken stop must not hang pytest
    thread.start()
    return thread


def _backend_error() -> RuntimeError:
    """What run_simulation raises when the backend fails: the cause wrapped twice."""
    try:
        try:
            try:
                raise ValueError("ActorPool is empty")
            except ValueError as e:
                raise RuntimeError("Simulation Runtime crashed.") from e
        except RuntimeError as e:
            raise RuntimeError("An error was encountered. Ending simulation.") from e
    except RuntimeError as e:
        return e


def test_a_failed_backend_releases_a_serverapp_waiting_for_replies():
    watch = RuntimeWatch("Check simulation.cpus_per_node.")
    silent, outcome = SilentGrid(), {}
    thread = _serve_in_thread(watch, silent, outcome)
    assert silent.pushed.wait(30)  # the roll call is out and waiting (no timeout at all)
    assert watch.server_thread is thread
    raised = watch.ended(_backend_error())
    assert not thread.is_alive()  # released, not left waiting
    assert "replies" not in outcome  # its wait never ran out: it was stopped
    assert isinstance(raised, SimulationBackendError)
    assert isinstance(outcome["error"], SimulationBackendError)
    for text in (str(raised), str(outcome["error"])):
        assert "ValueError: ActorPool is empty" in text  # the backend's own error
        assert "Check simulation.cpus_per_node." in text  # what to change
    with pytest.raises(SimulationBackendError):  # and any later Grid call fails too
        outcome["grid"].get_node_ids()


def test_the_serverapps_own_error_is_raised_unchanged():
    watch = RuntimeWatch("hint")
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    watch.server_thread = thread  # it ended on its own; Flower re-raises its error
    own = ValueError("strategy.min_nodes=9 > 3 nodes")
    assert watch.ended(own) is own


def test_ctrl_c_passes_through_but_still_stops_the_serverapp():
    watch = RuntimeWatch("hint")
    silent, outcome = SilentGrid(), {}
    thread = _serve_in_thread(watch, silent, outcome)
    assert silent.pushed.wait(30)
    stop = KeyboardInterrupt()
    assert watch.ended(stop) is stop
    assert not thread.is_alive() and isinstance(outcome["error"], SimulationBackendError)


def test_root_cause_follows_the_chain():
    assert str(root_cause(_backend_error())) == "ActorPool is empty"
    plain = OSError("x")
    assert root_cause(plain) is plain


class Recorder(LiveNodesGrid):
    """Records how each of the ServerApp's send_and_receive calls ended."""

    def __init__(self, inner: Grid, log: list) -> None:
        super().__init__(inner, [])
        self.log = log

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        try:
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        except Exception as err:
            self.log.append(("raised", type(err).__name__))
            raise
        self.log.append(("returned", len(replies), len(messages)))
        return replies


@pytest.mark.integration
def test_a_simulation_whose_ray_backend_cannot_start_fails_at_once(quick_cfg, tmp_path):
    """One simulated node needs 1000 GPUs of a private Ray (the CPU share fits, so the
    settings check before Ray starts passes): Flower's actor pool is empty and its
    backend fails; the run must fail with that error and the settings to
    change, the ServerApp thread must be gone, its roll call cut short (not timed out)."""
    from simulations.run import run_experiment

    cfg = quick_cfg("simulation.num_cpus=1", "simulation.gpus_per_node=1000")
    calls: list = []
    threads: list[threading.Thread] = []

    def hook(grid: Grid) -> Grid:
        threads.append(threading.current_thread())
        return Recorder(grid, calls)

    with pytest.raises(SimulationBackendError) as err:
        run_experiment(cfg, tmp_path / "run", grid_hook=hook)
    text = str(err.value)
    # the backend's own error: the empty actor pool, or on a loaded machine Ray's own
    # start may fail first ("The current node timed out during startup")
    cause = root_cause(err.value)
    assert cause is not err.value and str(cause) in text, text
    assert "simulation backend failed" in text
    assert "simulation.gpus_per_node=1000" in text and "simulation.num_cpus=1" in text
    assert len(threads) == 1 and not threads[0].is_alive()  # the ServerApp thread ended
    # no exchange with the nodes ever returned (a roll call that times out returns)
    assert all(c == ("raised", "SimulationBackendError") for c in calls), calls
    assert not (tmp_path / "run" / "results.json").exists()
