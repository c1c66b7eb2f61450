"""The study table a reviewer reads: validation beside test, the budget each run had,
the first binding's pair accuracy, and the one code version behind every row.

Built from the runs' results.json artifacts in the MLflow store, so a study's table is
whatever the store holds, not what a hand-written writer remembered.  Runs made by
different code never share a table: there is one table per code version (commit, and
``+dirty`` when the tree had uncommitted code changes), largest first.
"""

from __future__ import annotations

from pathlib import Path

from fed_iotlm.protocol import first_binding_pair_accuracy

from .groups import Study
from .page import Section, Table, fmt, mean_std
from .runs import Run
from .study_table import budget, code_version_of, interval


def _val(run: Run) -> float | None:
    return ((run.results or {}).get("val") or {}).get("accuracy")


def _test(run: Run) -> float | None:
    return ((run.results or {}).get("test") or {}).get("accuracy")


def _first_binding(run: Run) -> dict[str, float]:
    return first_binding_pair_accuracy(run.results or {})


def protocol_tables(study: Study, out: Path) -> Section | str:
    """One table per code version: seeds, val, test with its interval, budget, pair
    accuracy at the first binding; groups in the study's order (best mean first)."""
    runs = study.results()
    if not any(_val(r) is not None for r in runs):
        return "Validation and test side by side: no run's results.json has a validation figure."
    tasks = sorted({t for r in runs for t in _first_binding(r)})
    versions: dict[str, list[Run]] = {}
    for r in runs:
        versions.setdefault(code_version_of(r), []).append(r)
    tables = []
    for version, members in sorted(versions.items(), key=lambda kv: -len(kv[1])):
        table = Table(
            ["group", "seeds", "val", "test [95 % interval]", "steps / node / round",
             "examples / node / round", *[f"pair acc. @1st binding ({t})" for t in tasks]],
            [],
            caption=f"Code version `{version}`: {len(members)} runs. Val and test: accuracy "
            "(mean over tasks, all modalities) of each run's reported model; mean ± std over "
            "seeds [95 % interval of the mean].",
            numeric=[False, True, True, True, True, True, *[True] * len(tasks)],
        )  # fmt: skip
        for group, grs in study.groups.items():
            rs = [r for r in grs if r in members]
            if not rs:
                continue
            steps, examples = budget(rs)
            pairs = [[_first_binding(r).get(t) for r in rs] for t in tasks]
            table.rows.append(
                [group, str(len(rs)), mean_std([_val(r) for r in rs]),
                 interval([_test(r) for r in rs]), steps, examples,
                 *[mean_std([p for p in ps if p is not None]) for ps in pairs]]
            )  # fmt: skip
        tables.append(table)
    text = [
        f"Runs of {len(versions)} code versions, one table each (a table never mixes them)."
        if len(versions) > 1
        else f"Every run below was made by code version `{next(iter(versions))}`."
    ]
    if any(fmt(_val(r)) == "–" for r in runs):
        text.append("A dash: the run's results.json has no such figure.")
    return Section("Validation and test side by side", text=text, tables=tables)
