"""``train.threads``: the torch CPU threads one training process uses, for every method.

Why one knob with a default of 1: a simulated node is one process among many on shared
cores, so the federated ClientApp always ran one torch thread; the in-process
baselines (centralized, local-only, centralized MMBind) ran torch's default, one thread
per core.  Beside any other job those threads spin on busy cores (HAPT's centralized
round took 357 s instead of ~12 s), and even on an idle machine a baseline would train
with more threads per process than the federation it is compared with.  With the same
value everywhere, every method gets the same threads per process; raise it for a
baseline alone on an idle machine, where it changes speed, not results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from fed_iotlm.config_schema import ConfigError, block, check_range

KEY = "train.threads"

F = TypeVar("F", bound=Callable[..., Any])


def train_threads(cfg: Mapping[str, Any]) -> int:
    """``train.threads`` of ``cfg`` (default 1), or a :class:`ConfigError` naming the key
    for a value that is not an integer >= 1 (a caller's dict skips composition's check)."""
    value = block(cfg, "train")["threads"]  # the schema refuses a non-integer, naming it
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config: {KEY}={value!r}: expected an integer")
    check_range(KEY, value)
    return value


def apply_threads(cfg: Mapping[str, Any]) -> int:
    """Set this process's torch threads to ``train.threads``; return the value."""
    threads = train_threads(cfg)
    torch.set_num_threads(threads)
    return threads


@contextmanager
def threads_of(cfg: Mapping[str, Any]) -> Iterator[int]:
    """``train.threads`` for the duration of an in-process run, then the caller's count
    again (a test or a notebook that runs a baseline keeps its own setting)."""
    before = torch.get_num_threads()
    threads = apply_threads(cfg)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def with_train_threads(run: F) -> F:
    """Decorate ``run(cfg, ...)`` (a baseline) to train under ``train.threads``; a bad
    value fails before any data is built."""

    @functools.wraps(run)
    def wrapper(cfg: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        with threads_of(cfg):
            return run(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
