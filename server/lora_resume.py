"""The federated-LoRA ServerApp's checkpoint after each round, and ``resume=true``.

What a LoRA round leaves that the next one depends on is the server's
:class:`~fed_iotlm.llm.federated.LoraServerState` (each site's factors, the projector,
FedEx's cumulative residual and its version, the last exact update that FlexLoRA's
evaluation and absent sites read, FFA's A seed), the run's round records (results.json's
``rounds``, ``comm`` and ``faults_by_round`` are views of them), the results of the
methods already finished (a run may hold several) and the server's RNG states (the next
method's initial adapter and projector are drawn from torch's).  All of it goes into
``out_dir/checkpoint`` after every round, with the federation's layout and atomicity
(:mod:`fed_iotlm.federation.checkpoint`: tensors as safetensors sections, ``state.json``
as the commit point).

The learning-rate schedule needs no state of its own: a site's round r continues one
warm-up + cosine schedule over ``rounds × local_steps`` steps from step
``(r − 1) × local_steps`` (:func:`~fed_iotlm.llm.federated.site_tune_settings`), so the
resumed round's position follows from the round number, provided ``rounds`` and
``local_steps`` are those of the interrupted run.  Unlike the federation, ``rounds``
therefore may not grow on resume: every earlier round would have had another schedule.
The checkpoint records the position it stopped at, and the run's settings are checked.

Tensors are stored in their own dtype (bfloat16, which numpy lacks, as its bit pattern),
so a resumed run continues from bit-identical state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import Tensor

from fed_iotlm.federation.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    checkpoint_dir,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fed_iotlm.federation.round_record import TRAIN, RoundRecord
from fed_iotlm.llm.federated import FederatedSettings, LoraServerState
from fed_iotlm.llm.fedlora import LoraFactors
from fed_iotlm.llm.lora_task import LoraTask

log = logging.getLogger(__name__)

SITE = "site."  # a section per distinct site adapter: site.<first partition id holding it>
PARTS = ("sensor", "residual", "exact")
BITS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks: stored as their bit pattern
# settings a resumed run may change: how long it waits, not what it computes
FREE_SETTINGS = ("round_timeout_s",)


def run_identity(task: LoraTask, plans: Sequence[FederatedSettings], num_sites: int) -> dict:
    """What a resumed run must share with the interrupted one (JSON): the task (its
    ``cfg_json`` copy of the whole config aside: that holds ``resume`` itself), every
    method's settings but its deadline, and the number of sites."""
    methods = [
        {k: v for k, v in asdict(fs).items() if k not in FREE_SETTINGS} for fs in plans
    ]  # fmt: skip
    doc = {"task": asdict(task) | {"cfg_json": None}, "plans": methods, "num_sites": num_sites}
    return _plain(doc)


def _plain(obj: Any) -> Any:
    """Tuples as lists, as JSON gives them back, so a saved identity compares equal."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(key, "<absent>"), now.get(key, "<absent>"),
                                f"{where}.{key}" if where else str(key))  # fmt: skip
        return out
    return [] if saved == now else [where]


# ---------------------------------------------------------------------------- tensors


def _to_numpy(t: Tensor, bits: dict[str, str], name: str) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype in BITS:
        bits[name] = str(t.dtype).removeprefix("torch.")
        t = t.view(BITS[t.dtype])
    return t.numpy().copy()


def _to_tensor(a: np.ndarray, bits: Mapping[str, str], name: str) -> Tensor:
    t = torch.from_numpy(np.array(a))
    return t.view(getattr(torch, bits[name])) if name in bits else t


def _factor_section(
    factors: Mapping[str, LoraFactors], section: str, bits: dict[str, str]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``A|<layer>`` / ``B|<layer>`` arrays and the per-layer scalings (for the meta)."""
    arrays: dict[str, np.ndarray] = {}
    for layer, f in factors.items():
        arrays[f"A|{layer}"] = _to_numpy(f.A, bits, f"{section}/A|{layer}")
        arrays[f"B|{layer}"] = _to_numpy(f.B, bits, f"{section}/B|{layer}")
    return arrays, {layer: float(f.scaling) for layer, f in factors.items()}


def _factors_of(
    arrays: Mapping[str, np.ndarray], scalings: Mapping[str, float], section: str, bits
) -> dict[str, LoraFactors]:
    layers = [k.removeprefix("B|") for k in arrays if k.startswith("B|")]
    if sorted(f"{p}|{n}" for n in layers for p in "AB") != sorted(arrays) or set(layers) != set(
        scalings
    ):
        raise CheckpointError(f"section {section!r} does not hold one A and B per layer")
    return {
        n: LoraFactors(
            _to_tensor(arrays[f"A|{n}"], bits, f"{section}/A|{n}"),
            _to_tensor(arrays[f"B|{n}"], bits, f"{section}/B|{n}"),
            float(scalings[n]),
        )
        for n in layers
    }


def state_sections(state: LoraServerState) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """A server state as (JSON meta, tensor sections).  Sites that load the same adapter
    object (all of them except with FlexLoRA) share one section."""
    bits: dict[str, str] = {}
    sections: dict[str, dict[str, np.ndarray]] = {}
    scalings: dict[str, dict[str, float]] = {}
    holder: dict[int, str] = {}  # id(adapter) -> its section
    sites: dict[str, str] = {}
    for pid in sorted(state.factors):
        adapter = state.factors[pid]
        if id(adapter) not in holder:
            name = f"{SITE}{pid}"
            holder[id(adapter)] = name
            sections[name], scalings[name] = _factor_section(adapter, name, bits)
        sites[str(pid)] = holder[id(adapter)]
    for part in ("residual", "exact"):
        sections[part], scalings[part] = _factor_section(getattr(state, part), part, bits)
    sections["sensor"] = {k: _to_numpy(v, bits, f"sensor/{k}") for k, v in state.sensor.items()}
    meta = {
        "method": state.method,
        "version": state.version,
        "a_seed": state.a_seed,
        "dense_diagnostics": state.dense_diagnostics,
        "sites": sites,
        "scalings": scalings,
        "bits": bits,
    }
    return meta, sections


def state_from_sections(meta: Mapping, sections: Mapping[str, Mapping[str, np.ndarray]]):
    """Inverse of :func:`state_sections`."""
    bits, scalings = meta["bits"], meta["scalings"]
    missing = sorted({*meta["sites"].values(), *PARTS} - set(sections))
    if missing:
        raise CheckpointError(f"the LoRA state lacks the sections {missing}")
    adapters = {
        name: _factors_of(sections[name], scalings[name], name, bits)
        for name in set(meta["sites"].values())
    }
    sensor = {k: _to_tensor(v, bits, f"sensor/{k}") for k, v in sections["sensor"].items()}
    state = LoraServerState(
        meta["method"],
        {int(pid): adapters[name] for pid, name in meta["sites"].items()},
        sensor,
        bool(meta["dense_diagnostics"]),
        None if meta["a_seed"] is None else int(meta["a_seed"]),
    )
    state.version = int(meta["version"])
    state.residual = _factors_of(sections["residual"], scalings["residual"], "residual", bits)
    state.exact = _factors_of(sections["exact"], scalings["exact"], "exact", bits)
    return state


# ----------------------------------------------------------------------- checkpointer


@dataclass
class LoraResumePoint:
    """Where a resumed run continues: after round ``round`` of method ``method``, whose
    server state and records are these; ``done``: the finished methods' results blocks."""

    method: str
    round: int
    state: LoraServerState
    records: list[RoundRecord]
    done: dict[str, dict] = field(default_factory=dict)
    rng: tuple[dict, dict[str, np.ndarray]] | None = None
    mlflow: dict[str, str] = field(default_factory=dict)  # the runs to continue (lora_tracking)

    def restore_rng(self) -> None:
        """Put the server's RNG states back as they were after the saved round: call it
        right before the next round (building the method's template draws from torch's)."""
        if self.rng is not None:
            restore_rng(*self.rng)


class LoraCheckpointer:
    """Saves after every round into ``out_dir/checkpoint``; restores with ``resume``."""

    def __init__(
        self,
        out_dir: Path,
        task: LoraTask,
        plans: Sequence[FederatedSettings],
        num_sites: int,
        resume: bool = False,
    ) -> None:
        self.directory = checkpoint_dir(out_dir)
        self.identity = run_identity(task, plans, num_sites)
        self.rounds = {fs.method: (fs.rounds, fs.local_steps) for fs in plans}
        self.resume = resume

    def save(
        self,
        state: LoraServerState,
        records: Sequence[RoundRecord],
        done: Mapping[str, dict],
        mlflow: Mapping[str, str] | None = None,
    ) -> None:
        """The state after the last of ``records`` (the current method's rounds so far);
        ``done``: the results blocks of the methods that finished before it; ``mlflow``:
        the MLflow run ids a resumed run continues (:meth:`LoraTracking.ids
        <server.lora_tracking.LoraTracking.ids>`)."""
        last = records[-1]
        rounds, local_steps = self.rounds[state.method]
        state_meta, sections = state_sections(state)
        rng_meta, sections["rng"] = capture_rng()
        meta = {
            "lora": state_meta,
            "run": self.identity,
            "schedule": {  # where the sites' lr schedule stands (module docstring)
                "rounds": rounds,
                "local_steps": local_steps,
                "next_global_step": last.round * local_steps,
            },
            "rng": rng_meta,
            "records": [r.to_json() for r in records],
            "done": dict(done),
            "mlflow": dict(mlflow or {}),
        }
        save_checkpoint(self.directory, Checkpoint(last.round, last.phase, sections, meta))

    def restore(self) -> LoraResumePoint | None:
        """With ``resume``: the checkpoint's state and where to go on (None: round 1)."""
        if not self.resume:
            return None
        ckpt = load_checkpoint(self.directory)
        if ckpt is None:
            log.info("resume=true, but %s holds no checkpoint: round 1", self.directory)
            return None
        where = self.directory
        if "lora" not in ckpt.meta:
            raise CheckpointError(f"{where}: not a federated-LoRA checkpoint")
        differ = _differences(ckpt.meta["run"], self.identity)
        if differ:
            raise CheckpointError(
                f"{where}: written under different federated-LoRA settings ("
                f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''} differ); resume "
                "with the same settings (rounds included: the sites' lr schedule spans all "
                "rounds) or start afresh with resume=false"
            )
        try:
            state = state_from_sections(ckpt.meta["lora"], ckpt.sections)
            records = [RoundRecord.from_json(doc) for doc in ckpt.meta["records"]]
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{where}: unreadable federated-LoRA state: {err}") from err
        if not records or (records[-1].phase, records[-1].round) != (TRAIN, ckpt.round):
            raise CheckpointError(f"{where}: the round records do not end at round {ckpt.round}")
        records[-1] = replace(records[-1], arrays=ArrayRecord())  # the engine's token
        log.info("resuming federated LoRA after %s round %s", state.method, ckpt.round)
        rng = (ckpt.meta["rng"], ckpt.sections["rng"])
        return LoraResumePoint(
            state.method, ckpt.round, state, records, ckpt.meta["done"], rng,
            dict(ckpt.meta.get("mlflow") or {}),
        )  # fmt: skip
