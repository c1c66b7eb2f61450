"""Shared by the studies: one resumable run per (point, method, seed), in a subprocess.

Each run is ``python -m simulations.run`` in its own process so that every federation
gets a fresh Ray; a run whose results.json exists is not repeated, so an interrupted
study resumes where it stopped.  The cache is keyed on the code version and the experiment
as well as the overrides (commit, and a hash of the uncommitted diff when the tree is dirty), so rows
computed by different code never sit side by side; :func:`fed_iotlm.protocol.one_code_version` refuses a
table that would mix them anyway (results copied in by hand).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fed_iotlm.protocol import NOT_CODE, code_version, version_label
from fed_iotlm.report.page import mean_ci95
from fed_iotlm.report.runs import Run, load_runs
from simulations.study_progress import current, follow_child

REPO = Path(__file__).resolve().parents[1]
# the store every study run logs to and every study page is read from: the config's own
# default (``mlflow.tracking_uri: sqlite:///mlflow.db``) as the runs resolve it, their
# working directory being the checkout, spelled out so a page read from elsewhere finds it
TRACKING_URI = f"sqlite:///{REPO / 'mlflow.db'}"


def point_key(overrides: list[str], version: str | None = None, *, experiment: str | None) -> str:
    """Run folder of a point: the same experiment and overrides under the same code
    version share their runs (``version`` defaults to this checkout's, :func:`code_key`).

    ``experiment`` is the ``experiment=NAME`` :func:`run_one` composes the run from: it
    picks the config without being one of ``overrides``, so two studies with equal
    overrides (ExtraSensory natural and withheld) would otherwise share a folder and the
    second would read the first's results.  None only for a command that composes no
    experiment (``fed-iotlm tune`` in the transfer study): its runs keep their keys."""
    version = version if version is not None else code_key()
    picked = "" if experiment is None else f"experiment={experiment}|"
    key = f"{version}|{picked}{' '.join(sorted(overrides))}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def code_key() -> str:
    """The commit, plus a hash of the uncommitted diff when the tree is dirty; outside a
    checkout the installed package's version (``fed-iotlm==0.1.0``), or ``unknown``."""
    version = code_version()
    if version["commit"] is None:
        return version_label(version)
    if not version["dirty"]:
        return str(version["commit"])
    diff = subprocess.run(
        ["git", "-C", str(REPO), "diff", "HEAD", "--", ".", *NOT_CODE],
        capture_output=True,
        check=False,
    ).stdout
    return f"{version['commit']}+{hashlib.sha1(diff).hexdigest()[:12]}"


def model_rule(res: dict) -> dict:
    """A row's ``select_round`` and ``selected_round`` from its results.json (none before
    the key existed: the last round)."""
    protocol = res.get("protocol", {})
    rule = {"select_round": protocol.get("select_round", "last")}
    if "selected_round" in protocol:
        rule["selected_round"] = int(protocol["selected_round"])
    return rule


def one_model_rule(results: list[dict]) -> str:
    """Which round's model every result in a table reports, in words for its caption, or
    a clear refusal: a row of last rounds beside one of validation-chosen rounds would
    compare two protocols.  Results written before ``select_round`` existed are ``last``."""
    rules = {r.get("select_round", "last") for r in results}
    if len(rules) != 1:
        raise ValueError(
            f"a table would mix runs under select_round={sorted(rules)}; "
            "run every row under one rule"
        )
    rule = rules.pop()
    if rule == "last":
        return "last round's model (nothing chosen on any split)"
    rounds = sorted({int(r["selected_round"]) for r in results if "selected_round" in r})
    return (
        "the model of the round with the best validation macro-F1 (`select_round=best_val`, "
        f"chosen on validation only; rounds {', '.join(map(str, rounds))})"
    )


def run_one(
    out: Path,
    overrides: list[str],
    *,
    experiment: str,
    mlflow_experiment: str,
    tracking_uri: str = TRACKING_URI,
) -> dict:
    """results.json of ``experiment`` with ``overrides`` written to ``out`` (run if missing),
    its MLflow run logged to ``mlflow_experiment`` in ``tracking_uri``."""
    results = out / "results.json"
    with current() as view:
        if results.is_file():  # resumable: a finished run is not repeated
            view.end(cached=True)
            return json.loads(results.read_text())
        cmd = [sys.executable, "-m", "simulations.run", f"experiment={experiment}", *overrides,
               f"mlflow.experiment={mlflow_experiment}", f"mlflow.tracking_uri={tracking_uri}",
               f"output_dir={out}"]  # fmt: skip
        # the child's progress (one line per round, with its ETA) streams into run.log as
        # it runs; the study follows that log and shows the latest line (study_progress)
        out.mkdir(parents=True, exist_ok=True)
        log = out / "run.log"
        print(f"  running {out.name}: tail -f {log}", flush=True)
        view.begin(out.name)
        code = follow_child(cmd, log, view.mark, cwd=REPO)
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (log: {log}):\n{log.read_text()[-3000:]}")
        view.end()
    return json.loads(results.read_text())


def logged_runs(
    mlflow_experiment: str, outs: list[Path], tracking_uri: str = TRACKING_URI
) -> list[Run]:
    """The MLflow runs a study made into the run folders ``outs``, read back from the
    store for its tables (the store also holds runs of other code versions and other
    settings, which a study page must not pick up).  A folder run twice (a failed run,
    then its retry) gives its latest FINISHED run, else its latest; a folder without a
    run is refused, naming it (a run made with ``mlflow.enabled=false``)."""
    runs, _ = load_runs(tracking_uri, mlflow_experiment, include_unfinished=True)
    wanted = {str((REPO / o).resolve()): str(o) for o in outs}  # the child's cwd is REPO
    latest: dict[str, Run] = {}
    for run in runs:  # oldest first
        key = str((REPO / run.params.get("output_dir", "")).resolve())
        if key in wanted and (key not in latest or run.status == "FINISHED"
                              or latest[key].status != "FINISHED"):  # fmt: skip
            latest[key] = run
    missing = [wanted[k] for k in wanted if k not in latest]
    if missing:
        raise ValueError(
            f"{len(missing)} of the study's runs are not in MLflow experiment "
            f"{mlflow_experiment!r} of {tracking_uri} (e.g. {missing[0]}); was it run with "
            "mlflow.enabled=false or another mlflow.tracking_uri?"
        )
    return [latest[k] for k in wanted]


def fmt_mean_std(values: list[float]) -> str:
    """``mean ± std`` (population std, as over seeds) to three decimals."""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def fmt_mean_ci(values: list[float]) -> str:
    """``mean ± std [lo, hi]``: spread over seeds and the 95 % interval of the mean."""
    mean, half = mean_ci95(values)
    return f"{fmt_mean_std(values)} [{mean - half:.3f}, {mean + half:.3f}]"
