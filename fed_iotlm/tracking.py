"""Everything a run leaves behind: MLflow run, results.json, plot, bundle, final table.

One recorder serves every method (federated, FedAvg, local-only, centralized), so all
runs are comparable by the same tools.  results.json follows the schema in
docs/architecture.md and is written atomically; its path is printed last.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from fed_iotlm.config_schema import block, section

from .atomic import atomic_write_text
from .progress import Bars
from .settings import flatten

if TYPE_CHECKING:
    from .federation.round_record import RoundRecord

console = Console(highlight=False)
logger = logging.getLogger(__name__)

# MLflow runs opened and not yet ended: ended FAILED by fail_open_runs() if the run dies
_open: list[MlflowRun] = []
PARAM_CHARS = 500  # a param's value limit in MLflow's stores: the whole config is an artifact
RESUMED_FROM = "fed_iotlm.resumed_from"  # tag of a run started afresh on resume
ERROR = "error"  # tag of a FAILED run: the error it died of
# a reopened run that then FINISHED: the error an earlier attempt died of (was ERROR)
EARLIER_ERROR = "fed_iotlm.earlier_error"
PARENT = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under its parent


def config_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """A config as MLflow params: flat dotted keys, values cut at the store's limit (they
    are for filtering and comparing in the UI; the whole config is the config.json artifact)."""
    return {k: str(v)[:PARAM_CHARS] for k, v in flatten(dict(cfg)).items()}


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: ``mlruns/`` beside
    the database file.  MLflow's own default is ``./mlruns`` under the working directory
    of whichever process creates the experiment (a test's, a managed SuperLink's), which
    leaves one store's artifacts wherever that was; for the default ``sqlite:///mlflow.db``
    (relative to the working directory) both are the same folder.  None: not a sqlite
    file (MLflow's default applies)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = tracking_uri[len(prefix) :].split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return (Path(database).resolve().parent / "mlruns").as_uri()


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The experiment ``name``'s id, created if the store lacks it (artifacts at
    :func:`artifact_location`)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    except MlflowException:  # another process created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


class MlflowRun:
    """One MLflow run, through an explicit client rather than MLflow's per-thread stack of
    active runs: so a run can be the child of another (a LoRA method under its app run),
    be reopened by id when its app resumes, and be ended FAILED from wherever the run
    dies.  :class:`RunRecorder` and the federated-LoRA app both record through it."""

    def __init__(
        self, client: Any, run_id: str, *, resumed: bool = False, earlier_error: str | None = None
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.resumed = resumed  # an existing run reopened (its params and config are there)
        self.earlier_error = earlier_error  # a reopened run's ERROR tag, from its crash
        self.ended = False
        _open.append(self)

    @classmethod
    def open(
        cls,
        mcfg: Mapping[str, Any],
        *,
        run_name: str,
        experiment: str | None = None,
        params: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent: MlflowRun | None = None,
        resume_id: str | None = None,
    ) -> MlflowRun | None:
        """The run, or None when ``mlflow.enabled`` is false or mlflow is not installed.

        ``mcfg``: the ``mlflow`` config block; ``experiment`` defaults to its
        ``experiment``.  ``resume_id``: reopen that run if the store has it (a resumed
        app continues its run); if not, a new run tagged :data:`RESUMED_FROM` it."""
        mcfg = section("mlflow", mcfg)
        if not mcfg["enabled"]:
            return None
        from .extras import has

        if not has("mlflow"):
            logger.warning(
                "MLflow tracking is off: mlflow is not installed (pip install "
                "'fed-iotlm[study]', or set mlflow.enabled=false to silence this)"
            )
            return None
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mcfg["tracking_uri"])
        tags = dict(tags or {})
        if resume_id is not None:
            try:
                found = client.get_run(resume_id)
            except MlflowException:
                found = None
            if found is None or found.info.lifecycle_stage != "active":
                logger.warning(
                    "MLflow run %s is not in %s%s: a new run, tagged %s=%s",
                    resume_id, mcfg["tracking_uri"], "" if found is None else " (deleted)",
                    RESUMED_FROM, resume_id,
                )  # fmt: skip
                tags[RESUMED_FROM] = resume_id
            else:
                client.update_run(resume_id, status="RUNNING")
                earlier = found.data.tags.get(ERROR)
                return cls(client, resume_id, resumed=True, earlier_error=earlier)
        if parent is not None:
            tags[PARENT] = parent.run_id
        from mlflow.tracking.context.registry import resolve_tags

        tags = resolve_tags(tags)  # user, source, git commit: what mlflow.start_run adds
        name = experiment or mcfg["experiment"]
        exp_id = experiment_id(client, name, mcfg["tracking_uri"])
        run = cls(client, client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id)
        if params:
            run.log_params(params)
        if config is not None:
            client.log_dict(run.run_id, dict(config), "config.json")
        return run

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:PARAM_CHARS]) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which ``key`` was logged (what a reopened run already holds)."""
        return {int(m.step) for m in self.client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value)[:5000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED unless told).  A reopened run that FINISHED no longer
        carries the ``error`` tag of the attempt that crashed (MLflow's UI would show a
        finished run with an error): it moves to :data:`EARLIER_ERROR`, so the crash is
        still on record."""
        if self in _open:
            _open.remove(self)
        self.ended = True
        if status == "FINISHED" and self.earlier_error is not None:
            self.set_tags({EARLIER_ERROR: self.earlier_error})
            self.client.delete_tag(self.run_id, ERROR)
            self.earlier_error = None
        self.client.set_terminated(self.run_id, status=status)

    def fail(self, error: BaseException | None = None) -> None:
        """End the run as FAILED, with the error as its ``error`` tag."""
        try:
            if error is not None:
                self.set_tags({ERROR: f"{type(error).__name__}: {error}"})
        finally:
            self.finish("FAILED")


class RunRecorder:
    """Collects per-round history and writes the run's outputs into ``out_dir``."""

    def __init__(self, cfg: dict[str, Any], out_dir: Path, *, dataset: str, plan: dict) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dataset = dataset
        self.plan = plan
        self.history: list[dict[str, float]] = []
        self.t0 = time.time()
        self._mlflow: MlflowRun | None = None
        self._round_ends: list[float] = []
        self.extra: dict[str, Any] = {}  # method-specific keys added to results.json
        self._bars: Bars | None = None  # the rounds bar, on a terminal only
        self._bar = None

    # -- MLflow -----------------------------------------------------------------------
    def start(self, resume_id: str | None = None) -> None:
        """Open the MLflow run (local sqlite store by default) and log the flat config.

        ``resume_id``: the run a checkpoint saved (``resume=true``), reopened so that the
        resumed rounds land in the same run; a store without it gets a new run tagged
        :data:`RESUMED_FROM` it (:meth:`MlflowRun.open`), and with tracking off the
        resumed rounds go nowhere, which is said once."""
        mcfg = block(self.cfg, "mlflow")
        if resume_id is not None and not mcfg["enabled"]:
            logger.warning(
                "resume: mlflow.enabled=false, so the checkpoint's MLflow run %s is not "
                "continued and the resumed rounds are not logged (set mlflow.enabled=true "
                "and the same mlflow.tracking_uri to continue it)",
                resume_id,
            )
        run_name = f"{self.cfg['method']}-{self.dataset}-seed{self.cfg['seed']}"
        self._mlflow = MlflowRun.open(
            mcfg,
            run_name=run_name,
            params={**config_params(self.cfg), "plan": json.dumps(self.plan)[:PARAM_CHARS]},
            config={**self.cfg, "plan": self.plan},
            resume_id=resume_id,
        )

    def restore(self, records: list[RoundRecord]) -> None:
        """A resumed run's history is the checkpoint's training rounds; those the MLflow
        run does not hold yet (a new run, or a crash between a round's checkpoint and its
        metrics) are logged at their steps, so every round is there exactly once."""
        from .federation.round_record import history_of

        self.history = history_of(records)
        if self._mlflow is None:
            return
        held = self._mlflow.logged_steps("accuracy") if self._mlflow.resumed else set()
        for row in self.history:
            if row["round"] not in held:
                metrics = {k: v for k, v in row.items() if k != "round"}
                self._mlflow.log_metrics(metrics, step=row["round"])

    @property
    def run_id(self) -> str | None:
        """The open MLflow run's id (None: tracking off, or the run has ended)."""
        return None if self._mlflow is None or self._mlflow.ended else self._mlflow.run_id

    def fail(self, error: BaseException | None = None) -> None:
        """End this recorder's MLflow run as FAILED."""
        self._close_bars()
        if self._mlflow is not None:
            run, self._mlflow = self._mlflow, None
            if not run.ended:
                run.fail(error)

    def log_record(self, record: RoundRecord) -> None:
        """Log a federated run's round from its record (its history row)."""
        row = record.history_row()
        self.log_round(row.pop("round"), row.pop("accuracy"), row.pop("loss"), **row)

    def eta_s(self, rnd: int) -> float | None:
        """Seconds left, from the mean length of the rounds logged so far (the first one
        carries the set-up, so it is left out once a later round is known)."""
        total = self.cfg.get("rounds")
        if not isinstance(total, int) or rnd >= total or not self._round_ends:
            return None
        ends = [self.t0, *self._round_ends]
        lengths = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        typical = lengths[1:] or lengths
        return sum(typical) / len(typical) * (total - rnd)

    def log_round(self, rnd: int, accuracy: float, loss: float, **extra: float) -> None:
        row = {"round": rnd, "accuracy": float(accuracy), "loss": float(loss), **extra}
        self.history.append(row)
        self._round_ends.append(time.time())
        eta = self.eta_s(rnd)
        total = self.cfg.get("rounds")
        logger.info(round_line(rnd, total, accuracy, loss, time.time() - self.t0, eta, extra))
        self._show_round(rnd, total, accuracy, eta)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: v for k, v in row.items() if k != "round"}, step=rnd)

    def _show_round(self, rnd: int, total: Any, accuracy: float, eta: float | None) -> None:
        """The rounds bar on a terminal (opened at the first round, closed at finish)."""
        if self._bars is None:
            self._bars = Bars(console)
            self._bar = self._bars.add("rounds", total if isinstance(total, int) else None)
        self._bars.update(self._bar, rnd, eta_s=eta, note=f"accuracy {accuracy:.3f}")

    def _close_bars(self) -> None:
        if self._bars is not None:
            self._bars.close()
            self._bars = None

    # -- outputs ------------------------------------------------------------------------
    def finish(
        self,
        test: dict,
        accuracy_by_node: dict[str, float],
        comm: dict,
        val: dict | None = None,
    ) -> Path:
        """Write results.json, the plot, log artifacts, print the table; return the path.

        ``val`` is the same report on the validation reference set: what every choice
        was made on (``choices`` in ``extra`` says which); test never feeds back."""
        self._close_bars()
        if val is not None:
            self.extra["val"] = val
        results = {
            "method": self.cfg["method"],
            "dataset": self.dataset,
            "seed": int(self.cfg["seed"]),
            "num_nodes": len(self.plan),
            "rounds": int(self.cfg["rounds"]),
            "plan": self.plan,
            "test": {**test, "accuracy_by_node": accuracy_by_node},
            "history": self.history,
            "comm": comm,
            "wall_s": round(time.time() - self.t0, 2),
            "config": self.cfg,
            **self.extra,
        }
        path = self.out_dir / "results.json"
        atomic_write_text(path, json.dumps(results, indent=2))
        plot = self._plot()
        if self._mlflow is not None and not self._mlflow.ended:
            run, self._mlflow = self._mlflow, None
            self._log_final(run, test, accuracy_by_node, val)
            run.log_artifact(path)
            if plot is not None:
                run.log_artifact(plot)
            bundle = self.out_dir / "bundle"
            if bundle.is_dir():
                run.log_artifacts(bundle, "bundle")
            run.finish()
        print_table(results)
        return path

    def _log_final(
        self, run: MlflowRun, test: dict, accuracy_by_node: dict[str, float], val: dict | None
    ) -> None:
        """The final model's figures, at step = the round it is (its last round, as the
        LoRA app logs its final evaluation; under ``select_round=best_val`` the selected
        one), so a finished run resumed with more ``rounds`` adds its new
        figures at the new last round instead of a second value at one step.  A reopened
        run that already holds them at that step (resumed with nothing left to run, or
        after a crash between them and the run's end) logs none: the same model's again.
        ``val_accuracy`` is also a per-round key: where that round's history row has it,
        the row (logged at the same step) stands for it."""
        last = self.history[-1] if self.history else {}
        # select_round=best_val reports an earlier round's model: its figures sit at that
        # round, where its per-round val_accuracy already is (protocol.selected_round)
        selected = self.extra.get("protocol", {}).get("selected_round")
        step = int(selected if selected is not None else last.get("round", 0))
        if selected is not None:
            last = next((h for h in self.history if h.get("round") == step), {})
        if run.resumed and step in run.logged_steps("test_accuracy"):
            return
        run.log_metrics(
            {
                "test_accuracy": test["accuracy"],
                **(
                    {"val_accuracy": val["accuracy"]}
                    if val is not None and "val_accuracy" not in last
                    else {}
                ),
                **{f"test_{k}": test[k] for k in ("f1_macro", "balanced_accuracy") if k in test},
                **{f"test_accuracy.{m}": v for m, v in test["accuracy_by_modality"].items()},
                **{f"node_accuracy.{n}": v for n, v in accuracy_by_node.items()},
            },
            step=step,
        )

    def _plot(self) -> Path | None:
        if not self.history:
            return None
        from .extras import has

        if not has("matplotlib"):
            logger.warning(
                "no accuracy.png: matplotlib is not installed (pip install 'fed-iotlm[study]')"
            )
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        rounds = [h["round"] for h in self.history]
        ax.plot(rounds, [h["accuracy"] for h in self.history], marker="o", label="test accuracy")
        if all("val_accuracy" in h for h in self.history):
            ax.plot(rounds, [h["val_accuracy"] for h in self.history], marker=".", label="val")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (mean over tasks)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(f"{self.cfg['method']} on {self.dataset} ({len(self.plan)} nodes)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = self.out_dir / "accuracy.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def round_line(rnd: int, total: Any, accuracy: float, loss: float, elapsed_s: float,
               eta_s: float | None, extra: dict[str, Any]) -> str:  # fmt: skip
    """The round's log line, which :func:`fed_iotlm.progress.parse_line` reads back (a
    study follows its children's logs by it: change both together)."""
    rejected = int(extra.get("rejected_updates", 0))
    sent, answered = int(extra.get("nodes_sent", 0)), int(extra.get("nodes_answered", 0))
    return (
        f"round {rnd:>3}/{total if total is not None else '?'}  accuracy {accuracy:.3f}  loss {loss:.3f}"
        + (f"  {rejected} update(s) rejected" if rejected else "")
        + (f"  {answered}/{sent} nodes answered" if answered < sent else "")
        + ("  skipped" if extra.get("round_skipped") else "")
        + f"  ({elapsed_s:.0f}s"
        + (f", ETA {eta_s:.0f}s)" if eta_s is not None else ")")
    )


def fail_open_runs(error: BaseException | None = None) -> None:
    """End every MLflow run opened here and not finished as FAILED (children before their
    parents): called where a run dies (the ServerApps, the in-process baselines) before
    the error propagates."""
    for run in reversed(list(_open)):
        try:
            run.fail(error)
        except Exception:  # tracking must not hide the error being reported
            logger.exception("could not mark the MLflow run FAILED")


def print_table(results: dict) -> None:
    """The final table: all modalities, each single modality, each node."""
    test = results["test"]
    table = Table(title=f"{results['method']} · {results['dataset']} · test accuracy")
    table.add_column("evaluated on")
    table.add_column("accuracy", justify="right")
    tasks = list(test.get("by_task", {}))
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_row(
        "all modalities",
        f"{test['accuracy']:.3f}",
        *[f"{test['by_task'][t]['accuracy']:.3f}" for t in tasks],
    )
    for key, label in (("f1_macro", "macro-F1"), ("balanced_accuracy", "balanced accuracy")):
        if key in test:  # class-balanced scores, same model and split
            table.add_row(
                f"all modalities, {label}",
                f"{test[key]:.3f}",
                *[f"{test['by_task'][t][key]:.3f}" for t in tasks],
            )
    for m, acc in test["accuracy_by_modality"].items():
        table.add_row(
            f"only {m}",
            f"{acc:.3f}",
            *[f"{test['by_task'][t]['accuracy_by_modality'][m]:.3f}" for t in tasks],
        )
    for node, acc in test["accuracy_by_node"].items():
        mods = ",".join(results["plan"].get(node, []))
        table.add_row(f"node {node} ({mods})", f"{acc:.3f}", *["" for _ in tasks])
    console.print(table)
