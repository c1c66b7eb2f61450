"""A round is a value: what one federated round did, frozen once it is over.

The round engine (:mod:`server.engine`) returns one :class:`RoundRecord` per round;
the run keeps them in a list and everything that reports on rounds reads that list
alone: the recorder's history (results.json and MLflow), the checkpoint (the list is
serialised into its meta, so ``resume=true`` gets the rounds before the crash back),
and the per-round blocks of results.json (:func:`results_blocks`).  Strategies and
secure rounds keep no per-round bookkeeping; they hand their part of a round out as a
:class:`StepResult` (the engine's step) or :class:`AggregateFacts` (the strategy's
``aggregate_train``, riding on its metrics: :class:`FactsMetricRecord`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

PRETRAIN, TRAIN = "pretrain", "train"


@dataclass(frozen=True)
class Participation:
    """Who was sent the round, who answered, who failed (with the reason), who stayed
    silent past the deadline, and whether too few answered (``skipped``)."""

    sent: int
    answered: int
    failed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    skipped: bool = False

    @property
    def faulty(self) -> bool:
        return bool(self.failed or self.missing or self.skipped)

    def metrics(self) -> dict[str, float]:
        """Per-round numbers for results.json's history and MLflow."""
        return {
            "nodes_sent": float(self.sent),
            "nodes_answered": float(self.answered),
            "nodes_failed": float(len(self.failed)),
            "nodes_missing": float(len(self.missing)),
            "round_skipped": float(self.skipped),
        }

    def report(self) -> dict:
        """The reasons, for results.json's ``faults_by_round``."""
        return {"failed": list(self.failed), "missing": list(self.missing), "skipped": self.skipped}


@dataclass(frozen=True)
class AggregateFacts:
    """What a modality-aware ``aggregate_train`` learnt about its round.

    ``holders`` maps each group to the nodes averaged into it (empty: every update was
    rejected); ``selected`` Krum's choice per group; ``stats`` the screening, robust
    and budget numbers; ``released`` whether an average was released (DP accounts for
    it); ``bytes_up``/``messages_up`` the payloads it read."""

    holders: dict[str, list[str]]
    stats: dict[str, float]
    rejections: tuple[str, ...] = ()
    selected: dict[str, list[str]] = field(default_factory=dict)
    released: bool = False
    bytes_up: int = 0
    messages_up: int = 0


class FactsMetricRecord(MetricRecord):
    """The train metrics ``aggregate_train`` returns, carrying its :class:`AggregateFacts`.

    flwr's strategy hook returns ``(arrays, metrics)`` and its FedOpt family passes the
    metrics through untouched, so this is how the round's facts travel back to the
    engine through FedAdam/FedProx without the strategy keeping them."""

    def __init__(self, metrics: Mapping[str, Any], facts: AggregateFacts) -> None:
        super().__init__(dict(metrics))
        self.facts = facts


def facts_of(metrics: MetricRecord | None) -> AggregateFacts | None:
    """The facts riding on ``metrics`` (None from flwr's own strategies)."""
    return metrics.facts if isinstance(metrics, FactsMetricRecord) else None


@dataclass(frozen=True)
class StepResult:
    """One round's configure/send/aggregate step (plaintext, SecAgg+ or MMBind's
    shared-modality round), before evaluation.  ``arrays`` None: the model stays."""

    arrays: ArrayRecord | None
    participation: Participation | None = None
    holders: dict[str, list[str]] | None = None
    selected: dict[str, list[str]] = field(default_factory=dict)
    rejections: tuple[str, ...] = ()
    stats: dict[str, float] = field(default_factory=dict)
    dp_release: dict[str, float] | None = None
    withheld: tuple[str, ...] | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    messages_down: int = 0
    messages_up: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundRecord:
    """Everything one round did.  ``arrays`` is the global model after it (kept for
    the latest round only; the checkpoint stores it as a tensor section, so it is not
    part of :meth:`to_json`).  ``stats`` are the per-round numbers of the history row
    (screening, robust aggregation, participation, SecAgg+, DP); ``metrics`` what the
    evaluation measured (or the shared-modality loss); ``binding`` MMBind's binding
    made before the round; ``timings`` seconds per stage (never in results.json's
    history, which must be identical between a resumed and an uninterrupted run)."""

    phase: str
    round: int
    arrays: ArrayRecord | None = field(default=None, compare=False, repr=False)
    participation: Participation | None = None
    holders: dict[str, list[str]] | None = None
    selected: dict[str, list[str]] = field(default_factory=dict)
    rejections: tuple[str, ...] = ()
    stats: dict[str, float] = field(default_factory=dict)
    dp_release: dict[str, float] | None = None
    withheld: tuple[str, ...] | None = None
    binding: dict | None = None
    rejoins: tuple[dict, ...] = ()
    bytes_down: int = 0
    bytes_up: int = 0
    messages_down: int = 0
    messages_up: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def history_row(self) -> dict[str, float]:
        """results.json's history row: round, accuracy, loss, the round's numbers,
        then the rest of the evaluation (``val_accuracy``, ``evaluated_nodes``)."""
        rest = {k: v for k, v in self.metrics.items() if k not in ("accuracy", "loss")}
        return {
            "round": self.round,
            "accuracy": float(self.metrics["accuracy"]),
            "loss": float(self.metrics["loss"]),
            **self.stats,
            **rest,
        }

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (for the checkpoint), without the arrays."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "arrays"}
        out["participation"] = None if self.participation is None else asdict(self.participation)
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_json`; an unknown or missing key is a clear error."""
        names = {f.name for f in fields(cls)} - {"arrays"}
        unknown = sorted(set(doc) - names)
        if unknown or not {"phase", "round"} <= set(doc):
            raise ValueError(f"not a round record: unknown keys {unknown}, keys {sorted(doc)}")
        kw = dict(doc)
        p = kw.get("participation")
        if p is not None:
            kw["participation"] = Participation(
                int(p["sent"]), int(p["answered"]), tuple(p["failed"]), tuple(p["missing"]),
                bool(p["skipped"]),
            )  # fmt: skip
        for name in ("rejections", "rejoins"):
            if name in kw:
                kw[name] = tuple(kw[name])
        if kw.get("withheld") is not None:
            kw["withheld"] = tuple(kw["withheld"])
        return cls(**kw)


# ------------------------------------------------------------------- views of the list


def of_phase(records: Iterable[RoundRecord], phase: str) -> list[RoundRecord]:
    return [r for r in records if r.phase == phase]


def history_of(records: Iterable[RoundRecord]) -> list[dict[str, float]]:
    """results.json's ``history``: the rows of the (multimodal) training rounds."""
    return [r.history_row() for r in of_phase(records, TRAIN)]


def releases_of(records: Iterable[RoundRecord], phase: str = TRAIN) -> dict[int, dict]:
    """round -> ``{"sigma", "q"}`` of every DP release of ``phase`` (the accountant's
    input, :class:`~fed_iotlm.federation.privacy.CentralPrivacy`)."""
    return {
        r.round: {"sigma": r.dp_release["sigma"], "q": r.dp_release["q"]}
        for r in of_phase(records, phase)
        if r.dp_release is not None
    }


def communication_totals(records: Sequence[RoundRecord]) -> dict[str, int]:
    """Bytes and messages down and up over the training rounds."""
    train = of_phase(records, TRAIN)
    return {
        "bytes_down": sum(r.bytes_down for r in train),
        "bytes_up": sum(r.bytes_up for r in train),
        "messages_down": sum(r.messages_down for r in train),
        "messages_up": sum(r.messages_up for r in train),
    }


def results_blocks(records: Sequence[RoundRecord], *, binding: bool = False) -> dict[str, Any]:
    """The per-round blocks of results.json that every federated run reports
    (``holders_by_round``, ``faults_by_round`` and ``rejoined`` when some round had
    any, ``binding`` for MMBind), schema as in DESIGN.md."""
    train = of_phase(records, TRAIN)
    out: dict[str, Any] = {}
    faults = {
        str(r.round): r.participation.report()
        for r in train
        if r.participation and r.participation.faulty
    }
    if faults:
        out["faults_by_round"] = faults
    rejoins = [j for r in records for j in r.rejoins]
    if rejoins:
        out["rejoined"] = rejoins
    out["holders_by_round"] = {str(r.round): r.holders for r in train if r.holders is not None}
    if binding:
        block: dict[str, Any] = {}
        for r in train:
            if r.binding is not None:
                block[str(r.round)] = r.binding
                if "pair_accuracy" in r.binding:  # simulation only: the truth is known
                    by = block.setdefault("pair_accuracy_by_binding", {})
                    by[str(r.round)] = r.binding["pair_accuracy"]
        out["binding"] = block
    return out


def robustness_block(records: Sequence[RoundRecord], aggregation: dict, checks: dict) -> dict:
    """results.json's ``robustness``: the rule, the checks, and per round the rejected
    updates' reasons and (Krum) the nodes selected."""
    train = of_phase(records, TRAIN)
    out: dict = {
        "aggregation": aggregation,
        "checks": checks,
        "rejections_by_round": {str(r.round): list(r.rejections) for r in train if r.rejections},
    }
    selected = {str(r.round): r.selected for r in train if r.selected}
    if selected:
        out["selected_by_round"] = selected
    return out


def withheld_by_round(records: Sequence[RoundRecord]) -> dict[str, list[str]]:
    """SecAgg+: per training round, the groups held by too few nodes to be released."""
    return {
        str(r.round): list(r.withheld) for r in of_phase(records, TRAIN) if r.withheld is not None
    }
