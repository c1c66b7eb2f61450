"""A hung (not dead) ClientApp is cut off at the round deadline; its site answers again.

Unit tests of :func:`clients.deadline.call_with_deadline` first (a handler that never
returns, one that raises, one that answers).  Then real processes on loopback, as in
tests/test_faults.py: one SuperLink, three SuperNodes reading their own site
directories, ``flwr run`` with ``strategy.min_nodes=2``.  Partition 2 is started with
``fault-hang=1`` (a test hook, clients/fault_marker.py): its ``train`` handler blocks
forever in round 1, alive and heartbeating.  Round 1 must complete with the two other
sites; the hung handler is cut off at the deadline, so the same SuperNode (the same
Flower node id, no restart) answers round 2 and the final evaluation.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from clients.deadline import HandlerDeadlineExceeded, call_with_deadline, handler_deadline_s
from clients.fault_marker import marker_path
from tests.flower_procs import REAL_PROCESS_MARKS
from tests.loopback_federation import LoopbackFederation

CONNECTION = "fed-iotlm-hung"
HUNG = 2  # partition id whose train handler hangs in round 1
ROUNDS = 2
# above an honest round, a cold ClientApp start included, on 2 cores shared with other work;
# the hung round lasts this long
ROUND_TIMEOUT_S = 90  # as tests/test_faults.py; at 60 s a load of ~28 made every node miss a round
RUN_TIMEOUT_S = 900


def _message():
    """All :func:`call_with_deadline` reads of a message (a real Message needs a run)."""
    return SimpleNamespace(metadata=SimpleNamespace(message_type="train"))


def test_a_handler_past_the_deadline_is_cut_off_with_an_error():
    release = threading.Event()

    def hangs(msg, context):
        release.wait()  # ends when the test is over (the daemon thread would too)

    try:
        with pytest.raises(HandlerDeadlineExceeded, match="train handler still running after"):
            call_with_deadline(hangs, _message(), _context(), deadline_s=0.2)
    finally:
        release.set()


def test_a_handler_within_the_deadline_answers_or_raises_as_it_would():
    reply = object()  # whatever the handler returns is the reply
    assert call_with_deadline(lambda m, c: reply, _message(), _context(), 30.0) is reply

    def fails(msg, context):
        raise ValueError("node 3: bad data")

    with pytest.raises(ValueError, match="node 3: bad data"):
        call_with_deadline(fails, _message(), _context(), 30.0)


def test_the_deadline_is_the_round_deadline_or_a_longer_secagg_stage():
    assert handler_deadline_s({"strategy": {"round_timeout_s": 45}}) == 45
    secure = {"strategy": {"round_timeout_s": 45}, "secagg": {"enabled": True, "timeout_s": 90}}
    assert handler_deadline_s(secure) == 90
    assert handler_deadline_s(secure, "query.identify") == 900  # the roll call's patience
    with pytest.raises(ValueError, match="round_timeout_s"):
        handler_deadline_s({"strategy": {"round_timeout_s": -1}})


def _context():
    return SimpleNamespace(node_config={})


def _real_processes(test):
    for mark in REAL_PROCESS_MARKS:  # integration, Linux, the flwr CLI
        test = mark(test)
    return test


@_real_processes
def test_hung_clientapp_is_cut_off_and_its_site_answers_the_next_round(tmp_path):
    fed = LoopbackFederation(tmp_path, CONNECTION)
    try:
        fed.start(extra={HUNG: "fault-hang=1"})
        started = time.monotonic()
        run_id = fed.run(
            f"rounds={ROUNDS}",
            "train.epochs=1",
            "strategy.min_nodes=2",
            f"strategy.round_timeout_s={ROUND_TIMEOUT_S}",
            "mlflow.enabled=false",
            f"output_dir={tmp_path / 'out'}",
        )
        res = fed.wait_for_results(tmp_path / "out" / "results.json", run_id, RUN_TIMEOUT_S)
        elapsed = time.monotonic() - started

        # the hang really happened: the handler started round 1 and never answered it
        assert marker_path(fed.sites.markers, HUNG, 1).exists()
        history = {h["round"]: h for h in res["history"]}
        assert sorted(history) == list(range(1, ROUNDS + 1)), res["history"]
        hung_round = history[1]
        assert hung_round["nodes_sent"] == 3 and hung_round["nodes_answered"] == 2, hung_round
        assert hung_round["round_skipped"] == 0, hung_round
        fault = res["faults_by_round"]["1"]
        assert any(f"partition {HUNG}" in w for w in fault["failed"] + fault["missing"]), fault
        # cut off at the deadline, the same SuperNode (no restart) answers round 2 ...
        assert history[2]["nodes_answered"] == 3, history[2]
        assert {p for ns in res["holders_by_round"]["2"].values() for p in ns} >= {str(HUNG)}
        assert not [j for j in res.get("rejoined", []) if j["partition"] == HUNG]
        # ... and the final evaluation
        assert sorted(res["test"]["accuracy_by_node"]) == ["0", "1", "2"], res["test"]
        print(f"hung ClientApp: {ROUNDS} rounds in {elapsed:.1f} s; round 1: {fault}")
    finally:
        fed.stop()
