"""The round engine: every round of a run goes through :meth:`RoundEngine.run_round`.

A round is: ``before_round`` (MMBind's re-binding), a *step* (configure, send, wait
for replies until the deadline, aggregate), the evaluation, then the record.  The step
is where rounds differ: :class:`StrategyStep` runs a flwr strategy in the clear,
:class:`server.secure_rounds.SecureRounds` sums under SecAgg+, and
:func:`server.mmbind.pretrain_step` averages MMBind's shared-modality round.  Each step
returns a :class:`~fed_iotlm.federation.round_record.StepResult`; the engine adds the
binding, the evaluation, the rejoins and the timings and returns a frozen
:class:`~fed_iotlm.federation.round_record.RoundRecord`, appended to the run's list.
Nothing about a round is kept anywhere else: the recorder, the checkpointer and
results.json read that list (``on_record`` hands each record to them as it is made).

The engine can start at any round: a resumed run continues at the round after its
checkpoint with the list of the rounds before it, and makes the same calls an
uninterrupted run makes there (flwr's ``Strategy.start`` cannot start mid-run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_iotlm.federation.privacy import CentralPrivacy
from fed_iotlm.federation.records import record_nbytes
from fed_iotlm.federation.round_record import (
    RoundRecord,
    StepResult,
    facts_of,
    releases_of,
)
from fed_iotlm.federation.strategy import budget_metrics

from .participation import sort_replies
from .roster import LiveRoster

log = logging.getLogger(__name__)


class Step(Protocol):
    """One round's configure/send/aggregate; ``records`` are the run's rounds so far
    (the DP accountant composes over them)."""

    def __call__(
        self, rnd: int, arrays: ArrayRecord, records: Sequence[RoundRecord]
    ) -> StepResult: ...


@dataclass
class RoundEngine:
    """Runs the rounds of one phase and records each.

    ``records`` is the run's list (shared by its phases; restored on resume);
    ``evaluate`` returns the round's evaluation metrics (``accuracy``, ``loss``, ...);
    ``before_round`` returns MMBind's binding statistics when it bound (else None);
    ``roster`` hands over the sites that rejoined during the round."""

    phase: str
    step: Step
    records: list[RoundRecord] = field(default_factory=list)
    evaluate: Callable[[int, ArrayRecord], dict[str, float]] | None = None
    before_round: Callable[[int, ArrayRecord], dict | None] | None = None
    on_record: Callable[[RoundRecord], None] | None = None
    roster: LiveRoster | None = None
    label: str = "ROUND"

    def run(self, arrays: ArrayRecord, first: int, last: int) -> ArrayRecord:
        """Rounds ``first``..``last``; the global model after the last."""
        for rnd in range(first, last + 1):
            log.info("[%s %s/%s]", self.label, rnd, last)
            arrays = self.run_round(rnd, arrays).arrays
        return arrays

    def run_round(self, rnd: int, arrays: ArrayRecord) -> RoundRecord:
        """One round from ``arrays``; returns (and appends) its record, whose
        ``arrays`` are the model after it (``arrays`` again if nothing was released)."""
        t0 = time.perf_counter()
        binding = self.before_round(rnd, arrays) if self.before_round is not None else None
        t1 = time.perf_counter()
        step = self.step(rnd, arrays, self.records)
        if step.arrays is None:
            log.warning("%s round %s: nothing aggregated; keeping the model", self.phase, rnd)
        new = arrays if step.arrays is None else step.arrays
        t2 = time.perf_counter()
        metrics = dict(step.metrics)
        if self.evaluate is not None:
            metrics.update(self.evaluate(rnd, new))
        t3 = time.perf_counter()
        record = RoundRecord(
            phase=self.phase,
            round=rnd,
            arrays=new,
            participation=step.participation,
            holders=step.holders,
            selected=step.selected,
            rejections=step.rejections,
            stats=step.stats,
            dp_release=step.dp_release,
            withheld=step.withheld,
            binding=binding,
            rejoins=tuple(self.roster.take_rejoins()) if self.roster is not None else (),
            bytes_down=step.bytes_down,
            bytes_up=step.bytes_up,
            messages_down=step.messages_down,
            messages_up=step.messages_up,
            timings={"bind_s": t1 - t0, "step_s": t2 - t1, "evaluate_s": t3 - t2},
            metrics=metrics,
        )
        if self.records and self.records[-1].arrays is not None:  # one model in memory
            self.records[-1] = replace(self.records[-1], arrays=None)
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)
        return record


def account_release(
    privacy: CentralPrivacy, rnd: int, sampled: int, records: Sequence[RoundRecord]
) -> tuple[dict[str, float], dict[str, float]]:
    """Round ``rnd``'s DP release (``sampled`` nodes were sent it) composed with the
    releases in ``records``: its metrics (``dp.epsilon`` so far, ...) and the
    ``{"sigma", "q"}`` its record keeps."""
    releases = releases_of(records)
    stats = privacy.account(rnd, sampled, releases)
    return stats, dict(releases[rnd])


@dataclass
class StrategyStep:
    """A plaintext round of a flwr strategy: ``configure_train``, send, wait until
    ``timeout``, aggregate if at least the strategy's ``min_train_nodes`` answered
    (:mod:`server.participation`), else skip the round and keep the model.

    With a ``roster`` the strategy samples from one live node per partition, refreshed
    every round, so a restarted site is picked up again.  The modality-aware strategies'
    facts (:func:`~fed_iotlm.federation.round_record.facts_of`) and, under DP, the
    release and its accounting go into the result."""

    grid: Grid
    strategy: Strategy
    timeout: float = 3600.0
    roster: LiveRoster | None = None

    def __call__(self, rnd: int, arrays: ArrayRecord, records: Sequence[RoundRecord]) -> StepResult:
        strategy = self.strategy
        min_nodes = int(getattr(strategy, "min_train_nodes", 1))
        minimum = int(getattr(strategy, "min_available_nodes", min_nodes))
        grid = self.grid if self.roster is None else self.roster.live_grid(self.grid, minimum, rnd)
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        partition_of = self.roster.partition_of if self.roster is not None else None
        outcome = sort_replies(rnd, messages, replies, min_nodes, self.timeout, partition_of)
        down = {"bytes_down": record_nbytes(arrays) * len(messages), "messages_down": len(messages)}
        if outcome.skipped:
            return StepResult(None, outcome.summary(), stats=outcome.metrics(), **down)
        new, metrics = strategy.aggregate_train(rnd, outcome.answered)
        facts = facts_of(metrics)
        if facts is None:  # flwr's own strategies (method=fedavg): no facts to record,
            # but the budget the nodes report, read beside the aggregation, not by it
            stats = {**budget_metrics(outcome.answered), **outcome.metrics()}
            return StepResult(new, outcome.summary(), stats=stats, **down)
        stats = dict(facts.stats)
        release = None
        privacy = getattr(strategy, "privacy", None)
        if privacy is not None and facts.released:
            dp_stats, release = account_release(privacy, rnd, len(messages), records)
            stats.update(dp_stats)
        stats.update(outcome.metrics())
        return StepResult(
            new,
            outcome.summary(),
            holders=facts.holders,
            selected=facts.selected,
            rejections=facts.rejections,
            stats=stats,
            dp_release=release,
            bytes_up=facts.bytes_up,
            messages_up=facts.messages_up,
            **down,
        )
