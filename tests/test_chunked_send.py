"""The roll call / final evaluation helper keeps few messages in flight and loses none."""

from __future__ import annotations

import pytest

from server.chunked import send_and_receive_chunked


class RecordingGrid:
    """A Grid stand-in: answers every message at once and records each batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.timeouts: list[float] = []

    def send_and_receive(self, messages, *, timeout=None):
        batch = list(messages)
        self.batches.append(len(batch))
        self.timeouts.append(timeout)
        return [f"reply to {m}" for m in batch]


def _messages(n: int) -> list[int]:
    """Stand-ins for Messages (the helper only slices and forwards them)."""
    return list(range(n))


def test_every_message_sent_once_in_bounded_chunks() -> None:
    grid = RecordingGrid()
    replies = send_and_receive_chunked(grid, _messages(70), chunk=32, timeout=60.0)
    assert grid.batches == [32, 32, 6]
    assert replies == [f"reply to {i}" for i in range(70)]


def test_timeout_bounds_the_whole_call() -> None:
    grid = RecordingGrid()
    send_and_receive_chunked(grid, _messages(10), chunk=4, timeout=30.0)
    assert all(0 < t <= 30.0 for t in grid.timeouts)
    assert grid.timeouts == sorted(grid.timeouts, reverse=True)  # what is left, shrinking


def test_no_messages_and_bad_chunk() -> None:
    grid = RecordingGrid()
    assert send_and_receive_chunked(grid, [], timeout=1.0) == []
    assert grid.batches == []
    with pytest.raises(ValueError, match="chunk"):
        send_and_receive_chunked(grid, _messages(1), chunk=0, timeout=1.0)
