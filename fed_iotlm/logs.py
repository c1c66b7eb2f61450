"""Logging for fed-iotlm's modules: ``logging.getLogger(__name__)`` everywhere, one
handler on the ``fed_iotlm`` logger installed by the entry points.

Why a handler of our own: Hydra's job logging is off (Flower and rich print progress)
and a ServerApp or ClientApp started by Flower runs in a process nobody configured, so
without it INFO lines from our modules would vanish and warnings would lose their
module name."""

from __future__ import annotations

import logging

FORMAT = "%(levelname)-7s %(name)s: %(message)s"


def configure(level: int = logging.INFO) -> logging.Logger:
    """Give the ``fed_iotlm`` logger a stderr handler (once per process), unless the
    process's root logger already has one (an application, pytest): records propagate
    there and are not printed twice."""
    ours = logging.getLogger("fed_iotlm")
    if not logging.getLogger().handlers and not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        ours.addHandler(handler)
    ours.setLevel(level)
    return ours
