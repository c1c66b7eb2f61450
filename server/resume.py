"""The ServerApp's checkpoint after each round, and ``resume=true``.

What a round leaves that the next one depends on: the global parameters, the
server optimiser's state (FedAdam's moments), MMBind's last binding (the partners each
node was sent and keeps in its state), the server's RNG states (node sampling draws
from Python's), and the run's round records (:mod:`fed_iotlm.federation.round_record`:
the history, the holders, rejections, DP releases, rejoins ... that results.json
reports for every round of the run, before a crash too; the DP accountant composes
over them), under ``select_round=best_val`` the model of the best round so far and its
round (:class:`~fed_iotlm.selection.BestRound`: a resumed run reports the round an
uninterrupted one would, even one before the crash), and the id of the MLflow run the
rounds are logged to, which the resumed run reopens
(:meth:`fed_iotlm.tracking.RunRecorder.start`), so one MLflow run holds them all.
All of it is saved after every round (:mod:`fed_iotlm.federation.checkpoint`), and a
run started with ``resume=true`` and the same config continues after the last saved
round.  Clients need nothing saved: they seed local training from
(server round, partition id) and load the global model every round, so the resumed
rounds train exactly as the uninterrupted ones would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from flwr.app import ArrayRecord

from fed_iotlm.federation.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    checkpoint_dir,
    config_differences,
    load_checkpoint,
    restore_rng,
    resumable_config,
    save_checkpoint,
)
from fed_iotlm.federation.records import numpy_to_record, record_to_numpy
from fed_iotlm.federation.round_record import PRETRAIN, TRAIN, RoundRecord
from fed_iotlm.federation.strategy_state import capture_strategy, restore_strategy
from fed_iotlm.selection import BestRound

log = logging.getLogger(__name__)

__all__ = ["PRETRAIN", "TRAIN", "ResumePoint", "ServerCheckpointer"]
PARTNERS = "partners."
BEST = "best"  # select_round=best_val: the section of the best round's model, its meta key


@dataclass
class ResumePoint:
    """Where a resumed run continues: after ``round`` of ``phase``, from ``arrays``."""

    phase: str
    round: int
    arrays: ArrayRecord
    partners: dict[str, ArrayRecord] = field(default_factory=dict)
    records: list[RoundRecord] = field(default_factory=list)
    mlflow_run: str | None = None  # the run the rounds were logged to (None: tracking off)
    best: BestRound[ArrayRecord] = field(default_factory=BestRound)  # select_round=best_val

    def next_round(self, phase: str, total: int) -> int:
        """First round of ``phase`` (of ``total``) still to run."""
        if phase == self.phase:
            return self.round + 1
        if phase == PRETRAIN:  # the checkpoint is of the multimodal phase: pretraining done
            return total + 1
        return 1


class ServerCheckpointer:
    """Saves after every round into ``out_dir/checkpoint``; restores on ``resume=true``."""

    def __init__(self, cfg: dict, out_dir: Path, strategy: object) -> None:
        self.cfg = cfg
        self.directory = checkpoint_dir(out_dir)
        self.strategy = strategy  # its server-optimiser state (FedAdam's moments)
        # MMBind: partition id -> the partners record that node was last sent (train.bind)
        self.partners: dict[str, ArrayRecord] = {}

    def save(
        self,
        records: list[RoundRecord],
        mlflow_run: str | None = None,
        best: BestRound[ArrayRecord] | None = None,
    ) -> None:
        """The state after the last of ``records`` (the run's rounds so far, whose last
        one carries the global model); ``mlflow_run``: the MLflow run they are logged to,
        which a resumed run reopens; ``best``: the best round so far and its model
        (``select_round=best_val``; None or empty: nothing to keep)."""
        last = records[-1]
        if last.arrays is None:
            raise ValueError(f"{last.phase} round {last.round}: its record holds no model")
        phase, rnd, arrays = last.phase, last.round, last.arrays
        strategy_meta, sections = capture_strategy(self.strategy)
        rng_meta, rng_arrays = capture_rng()
        sections["arrays"] = record_to_numpy(arrays)
        sections["rng"] = rng_arrays
        for pid, record in self.partners.items():
            sections[PARTNERS + pid] = record_to_numpy(record)
        kept = best.to_json() if best is not None else None
        if kept is not None:
            sections[BEST] = record_to_numpy(best.state)
        meta = {
            "method": self.cfg["method"],
            "config": resumable_config(self.cfg),
            "strategy": strategy_meta,
            "rng": rng_meta,
            "records": [r.to_json() for r in records],
            "mlflow_run": mlflow_run,
        }
        if kept is not None:  # absent otherwise: a select_round=last checkpoint is unchanged
            meta[BEST] = kept
        save_checkpoint(self.directory, Checkpoint(rnd, phase, sections, meta))

    def restore(self) -> ResumePoint | None:
        """With ``resume=true``: put the checkpoint's state back and say where to go on.

        Call it right before the first round: it also restores the RNG states, which
        anything drawing randomness in between would otherwise shift."""
        if not self.cfg.get("resume"):
            return None
        ckpt = load_checkpoint(self.directory)
        if ckpt is None:
            log.info("resume=true, but %s holds no checkpoint: round 1", self.directory)
            return None
        self._check(ckpt)
        if "records" not in ckpt.meta:
            raise CheckpointError(
                f"{self.directory}: written by an older version (no round records); "
                "start afresh with resume=false"
            )
        try:
            records = [RoundRecord.from_json(doc) for doc in ckpt.meta["records"]]
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{self.directory}: unreadable round records: {err}") from err
        if records and (records[-1].phase, records[-1].round) != (ckpt.phase, ckpt.round):
            raise CheckpointError(
                f"{self.directory}: the round records end at {records[-1].phase} round "
                f"{records[-1].round}, the checkpoint is of {ckpt.phase} round {ckpt.round}"
            )
        restore_strategy(self.strategy, ckpt.meta["strategy"], ckpt.sections)
        self.partners = {
            name[len(PARTNERS) :]: numpy_to_record(arrays)
            for name, arrays in ckpt.sections.items()
            if name.startswith(PARTNERS)
        }
        restore_rng(ckpt.meta["rng"], ckpt.sections["rng"])
        log.info("resuming after %s round %s", ckpt.phase, ckpt.round)
        arrays = numpy_to_record(ckpt.sections["arrays"])
        if records:  # the last record holds the model, as it did when it was made
            records[-1] = replace(records[-1], arrays=arrays)
        mlflow_run = ckpt.meta.get("mlflow_run")  # absent: written before runs were linked
        return ResumePoint(
            ckpt.phase, ckpt.round, arrays, self.partners, records, mlflow_run, self._best(ckpt)
        )

    def _best(self, ckpt: Checkpoint) -> BestRound[ArrayRecord]:
        """The best round the checkpoint kept (empty: none kept, or select_round=last)."""
        kept = ckpt.meta.get(BEST)
        if kept is None:
            return BestRound()
        if BEST not in ckpt.sections:
            raise CheckpointError(f"{self.directory}: names a best round but holds no model of it")
        return BestRound(
            int(kept["round"]), float(kept["score"]), numpy_to_record(ckpt.sections[BEST])
        )

    def _check(self, ckpt: Checkpoint) -> None:
        where = self.directory
        if ckpt.meta.get("method") != self.cfg["method"]:
            raise CheckpointError(
                f"{where}: written by method={ckpt.meta.get('method')}, not {self.cfg['method']}"
            )
        differ = config_differences(ckpt.meta["config"], self.cfg)
        if differ:
            raise CheckpointError(
                f"{where}: written under a different config ({', '.join(differ[:8])}"
                f"{' ...' if len(differ) > 8 else ''} differ); resume with the same settings "
                "(only rounds may grow) or start afresh with resume=false"
            )
        if ckpt.phase == TRAIN and ckpt.round > int(self.cfg["rounds"]):
            raise CheckpointError(
                f"{where}: the checkpoint is after round {ckpt.round}, beyond rounds="
                f"{self.cfg['rounds']}"
            )
