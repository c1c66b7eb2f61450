"""Which round's model a run reports: ``select_round=last|best_val``.

``last`` (the default) reports the model after the last round: a fixed budget, no
selection.  ``best_val`` reports the model of the round with the best validation
macro-F1 (``val_f1_macro`` in that round's history row), as FedMultimodal reports the
round with the best dev macro-F1.  Why it exists: under strong label skew (HAPT at
Dirichlet alpha=0.1) the global model swings by 10+ points of test accuracy between
neighbouring rounds, so one seed's last round is mostly noise.  The choice reads
validation figures only; test figures of other rounds are never consulted.

Every runner (the federation's server, the in-process baselines) keeps a
:class:`BestRound` and offers it each round's validation score with the round's model;
at the end it reports :meth:`BestRound.chosen` instead of the last model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fed_iotlm.config_schema import CHOICES, ConfigError, setting

LAST, BEST_VAL = "last", "best_val"
RULES: tuple[str, ...] = CHOICES["select_round"]  # (LAST, BEST_VAL)
SCORE = "val_f1_macro"  # the history key best_val maximises

# protocol.choices["model"] under each rule (results.json)
RULE_TEXT = {
    LAST: "last round (fixed budget, no selection)",
    BEST_VAL: f"round with the best validation macro-F1 ({SCORE}; ties: the earliest)",
}

T = TypeVar("T")


def select_round_mode(cfg: Mapping[str, Any]) -> str:
    """``last`` or ``best_val``; any other value is a :class:`ConfigError` naming the key
    and what it accepts (a caller's dict never went through composition's check)."""
    mode = setting(cfg, "select_round")
    if mode not in RULES:
        raise ConfigError(f"config: select_round={mode!r}: expected one of {', '.join(RULES)}")
    return str(mode)


@dataclass
class BestRound(Generic[T]):
    """The best round so far by validation score, and its model (``state``: whatever the
    runner needs to report it: an ArrayRecord on the server, a numpy state in process).

    Ties keep the earliest round: a later round that only matches the score has spent
    more budget for nothing a reader can see, and a running maximum with a strict ``>``
    is what FedMultimodal's loop computes, so our figures follow the same rule.  A NaN
    score (no node answered the round's evaluation) never wins."""

    round: int | None = None
    score: float = -math.inf
    state: T | None = None

    def offer(self, rnd: int, score: float, state: Callable[[], T]) -> bool:
        """Keep round ``rnd`` if ``score`` beats the best so far; ``state`` is called
        only then (a copy of a model is not made for every round)."""
        score = float(score)
        if math.isnan(score) or score <= self.score:
            return False
        self.round, self.score, self.state = int(rnd), score, state()
        return True

    def chosen(self) -> tuple[int, T]:
        """The selected round and its model; an error if no round had a score."""
        if self.round is None or self.state is None:
            raise RuntimeError(
                f"select_round=best_val: no round had a validation {SCORE} to select on "
                "(no validation samples, or no node reported one)"
            )
        return self.round, self.state

    def to_json(self) -> dict | None:
        """The round and score (the checkpoint's meta; the model is a tensor section)."""
        return None if self.round is None else {"round": self.round, "score": self.score}


class InProcessSelection:
    """The rule for a runner that trains in this process (the baselines): per round the
    history's extra key, the offer of the round's model, and at the end the round to
    report with its state (None under ``last``: the model as it is).

    ``scores`` are validation per-task figures (:func:`~fed_iotlm.models.training.evaluate`
    on the validation reference set), one dict per model the round trained (local-only:
    one per node); the round's score is their mean macro-F1."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.mode = select_round_mode(cfg)
        self.rounds = int(cfg["rounds"])
        self.best: BestRound[Any] = BestRound()

    def round_metrics(self, val_tasks: list[dict[str, dict[str, float]]]) -> dict[str, float]:
        """``{val_f1_macro: ...}`` for the history row under ``best_val``; nothing under
        ``last`` (its history stays as it was)."""
        if self.mode != BEST_VAL:
            return {}
        from fed_iotlm.models.training import mean_metric

        return {SCORE: sum(mean_metric(v, "f1_macro") for v in val_tasks) / len(val_tasks)}

    def offer(self, rnd: int, metrics: Mapping[str, float], state: Callable[[], Any]) -> None:
        if self.mode == BEST_VAL:
            self.best.offer(rnd, metrics[SCORE], state)

    def chosen(self) -> tuple[int, Any | None]:
        """(the round to report, its state to load, or None: keep the model as it is)."""
        if self.mode != BEST_VAL:
            return self.rounds, None
        return self.best.chosen()


def choice_record(mode: str, selected_round: int) -> dict:
    """results.json's ``protocol`` keys of the choice: the rule, in words under
    ``choices.model`` as before, the key's value and the round reported."""
    return {
        "choices": {"model": RULE_TEXT[mode]},
        "select_round": mode,
        "selected_round": int(selected_round),
    }
