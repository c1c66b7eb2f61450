"""The federated-LoRA app's MLflow runs: one run per app run, one nested run per method.

It records through the federation's own piece, :class:`fed_iotlm.tracking.MlflowRun`
(``mlflow.enabled``, the missing-extra warning, params cut at the store's limit, the
whole config as the ``config.json`` artifact, FAILED with the error on a crash).

Why a nested run per method rather than one run with tags or prefixed metric names: an
app run may hold several methods (a study runs FedIT, FFA, FedEx and FlexLoRA in turn),
and every method logs the same per-round metrics (loss, aggregation error, bytes) at the
same steps (its rounds).  As child runs they keep those names, so MLflow's compare view
overlays the methods' curves, and each child's params are its own method's settings.
The parent holds the run's config and results.json, and each method's final accuracy as
``accuracy.<method>``.  The runs go to the experiment ``<mlflow.experiment>-fedlora``,
beside the federation's (whose report reads one schema of run), as the central stage
logs to ``-llm``.

Resume (:mod:`server.lora_resume`): every checkpoint keeps the parent's and the current
method's run ids (:meth:`LoraTracking.ids`); a resumed app reopens both and logs the
restored rounds the child does not hold yet, so a crash between the checkpoint and the
metrics loses no round and none is logged twice.  A store without those runs (another
tracking URI) gets new ones tagged ``fed_iotlm.resumed_from`` the old id, holding every
restored round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from fed_iotlm.config_schema import section
from fed_iotlm.federation.round_record import RoundRecord
from fed_iotlm.llm.federated import FederatedSettings
from fed_iotlm.tracking import MlflowRun, config_params

log = logging.getLogger(__name__)

EXPERIMENT_SUFFIX = "-fedlora"
HELD = "bytes_down"  # logged for every round: which rounds a run already holds


def record_metrics(record: RoundRecord) -> dict[str, float]:
    """A LoRA round's record as MLflow metrics: participation (``nodes_*``,
    ``round_skipped``), stats (``lora_bytes_*``, ``sites_idle``, ``idle.<pid>``), the
    aggregation report (``loss``, ``agg_error``, ``rel_error``, ..., ``site.<pid>.*``;
    absent for a skipped round) and the bytes and messages each way."""
    out = {} if record.participation is None else record.participation.metrics()
    out |= {k: float(v) for k, v in record.stats.items()}
    out |= {k: float(v) for k, v in record.metrics.items()}
    for name in ("bytes_down", "bytes_up", "messages_down", "messages_up"):
        out[name] = float(getattr(record, name))
    return out


def method_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """A finished method's report (:func:`server.lora_app.run_method`) as final metrics."""
    ev = report.get("eval", {})
    out = {"accuracy": float(report["accuracy"])}
    out |= {k: float(v) for k, v in ev.items() if k == "answered" and v is not None}
    out |= {f"accuracy.rank{r}": float(v) for r, v in ev.get("by_rank", {}).items()}
    out |= {k: float(v) for k, v in report["comm"].items()}
    out |= {k: float(report[k]) for k in ("train_s", "eval_s")}
    return out


class LoraTracking:
    """The app run's MLflow runs (all no-ops with tracking off: ``mlflow`` None or
    ``mlflow.enabled=false``).  ``resume``: the run ids a checkpoint kept (:meth:`ids`)."""

    def __init__(
        self,
        mlflow: Mapping[str, Any] | None,
        config: Mapping[str, Any],
        run_name: str,
        resume: Mapping[str, str] | None = None,
    ) -> None:
        self.mcfg = None if mlflow is None else section("mlflow", mlflow)
        self.experiment = "" if self.mcfg is None else self.mcfg["experiment"] + EXPERIMENT_SUFFIX
        self.resume = dict(resume or {})
        self.parent: MlflowRun | None = None
        self.child: MlflowRun | None = None
        if self.mcfg is not None:
            self.parent = MlflowRun.open(
                self.mcfg, run_name=run_name, experiment=self.experiment,
                params=config_params(config), config=config, resume_id=self.resume.get("run"),
            )  # fmt: skip

    @property
    def run_id(self) -> str | None:
        return None if self.parent is None else self.parent.run_id

    def ids(self) -> dict[str, str]:
        """What a checkpoint keeps so that a resumed app continues these runs."""
        out = {} if self.parent is None else {"run": self.parent.run_id}
        return out | ({} if self.child is None else {"method": self.child.run_id})

    def start_method(
        self, fs: FederatedSettings, restored: Sequence[RoundRecord], resumed: bool
    ) -> None:
        """Open ``fs.method``'s child run (``resumed``: the checkpoint's method, whose run
        is reopened) and log the ``restored`` rounds it does not hold yet."""
        if self.parent is None:
            return
        resume_id = self.resume.get("method") if resumed else None
        self.child = MlflowRun.open(
            self.mcfg or {}, run_name=fs.method, experiment=self.experiment,
            params=config_params({"method": fs.method, "settings": asdict(fs)}),
            tags={"method": fs.method}, parent=self.parent, resume_id=resume_id,
        )  # fmt: skip
        if self.child is None:
            return
        held = self.child.logged_steps(HELD) if self.child.resumed else set()
        for record in restored:
            if record.round not in held:
                self.log_record(record)

    def log_record(self, record: RoundRecord) -> None:
        """One round of the current method, at step = its round."""
        if self.child is not None:
            self.child.log_metrics(record_metrics(record), step=record.round)

    def end_method(self, report: Mapping[str, Any], rounds: int) -> None:
        """The method's final evaluation (at step ``rounds``) and the end of its run."""
        if self.child is None:
            return
        # reopened after its evaluation was logged (a crash before the next method's first
        # checkpoint): the evaluation ran again, and is the same
        if not (self.child.resumed and rounds in self.child.logged_steps("accuracy")):
            self.child.log_metrics(method_metrics(report), step=rounds)
        self.child.finish()
        self.child = None
        key = f"accuracy.{report['method']}"
        if self.parent is not None and not (self.parent.resumed and self.parent.logged_steps(key)):
            self.parent.log_metrics({key: float(report["accuracy"])})

    def finish(self, results: Any) -> None:
        """results.json as the parent's artifact, and the end of the app run."""
        if self.parent is not None:
            self.parent.log_artifact(results)
            self.parent.finish()
            self.parent = None

    def fail(self, error: BaseException) -> None:
        """End the open runs FAILED (the method's, then the app run's)."""
        for run in (self.child, self.parent):
            if run is not None and not run.ended:
                try:
                    run.fail(error)
                except Exception:  # tracking must not hide the error being reported
                    log.exception("could not mark the MLflow run FAILED")
        self.child = self.parent = None
