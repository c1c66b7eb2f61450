"""Library code logs through per-module loggers (``logging.getLogger(__name__)``), the
entry points install one handler for our packages, and Flower's own lines are printed
once.  What a command prints for the user (a path, a table, an error line) stays print."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from fed_iotlm.tracking import RunRecorder

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("fed_iotlm", "server", "clients")
# modules that may print, and why: the user reads or scripts their output
PRINTS_FOR_THE_USER = {
    "fed_iotlm/cli.py": "the one-line user error",
    "fed_iotlm/commands": "each command's result: paths, summaries, tables, answers",
    "fed_iotlm/tracking.py": "the results table at the end of a run",
    "server/app.py": "the results.json path, the ServerApp's last line",
    "server/lora_app.py": "the results.json path, the ServerApp's last line",
    # the IoT-LM stage (fed_iotlm/llm) is not converted yet: its step lines and tables
    # still go through rich (issue 15, Build 5)
    "fed_iotlm/llm/stage.py": "not converted yet",
    "fed_iotlm/llm/seed_probe.py": "the probe's JSON report, the command's whole output",
}


def _allowed(rel: str) -> bool:
    return any(rel == key or rel.startswith(key + "/") for key in PRINTS_FOR_THE_USER)


def _prints_and_flower_logs(path: Path) -> list[str]:
    """``print(...)``/``console.print(...)`` calls and imports of Flower's ``log``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            fn = node.func
            if (isinstance(fn, ast.Name) and fn.id == "print") or (
                isinstance(fn, ast.Attribute) and fn.attr == "print"
            ):
                found.append(f"print at line {node.lineno}")
        from_flower = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr")
        if from_flower and any(alias.name == "log" for alias in node.names):
            found.append(f"flwr's log imported at line {node.lineno}")
    return found


def test_library_code_logs_instead_of_printing():
    offenders = {}
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found = _prints_and_flower_logs(path)
            if found and not _allowed(rel):
                offenders[rel] = found
    assert offenders == {}, "use log = logging.getLogger(__name__) in these modules"


def test_configure_prints_our_lines_once_and_flower_lines_once():
    """In a fresh process, as `fed-iotlm run` starts: configure twice (the CLI and the
    ServerApp both call it), then log through Flower's logger and two of ours."""
    code = """
import logging
from logging import INFO
from fed_iotlm.logs import configure
configure(); configure()
from flwr.common import log
log(INFO, "flower-line")
logging.getLogger("server.engine").info("server-line")
logging.getLogger("fed_iotlm.tracking").info("tracking-line")
logging.getLogger("fed_iotlm.tracking").debug("debug-line")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    err = proc.stderr
    assert err.count("flower-line") == 1, err
    assert err.count("INFO    server.engine: server-line") == 1, err
    assert err.count("INFO    fed_iotlm.tracking: tracking-line") == 1, err
    assert "debug-line" not in err and proc.stdout == ""


def test_the_dp_accountant_leaves_the_root_logger_alone():
    """opacus calls ``logging.basicConfig`` when imported; the first DP round imports it
    (epsilon_after), after which every Flower line printed twice.  In a fresh process:
    the accountant runs, the root logger has the handlers it had, each line prints once."""
    code = """
import logging, sys
from logging import INFO
from fed_iotlm.logs import configure
configure()
before = list(logging.getLogger().handlers)
from fed_iotlm.federation.privacy import epsilon_after
assert "opacus" not in sys.modules  # imported by the accountant, not with the module
eps = epsilon_after([(1.0, 1.0)], 1e-5)
assert "opacus" in sys.modules and eps > 0
print(logging.getLogger().handlers == before)
from flwr.common import log
log(INFO, "flower-line")
logging.getLogger("server.engine").info("server-line")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    err = proc.stderr
    assert proc.stdout.strip() == "True", err
    assert err.count("flower-line") == 1, err
    assert err.count("server-line") == 1, err


def test_a_round_line_is_logged_with_its_eta(tmp_path, caplog, capsys):
    cfg = {"rounds": 4, "method": "federated", "seed": 0, "mlflow": {"enabled": False}}
    recorder = RunRecorder(cfg, tmp_path, dataset="d", plan={})
    with caplog.at_level("INFO", logger="fed_iotlm.tracking"):
        recorder.log_round(1, 0.5, 1.0)
        recorder.log_round(2, 0.6, 0.9, nodes_sent=3, nodes_answered=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "fed_iotlm.tracking"]
    assert lines[0].startswith("round   1/4  accuracy 0.500  loss 1.000")
    assert "2/3 nodes answered" in lines[1] and ", ETA " in lines[1]
    assert capsys.readouterr().out == ""


def test_each_run_keeps_its_own_log_file(tmp_path):
    """run_experiment writes the run's progress to <output_dir>/fed-iotlm.log and takes
    its handler away at the end: two runs in one process (a study, this test) each
    keep only their own lines, and no handler is left behind."""
    import logging

    from fed_iotlm.logs import RUN_LOG
    from fed_iotlm.settings import compose
    from simulations.run import run_experiment

    for name, rounds in (("first", 1), ("second", 2)):
        small = ["data.num_train=400", "data.num_test=100", "train.steps=2"]
        cfg = compose(["experiment=quick", "method=local", f"rounds={rounds}", *small])
        run_experiment({**cfg, "mlflow": {**cfg["mlflow"], "enabled": False}}, tmp_path / name)
    first = (tmp_path / "first" / RUN_LOG).read_text()
    second = (tmp_path / "second" / RUN_LOG).read_text()
    assert "fed_iotlm.tracking: round   1/1" in first and "/2" not in first
    assert "fed_iotlm.tracking: round   2/2" in second and "round   1/1" not in second
    left = [
        h
        for name in ("fed_iotlm", "server", "flwr")
        for h in logging.getLogger(name).handlers
        if isinstance(h, logging.FileHandler)
    ]
    assert left == []
