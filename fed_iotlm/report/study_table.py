"""One study table from an MLflow experiment's runs: what every study page is built from.

A study says which row a run belongs to (``group_of``: attack and rule, severity and
method, label fraction and method, from the run's params) and which figures to show
(:class:`Column`); each figure cell is ``mean ± std [lo, hi]`` over the row's runs (its
seeds), the 95 % interval of the mean by Student t, a single run's value bare.  The
table's caption names the one code version (results.json ``code_version``) of every run in
it: runs of two code versions are refused, not averaged, since a row of old code beside
one of new code would compare two programs.  Runs that are not FINISHED are left out and
counted in the caption, so a table never silently shows fewer seeds than were started.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fed_iotlm.protocol import one_code_version, version_label

from .page import Table, mean_ci95, mean_std
from .runs import ReportError, Run

FINISHED = "FINISHED"
CELLS = "mean ± std over seeds [95 % interval of the mean, Student t]; one seed: its value"


@dataclass(frozen=True)
class Column:
    """A table column: a per-run figure (``value``, summarised over the row's runs) or
    text made from the row's runs as a whole (``text``: a budget, a chosen setting)."""

    header: str
    value: Callable[[Run], float | None] | None = None
    text: Callable[[list[Run]], str] | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.text is None):
            raise ValueError(f"column {self.header!r}: give exactly one of value= and text=")

    def cell(self, runs: list[Run]) -> str:
        if self.text is not None:
            return self.text(runs)
        assert self.value is not None
        return interval([self.value(r) for r in runs])


def interval(values: Sequence[float | None]) -> str:
    """``mean ± std [lo, hi]`` over seeds (95 % interval of the mean); one value bare;
    a dash when no run has the figure."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return mean_std(vals)
    mean, half = mean_ci95(vals)
    return f"{mean_std(vals)} [{mean - half:.3f}, {mean + half:.3f}]"


def seeds_column(header: str = "seeds") -> Column:
    """How many runs (seeds) a row summarises."""
    return Column(header, text=lambda runs: str(len(runs)))


def budget(runs: Sequence[Run]) -> tuple[str, str]:
    """Steps and examples per node per round, mean over the runs' results.json
    ``budget``; a centralized run reports them per round for its one pooled model, shown
    as such; dashes when no run reports one."""
    budgets = [(r.results or {}).get("budget") or {} for r in runs]
    for steps_key, examples_key, tag in (
        ("steps_per_node_round", "examples_per_node_round", ""),
        ("steps_per_round", "examples_per_round", " (pooled)"),
    ):
        steps = [b[steps_key] for b in budgets if b.get(steps_key) is not None]
        if steps:
            examples = [b[examples_key] for b in budgets if b.get(examples_key) is not None]
            return f"{np.mean(steps):g}{tag}", f"{np.mean(examples):g}{tag}"
    return "–", "–"


def budget_columns() -> list[Column]:
    """The two budget columns every study table shows beside its figures."""
    return [
        Column("steps / node / round", text=lambda runs: budget(runs)[0]),
        Column("examples / node / round", text=lambda runs: budget(runs)[1]),
    ]


def result(*path: str) -> Callable[[Run], float | None]:
    """A figure of the run's results.json by its key path (``result("test", "accuracy")``);
    None where the run has no such figure."""

    def read(run: Run) -> float | None:
        node: Any = run.results or {}
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return None if node is None else float(node)

    return read


def code_version_of(run: Run) -> str:
    """The run's code version as a caption names it (``<commit>``, ``<commit>+dirty``)."""
    return version_label((run.results or {}).get("code_version"))


def one_version(runs: Sequence[Run]) -> str:
    """The one code version of ``runs`` (:func:`~fed_iotlm.protocol.one_code_version`)."""
    return one_code_version(r.results for r in runs)


def study_table(
    runs: Sequence[Run],
    group_of: Callable[[Run], tuple[str, ...] | None],
    keys: Sequence[str],
    columns: Sequence[Column],
    *,
    caption: str = "",
    order: Callable[[tuple[str, ...]], Hashable] | None = None,
) -> Table:
    """The Markdown-ready table of ``runs``: one row per ``group_of`` value (its cells
    under ``keys``), then ``columns``.  ``group_of`` returning None leaves a run out of
    this table (another table's run); rows come in ``order`` or in the runs' order.

    Raises ValueError when the table's FINISHED runs come from two code versions or
    when it has no FINISHED run."""
    mine = [(r, g) for r in runs if (g := group_of(r)) is not None]
    done = [(r, g) for r, g in mine if r.status == FINISHED]
    if not done:
        raise ReportError(f"no FINISHED run for the table with columns {', '.join(keys)}")
    version = one_version([r for r, _ in done])
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run, group in done:
        if len(group) != len(keys):
            raise ValueError(f"group {group!r} has {len(group)} cells for keys {list(keys)}")
        groups.setdefault(group, []).append(run)
    rows = sorted(groups, key=order) if order is not None else list(groups)
    left_out = len(mine) - len(done)
    text = (
        f"{caption} Code version `{version}`: {len(done)} runs"
        + (f" ({left_out} not FINISHED left out)" if left_out else "")
        + f". Cells: {CELLS}."
    ).strip()
    return Table(
        columns=[*keys, *(c.header for c in columns)],
        rows=[[*g, *(c.cell(groups[g]) for c in columns)] for g in rows],
        caption=text,
        numeric=[False] * len(keys) + [True] * len(columns),
    )


# ----------------------------------------------------------------- which row a run is


def _plain(value: str) -> str:
    """A value as overrides and logged params both spell it: no quotes, no spaces, lower."""
    return "".join(c for c in str(value) if c not in "'\" ").lower()


def same_value(logged: str, given: str) -> bool:
    """``0`` is ``0.0``, ``true`` is ``True``, ``[[imu,audio]]`` is ``[['imu', 'audio']]``."""
    try:
        return float(logged) == float(given)
    except ValueError:
        pass
    if logged.startswith("[") and given.startswith("["):
        try:  # a list as logged (Python repr) against the override's bare list
            return _plain(str(ast.literal_eval(logged))) == _plain(given)
        except (ValueError, SyntaxError):
            pass
    return _plain(logged) == _plain(given)


def matches(params: Mapping[str, str], overrides: Sequence[str]) -> bool:
    """Whether a run with ``params`` was made with every ``key=value`` of ``overrides``.
    A config group choice (``strategy=fedadam``) is the group's ``name`` param; an
    override of a key the run never logged does not match."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        logged = params.get(key, params.get(f"{key}.name"))
        if logged is None or not same_value(logged, value):
            return False
    return True


def label_of(params: Mapping[str, str], labelled: Mapping[str, Sequence[str]]) -> str | None:
    """The label whose overrides the run was made with; of several, the one with the
    most overrides (``ssl_spine``'s ``binding.bind=false`` over plain ``mmbind``)."""
    hits = [(len(o), i, label) for i, (label, o) in enumerate(labelled.items())
            if matches(params, o)]  # fmt: skip
    return max(hits, key=lambda h: (h[0], -h[1]))[2] if hits else None
