"""How the two pytest workers share the suite (tests/work_units.py): a file per unit, and
every file that starts real server processes in the one unit that runs on one worker."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.work_units import (
    ONE_WORKER_FILES,
    REAL_PROCESSES,
    real_processes_first,
    scheduler_class,
    work_unit,
)

TESTS = Path(__file__).resolve().parent
# what a test file uses to start SuperLinks/SuperNodes or a Ray head as real processes
STARTS_SERVERS = re.compile(
    r"\b(ProcessTracker|LoopbackFederation|start_head|REAL_PROCESS_MARKS)\b"
)


@dataclass
class Item:
    nodeid: str


def test_a_file_is_a_unit_and_the_real_process_files_are_one():
    assert work_unit("tests/test_ports.py::test_x[a-b]") == "tests/test_ports.py"
    assert work_unit("tests/test_ports.py") == "tests/test_ports.py"
    assert work_unit("tests/test_faults.py::test_a") == REAL_PROCESSES
    assert work_unit("tests/test_deploy.py::test_b[x::y]") == REAL_PROCESSES


def test_every_test_file_that_starts_servers_runs_on_one_worker():
    starting = {
        path.name for path in TESTS.glob("test_*.py") if STARTS_SERVERS.search(path.read_text())
    }
    assert starting, "the pattern finds nothing: the helpers were renamed"
    assert starting - {"test_work_units.py"} <= ONE_WORKER_FILES
    assert all((TESTS / name).is_file() for name in ONE_WORKER_FILES)


def test_the_real_process_unit_goes_first_and_the_rest_keep_their_order():
    ids = ["tests/test_a.py::x", "tests/test_faults.py::y", "tests/test_b.py::z",
           "tests/test_deploy.py::w"]  # fmt: skip
    ordered = [item.nodeid for item in real_processes_first([Item(i) for i in ids])]
    assert ordered == [ids[1], ids[3], ids[0], ids[2]]


def test_the_scheduler_splits_by_work_unit():
    scheduling = pytest.importorskip("xdist.scheduler")
    cls = scheduler_class()
    assert issubclass(cls, scheduling.LoadFileScheduling)
    sched = cls.__new__(cls)  # _split_scope needs no state; a real one needs `-n`
    assert sched._split_scope("tests/test_flwr_run.py::test_x") == REAL_PROCESSES
    assert sched._split_scope("tests/test_ports.py::test_y") == "tests/test_ports.py"
