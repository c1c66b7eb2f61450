"""A hung (not dead) ClientApp is cut off at the round deadline: unit tests of
:func:`clients.deadline.call_with_deadline` (a handler that never returns, one that
raises, one that answers) and of the deadline itself.

The same with real processes (a SuperNode whose ``train`` handler hangs, alive and
heartbeating, is cut off; the same node answers the round's evaluation and the
final one) is ``test_hung_clientapp_is_cut_off_and_its_site_answers_again`` in
tests/test_faults.py, which shares one real-process run with the crash test.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from clients.deadline import HandlerDeadlineExceeded, call_with_deadline, handler_deadline_s


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
