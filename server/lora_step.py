"""One federated-LoRA round as a round engine step (:mod:`server.engine`).

:class:`LoraStep` sends every site its ``train`` payload, waits for the replies until
``llm.federated.round_timeout_s`` and sorts them as the federation does
(:func:`server.participation.sort_replies`): a site whose ClientApp failed or that stayed
silent is named in the round's :class:`~fed_iotlm.federation.round_record.Participation`,
the round aggregates the sites that answered, and a round with fewer than
``llm.federated.min_sites`` answers is skipped (the LoRA state stays as it was) instead of
ending the run.  The aggregation report (loss, aggregation error, FedIT error, per-site
loss/n/rank) and the bytes down and up go into the :class:`StepResult`, so the round's
record carries the round; :func:`lora_rounds` and :func:`lora_comm` turn the records back
into results.json's ``rounds`` and ``comm`` blocks.

Idle sites (``idle``: partition id -> why, :meth:`fed_iotlm.llm.sites.SiteSplit.idle`:
a node site without a single instruction example) are sent no round; every round's
record names them in its stats (``sites_idle``, ``idle.<partition id>``) and results.json's
round blocks list them (``idle``), so a site that trains on nothing is never a silent
absence.  "Every site" for ``min_sites`` means every site that has examples.

The LoRA state and the engine's ArrayRecord: the model the sites load does not fit one
ArrayRecord (FlexLoRA keeps one factor set per site rank, FedEx a residual that grows by
stacked factors each round), so the step owns it, a
:class:`~fed_iotlm.llm.federated.LoraServerState`, and the ArrayRecord the engine passes
from round to round is only a token: the step hands it back unchanged when the round
aggregated (the state moved on) and None when it was skipped (the state did not), which
is what the engine's "keep the model" means.  Records therefore hold no LoRA weights: the
checkpoint saves the state beside them (:mod:`server.lora_resume`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fed_iotlm.federation.records import numpy_to_record, record_nbytes, record_to_numpy
from fed_iotlm.federation.round_record import RoundRecord, StepResult
from fed_iotlm.llm.federated import FederatedSettings, LoraServerState, RoundReport, SiteUpdate
from fed_iotlm.llm.lora_wire import pack, unpack

from .participation import sort_replies
from .roster import LiveRoster

log = logging.getLogger(__name__)

# called after each aggregation: (method, round, replies by partition id, server state)
Observer = Callable[[str, int, Mapping[int, SiteUpdate], LoraServerState], None]

SITE = "site."  # per-site figures in a record's metrics: site.<partition id>.<loss|n|rank>
OPTIONAL = ("fedit_error", "dense_error")  # None in the report: absent from the metrics
SCALARS = ("loss", "agg_error", "exact_norm", "update_norm", "rel_error")
IDLE = "idle."  # in a record's stats: idle.<partition id> = 1 for a site sent no round


def train_message(
    node: int, state: LoraServerState, site: int, rnd: int, fs: FederatedSettings
) -> Message:
    """Round ``rnd``'s ``train`` message to ``node`` (partition ``site``): its payload packed
    (:mod:`fed_iotlm.llm.lora_wire`) and the round's config."""
    p = state.payload(site)
    config = ConfigRecord(
        {
            "server-round": rnd,
            "method": state.method,
            "local-steps": fs.local_steps,
            "residual-version": p.version,
            "freeze-a": p.freeze_a,
            "a-seed": -1 if state.a_seed is None else state.a_seed,
            "total-rounds": fs.rounds,
        }
    )
    arrays = numpy_to_record(pack(p.factors, p.sensor, p.residual, b_only=p.freeze_a))
    return Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type="train"
    )


def lora_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the LoRA factors and residual in a payload (the projector state excluded)."""
    return sum(a.nbytes for k, a in arrays.items() if not k.startswith("sensor|"))


def report_metrics(report: RoundReport) -> dict[str, float]:
    """An aggregation report as a record's metrics (floats only; :func:`lora_rounds` inverts)."""
    out = {name: float(getattr(report, name)) for name in SCALARS}
    for name in OPTIONAL:
        value = getattr(report, name)
        if value is not None:
            out[name] = float(value)
    for site, figures in report.sites.items():
        for key, value in figures.items():
            out[f"{SITE}{site}.{key}"] = float(value)
    return out


@dataclass
class LoraStep:
    """One federated-LoRA round on ``grid``, sent to one live node per partition (the
    ``roster``: :func:`server.lora_app.roll_call`), once at least ``min_sites`` of them
    are connected (else it fails after the roster's ``wait_s``; ``resume=true`` goes on)."""

    grid: Grid
    state: LoraServerState
    roster: LiveRoster
    settings: FederatedSettings
    lora_alpha: float
    observe: Observer | None = None
    idle: Mapping[int, str] = field(default_factory=dict)  # partition id -> why (module doc)

    def active_sites(self) -> int:
        """Sites that train: the roster's partitions less the idle ones."""
        return self.roster.expected - len(self.idle)

    def __call__(self, rnd: int, arrays: ArrayRecord, records: Sequence[RoundRecord]) -> StepResult:
        fs, state = self.settings, self.state
        need = fs.min_replies(self.active_sites())
        live = self.roster.live_grid(self.grid, need, rnd).get_node_ids()
        sites = {  # node id -> partition id, idle partitions left out
            n: pid for n in live for pid in [self.roster.partition_of[n]] if pid not in self.idle
        }
        for _, why in sorted(self.idle.items()):
            log.warning(f"{fs.method} round {rnd}: site left out, {why}")
        messages = [train_message(n, state, pid, rnd, fs) for n, pid in sites.items()]
        down = {
            "bytes_down": sum(record_nbytes(m.content["arrays"]) for m in messages),
            "messages_down": len(messages),
        }
        lora_down = float(sum(lora_nbytes(record_to_numpy(m.content["arrays"])) for m in messages))
        replies = self.grid.send_and_receive(messages, timeout=fs.round_timeout_s)
        outcome = sort_replies(rnd, messages, replies, need, fs.round_timeout_s, sites)
        stats = outcome.metrics() | {"lora_bytes_down": lora_down}
        if self.idle:
            stats |= {"sites_idle": float(len(self.idle))}
            stats |= {f"{IDLE}{pid}": 1.0 for pid in sorted(self.idle)}
        if outcome.skipped:
            log.warning(
                f"{fs.method} round {rnd}/{fs.rounds}: skipped, {len(outcome.answered)} of "
                f"{len(messages)} site(s) answered (llm.federated.min_sites={need}); "
                "the adapter stays as it was"
            )
            return StepResult(None, outcome.summary(), stats=stats | {"lora_bytes_up": 0.0}, **down)
        updates: dict[int, SiteUpdate] = {}
        up = lora_up = 0
        for reply in outcome.answered:
            pid = sites[reply.metadata.src_node_id]
            up += record_nbytes(reply.content["arrays"])
            received = record_to_numpy(reply.content["arrays"])
            lora_up += lora_nbytes(received)
            shared_a = state.factors[pid] if state.a_seed is not None else None  # FFA: B only
            factors, sensor, _ = unpack(received, self.lora_alpha, shared_a)
            metrics = reply.content["metrics"]
            updates[pid] = SiteUpdate(
                factors, sensor, int(metrics["num-examples"]), float(metrics["loss"])
            )
        report = state.aggregate(rnd, updates)
        if self.observe is not None:
            self.observe(fs.method, rnd, updates, state)
        fedit = "" if report.fedit_error is None else f", FedIT would lose {report.fedit_error:.4f}"
        absent = "" if not outcome.faulty else f" ({len(updates)} of {len(messages)} sites)"
        log.info(
            f"{fs.method} round {rnd}/{fs.rounds}{absent}: loss {report.loss:.3f}, "
            f"aggregation error {report.agg_error:.4f} = {report.rel_error:.2%} of the "
            f"round's update {report.update_norm:.3f}{fedit}"
        )
        return StepResult(
            arrays,  # a token: the state moved on (module docstring)
            outcome.summary(),
            stats=stats | {"lora_bytes_up": float(lora_up)},
            bytes_up=up,
            messages_up=len(updates),
            metrics=report_metrics(report),
            **down,
        )


def lora_rounds(records: Sequence[RoundRecord]) -> list[dict]:
    """results.json's ``rounds``: one block per aggregated round, with the keys of
    :class:`~fed_iotlm.llm.federated.RoundReport` (skipped rounds have no report; they
    are in ``faults_by_round``)."""
    out = []
    for r in records:
        if r.participation is not None and r.participation.skipped:
            continue
        m = r.metrics
        sites: dict[str, dict[str, float]] = {}
        for key, value in m.items():
            if key.startswith(SITE):
                site, name = key.removeprefix(SITE).split(".")
                sites.setdefault(site, {})[name] = int(value) if name in ("n", "rank") else value
        block = {"round": r.round, **{name: m[name] for name in SCALARS}}
        block |= {name: m.get(name) for name in OPTIONAL}
        block["sites"] = {k: sites[k] for k in sorted(sites, key=int)}
        idle = sorted(int(k.removeprefix(IDLE)) for k in r.stats if k.startswith(IDLE))
        out.append(block | ({"idle": [str(k) for k in idle]} if idle else {}))
    return out


def lora_comm(records: Sequence[RoundRecord]) -> dict[str, int]:
    """results.json's ``comm``: mean bytes per message sent (down) and per reply (up),
    all of it and the LoRA part alone (projector excluded)."""
    sent = sum(r.messages_down for r in records)
    replies = sum(r.messages_up for r in records)

    def per(total: float, n: int) -> int:
        return int(total // n) if n else 0

    return {  # FedEx adds its stacked residual factors down; FFA moves B only
        "bytes_down_per_site_round": per(sum(r.bytes_down for r in records), sent),
        "bytes_up_per_site_round": per(sum(r.bytes_up for r in records), replies),
        "lora_bytes_down_per_site_round": per(
            sum(r.stats["lora_bytes_down"] for r in records), sent
        ),
        "lora_bytes_up_per_site_round": per(
            sum(r.stats["lora_bytes_up"] for r in records), replies
        ),
    }
