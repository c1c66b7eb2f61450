"""Logging for fed-iotlm's modules: ``log = logging.getLogger(__name__)`` in every module
of ``fed_iotlm``, ``server``, ``clients`` and ``simulations``, and one handler for those
packages, installed once by the entry points (``fed-iotlm``, ``simulations.run``, the
ServerApps, the in-process studies).

Why a handler of our own rather than ``logging.basicConfig``: Flower's ``flwr`` logger
has its own console handler and propagates to the root logger, so a root handler would
print every Flower line twice.  Hydra's job logging is off, and a ServerApp started by
Flower runs in a process nobody configured: without this handler INFO lines from our
modules (round progress, resume, binding) would vanish and warnings would lose their
module name."""

from __future__ import annotations

import logging

FORMAT = "%(levelname)-7s %(name)s: %(message)s"
# the top-level packages whose module loggers the handler serves
PACKAGES = ("fed_iotlm", "server", "clients", "simulations")


def configure(level: int = logging.INFO) -> logging.Logger:
    """Give our packages' loggers one stderr handler (once per process) and ``level``,
    unless the process's root logger already has a handler (an application that set up
    logging, pytest): records propagate there and are not printed twice.  Returns the
    ``fed_iotlm`` logger."""
    loggers = [logging.getLogger(name) for name in PACKAGES]
    configured = any(lg.handlers for lg in loggers)
    if not logging.getLogger().handlers and not configured:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        for lg in loggers:
            lg.addHandler(handler)
    for lg in loggers:
        lg.setLevel(level)
    return loggers[0]
