"""How ``make test``'s two pytest workers (pytest-xdist, ``--dist loadfile``) share the suite.

A unit of work is a test file, so a file's module-scoped fixtures (a real federation, a
trained model) are built once, on one worker. The files in :data:`ONE_WORKER_FILES`
start a real federation (SuperLink, SuperNodes, ClientApps, a Ray head): together they
are ONE unit, run first (it is the longest) and one file after another, because each
already loads both cores for minutes and has deadlines (round timeouts, waits for nodes)
that two such runs at once on 2 cores would miss; the other worker runs the in-process
tests meanwhile.

Why not ``xdist_group`` marks with ``--dist loadgroup``: xdist passes a test's group by
appending it to the test's node id, which pytest 9.2 no longer lets it change, so the
groups are silently ignored (pytest-dev/pytest-xdist#1386, open as of 2026-12). A unit
decided from the file name alone needs nothing from the workers but the node ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

REAL_PROCESSES = "real-processes"
# every test file that starts real Flower/Ray server processes (test_server_restart.py is
# `long`, left out of `make test`, and named so that `-m long -n 2` keeps it apart too)
ONE_WORKER_FILES = frozenset(
    {
        "test_faults.py",
        "test_deploy.py",
        "test_flwr_run.py",
        "test_ray_cluster.py",
        "test_server_restart.py",
    }
)


class HasNodeId(Protocol):
    nodeid: str


def work_unit(nodeid: str) -> str:
    """The unit of work of the test ``nodeid``: its file, or :data:`REAL_PROCESSES`."""
    path = nodeid.split("::", 1)[0]
    return REAL_PROCESSES if Path(path).name in ONE_WORKER_FILES else path


def real_processes_first(items: Sequence[HasNodeId]) -> list[HasNodeId]:
    """``items`` with the real-process unit first, otherwise in their order (xdist starts
    units in collection order under ``--no-loadscope-reorder``)."""
    return sorted(items, key=lambda item: work_unit(item.nodeid) != REAL_PROCESSES)


def scheduler_class() -> type:
    """xdist's file scheduling with :func:`work_unit` as the unit of work."""
    from xdist.scheduler import LoadFileScheduling

    class FileUnits(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return FileUnits


def make_scheduler(config, log):
    return scheduler_class()(config, log)
