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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(levelname)-7s %(name)s: %(message)s"
# the top-level packages whose module loggers the handler serves
PACKAGES = ("fed_iotlm", "server", "clients", "simulations")
# each run's own log file, in its output folder beside results.json (``run.log`` is the
# name the studies give the captured console of a child run, so this one differs)
RUN_LOG = "fed-iotlm.log"


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


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates its file (and folder) at the first record, so a run
    refused before it logs anything leaves no folder behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self):  # noqa: ANN202 (logging's own signature)
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def run_log(path: Path, level: int = logging.INFO) -> Iterator[Path]:
    """While the block runs, also write our packages' records and Flower's to ``path``
    (appending: a resumed run keeps its earlier lines); the handler goes when the block
    ends, so runs made one after another in one process (studies, tests) each keep
    only their own lines.

    Why: Hydra's own job log is off (it would install a root handler and print
    Flower's lines twice), yet a run's folder should keep its progress, warnings and
    faults after the console has scrolled away: the round lines with their ETA, the
    nodes that failed, the resume point.  Flower's ``flwr`` logger is included so a
    failure's context (its own warnings) sits in the same file."""
    path = Path(path).resolve()
    loggers = [logging.getLogger(name) for name in (*PACKAGES, "flwr")]
    handler = _LazyFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))
    handler.setLevel(level)
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > level:
            lg.setLevel(level)
    try:
        yield path
    finally:
        for lg, old in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(old)
        handler.close()
