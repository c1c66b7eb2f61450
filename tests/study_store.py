"""A real sqlite MLflow store with fake study runs, logged through the project's own
:class:`fed_iotlm.tracking.MlflowRun`: the params a composed config logs, a results.json
artifact, and the run's end status, without training anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fed_iotlm.settings import compose
from fed_iotlm.tracking import MlflowRun, artifact_location, config_params


def version(commit: str) -> dict[str, Any]:
    return {"commit": commit, "dirty": False}


class Store:
    """``sqlite:///<root>/mlflow.db``; :meth:`log` adds one run to an experiment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root}/mlflow.db"
        assert artifact_location(self.uri) is not None  # artifacts beside the store
        self.count = 0

    def log(
        self,
        experiment: str,
        overrides: list[str],
        results: dict[str, Any],
        *,
        status: str = "FINISHED",
        output_dir: Path | None = None,
    ) -> Path:
        """One run of ``compose(overrides)`` with ``results`` as its results.json; its
        ``output_dir`` param is returned (a folder of its own unless given)."""
        self.count += 1
        out = output_dir or self.root / "runs" / f"run{self.count}"
        out.mkdir(parents=True, exist_ok=True)
        cfg = {**compose(overrides), "output_dir": str(out)}
        mcfg = {"enabled": True, "tracking_uri": self.uri, "experiment": experiment}
        run = MlflowRun.open(mcfg, run_name=f"run{self.count}", params=config_params(cfg))
        assert run is not None
        path = out / "results.json"
        path.write_text(json.dumps(results))
        run.log_artifact(path)
        run.finish(status)
        return out
