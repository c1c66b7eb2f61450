"""The ServerApp's checkpoint after each round, and ``resume=true``.

What a round leaves that the next one depends on: the global parameters, the
strategy's state (FedAdam's moments, the per-round bookkeeping results.json reports),
MMBind's last binding (the partners each node was sent and keeps in its state), the
recorder's history, the server's RNG states (node sampling draws from Python's), and
the roster's record of sites that rejoined (results.json reports every rejoin of the
run, before a crash too).
All of it is saved after every round (:mod:`fed_iotlm.federation.checkpoint`), and a
run started with ``resume=true`` and the same config continues after the last saved
round.  Clients need nothing saved: they seed local training from
(server round, partition id) and load the global model every round, so the resumed
rounds train exactly as the uninterrupted ones would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
from fed_iotlm.federation.strategy_state import capture_strategy, restore_strategy
from fed_iotlm.tracking import RunRecorder, console

if TYPE_CHECKING:
    from .membership import LiveRoster

PRETRAIN, TRAIN = "pretrain", "train"
PARTNERS = "partners."


@dataclass
class ResumePoint:
    """Where a resumed run continues: after ``round`` of ``phase``, from ``arrays``."""

    phase: str
    round: int
    arrays: ArrayRecord
    partners: dict[str, ArrayRecord] = field(default_factory=dict)

    def next_round(self, phase: str, total: int) -> int:
        """First round of ``phase`` (of ``total``) still to run."""
        if phase == self.phase:
            return self.round + 1
        if phase == PRETRAIN:  # the checkpoint is of the multimodal phase: pretraining done
            return total + 1
        return 1


class ServerCheckpointer:
    """Saves after every round into ``out_dir/checkpoint``; restores on ``resume=true``."""

    def __init__(
        self,
        cfg: dict,
        out_dir: Path,
        strategy: object,
        recorder: RunRecorder,
        roster: LiveRoster | None = None,
    ) -> None:
        self.cfg = cfg
        self.roster = roster  # its ``rejoined`` list is saved and restored
        self.directory = checkpoint_dir(out_dir)
        self.strategy = strategy
        self.recorder = recorder
        # MMBind: partition id -> the partners record that node was last sent (train.bind)
        self.partners: dict[str, ArrayRecord] = {}

    def save(self, phase: str, rnd: int, arrays: ArrayRecord) -> None:
        strategy_meta, sections = capture_strategy(self.strategy)
        rng_meta, rng_arrays = capture_rng()
        sections["arrays"] = record_to_numpy(arrays)
        sections["rng"] = rng_arrays
        for pid, record in self.partners.items():
            sections[PARTNERS + pid] = record_to_numpy(record)
        meta = {
            "method": self.cfg["method"],
            "config": resumable_config(self.cfg),
            "strategy": strategy_meta,
            "rng": rng_meta,
            "history": self.recorder.history,
            "extra": self.recorder.extra,
            "rejoined": list(self.roster.rejoined) if self.roster is not None else [],
        }
        save_checkpoint(self.directory, Checkpoint(rnd, phase, sections, meta))

    def restore(self) -> ResumePoint | None:
        """With ``resume=true``: put the checkpoint's state back and say where to go on.

        Call it right before the first round: it also restores the RNG states, which
        anything drawing randomness in between would otherwise shift."""
        if not self.cfg.get("resume"):
            return None
        ckpt = load_checkpoint(self.directory)
        if ckpt is None:
            console.print(f"resume=true, but {self.directory} holds no checkpoint: round 1")
            return None
        self._check(ckpt)
        restore_strategy(self.strategy, ckpt.meta["strategy"], ckpt.sections)
        self.recorder.history = list(ckpt.meta["history"])
        self.recorder.extra.update(ckpt.meta["extra"])
        if self.roster is not None:  # rejoins before the crash, then this run's own
            self.roster.rejoined[:0] = list(ckpt.meta.get("rejoined", []))
        self.partners = {
            name[len(PARTNERS) :]: numpy_to_record(arrays)
            for name, arrays in ckpt.sections.items()
            if name.startswith(PARTNERS)
        }
        restore_rng(ckpt.meta["rng"], ckpt.sections["rng"])
        console.print(f"[bold]resuming[/bold] after {ckpt.phase} round {ckpt.round}")
        return ResumePoint(
            ckpt.phase, ckpt.round, numpy_to_record(ckpt.sections["arrays"]), self.partners
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
