"""Which rows each optimiser step of a round sees: epochs, or a fixed step budget.

Comparisons between methods are only fair at equal budgets, so MMBind's local rounds
(and its self-supervised rounds) honour ``TrainConfig.steps``: with it set, a round
takes exactly that many optimiser steps, cycling through freshly shuffled passes over
the data as often as needed; without it, ``epochs`` full passes.  Batches come from
one source each (sources may hold different modalities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def shuffled_pass(
    sizes: list[int], batch_size: int, gen: torch.Generator
) -> list[tuple[int, torch.Tensor]]:
    """One pass over every source in batches of ``batch_size`` rows: (source, rows), with
    rows shuffled within each source and batches shuffled across sources."""
    if batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
    batches = []
    for s, n in enumerate(sizes):
        order = torch.randperm(n, generator=gen)
        batches += [(s, order[i : i + batch_size]) for i in range(0, n, batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def run_schedule(
    sizes: list[int],
    batch_size: int,
    epochs: int,
    steps: int | None,
    gen: torch.Generator,
    step: Callable[[int, torch.Tensor], bool],
) -> dict[str, float]:
    """Call ``step(source, rows)`` per batch; it returns whether it took an optimiser step
    (a batch with nothing to learn takes none).  Stops after ``epochs`` passes, or once
    ``steps`` optimiser steps were taken; a full pass without any step ends the round
    early rather than looping for ever.  Returns ``steps`` taken and ``examples`` seen
    (rows of the batches that took a step)."""
    if steps is not None and steps < 0:
        raise ValueError(f"train.steps must be >= 0 or null, got {steps}")
    taken, examples = 0, 0
    for batches in _passes(sizes, batch_size, epochs, steps, gen):
        stepped = 0
        for s, rows in batches:
            if step(s, rows):
                taken, stepped, examples = taken + 1, stepped + 1, examples + rows.numel()
                if steps is not None and taken >= steps:
                    return {"steps": float(taken), "examples": float(examples)}
        if stepped == 0:
            break
    return {"steps": float(taken), "examples": float(examples)}


def _passes(
    sizes: list[int], batch_size: int, epochs: int, steps: int | None, gen: torch.Generator
) -> Iterator[list[tuple[int, torch.Tensor]]]:
    if sum(sizes) == 0 or steps == 0:
        return
    if steps is None:
        for _ in range(epochs):
            yield shuffled_pass(sizes, batch_size, gen)
        return
    while True:
        yield shuffled_pass(sizes, batch_size, gen)
