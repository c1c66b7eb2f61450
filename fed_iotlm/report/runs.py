"""Read one MLflow experiment's runs: params, final metrics, per-round accuracy, results.json.

Everything goes through :class:`mlflow.tracking.MlflowClient`, so the report works on any
tracking store MLflow can open; nothing is ever written to the store.  results.json is
the run's artifact (logged by :class:`fed_iotlm.tracking.RunRecorder`) and carries what
MLflow's flat metrics do not: per-site diagnostics, communication, robustness.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .params import effective_params, expand_params


class ReportError(ValueError):
    """Bad input to the report (unknown experiment, missing store, no runs): one line."""


@dataclass(frozen=True)
class Run:
    """One MLflow run as the report sees it."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    accuracy_by_round: list[tuple[int, float]] = field(default_factory=list)
    results: dict[str, Any] | None = None

    @property
    def accuracy(self) -> float | None:
        """Final test accuracy; the last round's if the run never logged a final one."""
        if "test_accuracy" in self.metrics:
            return self.metrics["test_accuracy"]
        return self.accuracy_by_round[-1][1] if self.accuracy_by_round else None


def check_store(tracking_uri: str) -> None:
    """A sqlite URI naming a file that does not exist would make MLflow create an empty
    store; say so instead (the usual mistake is running from another directory)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return
    path = Path(unquote(tracking_uri[len("sqlite:///") :]))
    if not path.is_file():
        raise ReportError(f"no MLflow store at {path} (tracking URI {tracking_uri})")


def load_runs(
    tracking_uri: str, experiment: str, *, include_unfinished: bool = False
) -> tuple[list[Run], list[str]]:
    """The experiment's runs (FINISHED only unless asked) and the names of those left out."""
    from mlflow.tracking import MlflowClient

    check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(
            f"no MLflow experiment named {experiment!r} in {tracking_uri}; "
            f"experiments there: {', '.join(names) if names else '(none)'}"
        )
    infos = _all_runs(client, exp.experiment_id)
    kept = [r for r in infos if include_unfinished or r.info.status == "FINISHED"]
    skipped = [f"{r.info.run_name} ({r.info.status})" for r in infos if r not in kept]
    if not kept:
        why = f" ({len(skipped)} not FINISHED; --all-runs includes them)" if skipped else ""
        raise ReportError(f"MLflow experiment {experiment!r} has no runs to report{why}")
    # MLflow prints a progress bar per artifact download; 200 of them bury the output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="fed-iotlm-report-") as tmp:
        runs = [_to_run(client, r, Path(tmp)) for r in kept]
    return runs, skipped


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    """Every run of the experiment, oldest first, following MLflow's pagination."""
    out, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], max_results=1000, page_token=token, order_by=["start_time ASC"]
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def _to_run(client: Any, mlrun: Any, tmp: Path) -> Run:
    run_id = mlrun.info.run_id
    history = client.get_metric_history(run_id, "accuracy")
    return Run(
        run_id=run_id,
        name=mlrun.info.run_name or run_id[:8],
        status=mlrun.info.status,
        params=effective_params(expand_params(mlrun.data.params)),  # harmony: late fusion
        metrics=dict(mlrun.data.metrics),
        accuracy_by_round=sorted((int(m.step), float(m.value)) for m in history),
        results=_results_json(mlrun.info.artifact_uri, tmp),
    )


def _results_json(artifact_uri: str, tmp: Path) -> dict[str, Any] | None:
    """The run's results.json artifact, or None when it has none (e.g. still running).

    Fetched by the run's artifact URI (already in the search result) rather than by run
    id, which costs three store queries per run: 200 runs load in seconds, not a minute."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{artifact_uri.rstrip('/')}/results.json", dst_path=str(tmp)
        )
        return json.loads(Path(path).read_text())
    except (OSError, MlflowException, json.JSONDecodeError):
        return None
