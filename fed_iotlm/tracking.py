"""Everything a run leaves behind: MLflow run, results.json, plot, bundle, final table.

One recorder serves every method (federated, FedAvg, local-only, centralized), so all
runs are comparable by the same tools.  results.json follows the schema in
docs/architecture.md and is written atomically; its path is printed last.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from fed_iotlm.config_schema import block

from .atomic import atomic_write_text
from .progress import Bars
from .settings import flatten

if TYPE_CHECKING:
    from .federation.round_record import RoundRecord

console = Console(highlight=False)
logger = logging.getLogger(__name__)

# recorders whose MLflow run is open: ended FAILED by fail_open_runs() if the run dies
_open: list[RunRecorder] = []


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
        self._mlflow = None
        self._round_ends: list[float] = []
        self.extra: dict[str, Any] = {}  # method-specific keys added to results.json
        self._bars: Bars | None = None  # the rounds bar, on a terminal only
        self._bar = None

    # -- MLflow -----------------------------------------------------------------------
    def start(self) -> None:
        """Open the MLflow run (local sqlite store by default) and log the flat config."""
        mcfg = block(self.cfg, "mlflow")
        if not mcfg["enabled"]:
            return
        from .extras import has

        if not has("mlflow"):
            logger.warning(
                "MLflow tracking is off: mlflow is not installed (pip install "
                "'fed-iotlm[study]', or set mlflow.enabled=false to silence this)"
            )
            return
        import mlflow

        mlflow.set_tracking_uri(mcfg["tracking_uri"])
        mlflow.set_experiment(mcfg["experiment"])
        run_name = f"{self.cfg['method']}-{self.dataset}-seed{self.cfg['seed']}"
        mlflow.start_run(run_name=run_name)
        # params are for filtering and comparing in MLflow's UI and are cut at 500
        # characters (the store's limit); the whole config is the config.json artifact
        params = {k: str(v)[:500] for k, v in flatten(self.cfg).items()}
        params["plan"] = json.dumps(self.plan)[:500]
        mlflow.log_params(params)
        mlflow.log_dict({**self.cfg, "plan": self.plan}, "config.json")
        self._mlflow = mlflow
        _open.append(self)

    def fail(self, error: BaseException | None = None) -> None:
        """End this recorder's MLflow run as FAILED (MLflow's own exit hook would end
        a run that died half-way as FINISHED)."""
        self._close_bars()
        if self._mlflow is None:
            return
        try:
            if error is not None:
                self._mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            self._mlflow.end_run(status="FAILED")
        finally:
            self._mlflow = None
            if self in _open:
                _open.remove(self)

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
            self._mlflow.log_metrics(
                {k: float(v) for k, v in row.items() if k != "round"}, step=rnd
            )

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
        if self._mlflow is not None:
            mlflow = self._mlflow
            mlflow.log_metrics(
                {
                    "test_accuracy": test["accuracy"],
                    **({"val_accuracy": val["accuracy"]} if val is not None else {}),
                    **{
                        f"test_{k}": test[k] for k in ("f1_macro", "balanced_accuracy") if k in test
                    },
                    **{f"test_accuracy.{m}": v for m, v in test["accuracy_by_modality"].items()},
                    **{f"node_accuracy.{n}": v for n, v in accuracy_by_node.items()},
                }
            )
            mlflow.log_artifact(str(path))
            if plot is not None:
                mlflow.log_artifact(str(plot))
            bundle = self.out_dir / "bundle"
            if bundle.is_dir():
                mlflow.log_artifacts(str(bundle), artifact_path="bundle")
            mlflow.end_run()
            self._mlflow = None
            if self in _open:
                _open.remove(self)
        print_table(results)
        return path

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
    """End every MLflow run a recorder opened and did not finish as FAILED: called where
    a run dies (the ServerApp, the in-process baselines) before the error propagates."""
    for recorder in list(_open):
        try:
            recorder.fail(error)
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
