"""Every results table in README.md and docs/*.md names the code version that produced it.

Issue 11 asks that no table mix figures of different code versions and that each table say
which code it came from, so that a reader can tell comparable figures from history.

The rules this test applies (stated here so a writer of a page knows them):

- A *table* is a Markdown table outside fenced code: a header row followed by a ``|---|``
  separator line and its ``|`` rows.
- A table is a *results table* when one of its body cells holds a measured figure: a ``±``,
  a number with at least two decimals (``0.935``, ``1.84``), or a number with a unit of time
  or size (``72 s``, ``13.0 ms``, ``439 kB``, ``2.0 GB``, ``7.24 GB/s``). Reference tables
  whose first header cell is ``key``, ``option``, ``file``, ``package``, ``path``, ``install``
  or ``type`` (settings, files, dependencies) are never results, whatever their defaults.
- A table's *caption* is the text between it and the nearest boundary above it: the nearest
  heading (included, so a heading such as "… (code version `82b9d74`)" counts) or the end of
  the previous table (excluded), whichever is nearer. Two tables in a row therefore each need
  their own caption line.
- A caption *names a code version* when it says ``code `<commit>` ``, ``code version
  `<commit>` `` or ``code at `<commit>` `` (a 7–40 digit hex commit in backticks; a
  ``+dirty`` tree is not a version, so it does not match), or ``fed-iotlm==<release>``; or
  it carries the explicit label "code version not recorded" (old figures kept for history).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
FIGURE = re.compile(r"±|\b\d+\.\d{2,}\b|\b\d+(?:\.\d+)?\s?(?:ms|s|kB|KB|MB|GB|GB/s)(?![\w/])")
REFERENCE_HEADERS = {"key", "option", "file", "package", "path", "install", "type"}
VERSION = re.compile(
    r"\bcode(?:\s+version)?(?:\s+at)?[\s:*]*`[0-9a-f]{7,40}`"
    r"|fed-iotlm==[0-9]"
    r"|code\s+version\s+not\s+recorded",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Table:
    """One Markdown table: where it is, its caption and its rows."""

    path: str
    line: int  # 1-based line of the header row
    caption: str
    header: list[str]
    body: list[str]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def tables(text: str, path: str) -> list[Table]:
    """The tables of a Markdown text, each with the caption the module docstring defines."""
    lines = text.split("\n")
    found: list[Table] = []
    in_fence = False
    boundary = 0  # first line that may belong to the next table's caption
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            boundary = i
        elif (
            not in_fence
            and i > 0
            and "|" in line
            and SEPARATOR.match(line)
            and lines[i - 1].strip().startswith("|")
        ):
            end = i + 1
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            caption = "\n".join(lines[boundary : i - 1])
            found.append(Table(path, i, caption, cells(lines[i - 1]), lines[i + 1 : end]))
            boundary = end
            i = end
            continue
        i += 1
    return found


def is_results(table: Table) -> bool:
    if table.header and table.header[0].strip("`* ").lower() in REFERENCE_HEADERS:
        return False
    return any(FIGURE.search(row) for row in table.body)


def names_version(table: Table) -> bool:
    return bool(VERSION.search(table.caption))


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def all_tables() -> list[Table]:
    return [
        t
        for p in doc_pages()
        for t in tables(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))
    ]


def test_every_results_table_names_its_code_version():
    missing = [
        f"{t.path}:{t.line} | {' | '.join(t.header)} |"
        for t in all_tables()
        if is_results(t) and not names_version(t)
    ]
    assert not missing, "results tables without a code version in their caption:\n" + "\n".join(
        missing
    )


def test_the_pages_have_results_tables_to_check():
    # guards the rules above from silently matching nothing (a parser that finds no table
    # would pass the test above on any page)
    found = [t for t in all_tables() if is_results(t)]
    assert len(found) >= 20
    assert any(t.path == "docs/results.md" for t in found)


SAMPLE = """\
# Page

## Study (code version `ac9ada1`)

| method | test |
|---|---|
| a | 0.935 ± 0.011 |

Figures of another day:

| method | test |
|---|---|
| b | 0.880 |

| key | default | meaning |
|---|---|---|
| `fraction` | 0.25 | share |

```text
| not | a table |
|---|---|
| 1.23 | 4.56 |
```

Kept for history (code version not recorded):

| | ours |
|---|---|
| seconds per round | 0.617 |

The install check, code at `2802790+dirty`:

| venv | size |
|---|---|
| A | 2.0 GB |
"""


def test_rules_on_a_sample_page():
    found = tables(SAMPLE, "sample.md")
    assert [t.line for t in found] == [5, 11, 15, 27, 33]
    results = [t for t in found if is_results(t)]
    assert [t.line for t in results] == [5, 11, 27, 33]  # the key table is a reference
    verdicts = {t.line: names_version(t) for t in results}
    # the heading's version counts for the first table only; the second has its own caption
    # without one; a "+dirty" tree is not a code version
    assert verdicts == {5: True, 11: False, 27: True, 33: False}


@pytest.mark.parametrize(
    "caption, named",
    [
        ("Code version `ba727767e59c9feb861ee0e9e0593a2847a93721`; `python -m x`", True),
        ("### Three seeds (2026-12-01, code `ba72776`)", True),
        ("Checked on 2026-12-01, code at `2802790`, Python 3.11.7", True),
        ("from the installed fed-iotlm==0.1.0", True),
        ("**Code version not recorded** (kept for history; not comparable)", True),
        ("**Code version not\nrecorded** (kept for history)", True),
        ("written in commit `b43fe73` (2026-11-23)", False),
        ("code version `unknown`", False),
        ("code `abc`", False),
    ],
)
def test_what_counts_as_a_code_version(caption, named):
    table = Table("x.md", 1, caption, ["method", "test"], ["| a | 0.935 |"])
    assert names_version(table) is named


def _shift_results(shifted: float, commit: str = "abc1234") -> dict:
    """A shift-study results.json: nodes 0-2 (the shifted ones) at ``shifted``, the others
    at 0.95, and the IMU embedding shift of the shifted nodes."""
    probe = {str(n): {"cka": 0.6, "mmd": 0.015} for n in (0, 1, 2)}
    after = {str(n): {"cka": 0.8, "mmd": 0.04} for n in (0, 1, 2)}
    return {
        "test": {"accuracy": 0.93, "accuracy_by_node": {str(n): shifted if n < 3 else 0.95
                                                        for n in range(8)}},
        "code_version": {"commit": commit, "dirty": False},
        "diagnostics": {"embedding_shift": {"before": {"imu": {"to_reference": probe}},
                                            "after": {"imu": {"to_reference": after}}}},
    }  # fmt: skip


def test_the_shift_study_page_names_its_version_in_both_captions(tmp_path):
    # docs/shift.md is rewritten by its study from its MLflow runs; a regenerated page must
    # pass the rules above
    from simulations.shift_study import METHODS, MLFLOW_EXPERIMENT, point_overrides, write_report
    from simulations.study_runner import logged_runs
    from tests.study_store import Store

    store = Store(tmp_path)
    outs = []
    for severity, method, seed, shifted in [(0.0, "federated", 0, 0.9), (0.0, "federated", 1, 0.8),
                                            (0.0, "personal", 0, 0.9), (1.0, "federated", 0, 0.5),
                                            (1.0, "local", 0, 0.7)]:  # fmt: skip
        overrides = ["experiment=shift_study", *METHODS[method], f"seed={seed}",
                     *point_overrides(severity, None)]  # fmt: skip
        outs.append(store.log(MLFLOW_EXPERIMENT, overrides, _shift_results(shifted)))
    doc = tmp_path / "shift.md"
    write_report(logged_runs(MLFLOW_EXPERIMENT, outs, store.uri), doc, tmp_path, seeds=2)
    text = doc.read_text(encoding="utf-8")
    found = [t for t in tables(text, "shift.md") if is_results(t)]
    assert len(found) == 2
    assert all(names_version(t) for t in found), [t.caption for t in found]
    accuracy, embedding = found
    assert accuracy.body == [
        "| 0 | federated | 2 | 0.850 ± 0.050 [0.215, 1.485] | 0.950 ± 0.000 [0.950, 0.950] "
        "| 0.930 ± 0.000 [0.930, 0.930] |",
        "| 0 | personal | 1 | 0.900 | 0.950 | 0.930 |",
        "| 1 | federated | 1 | 0.500 | 0.950 | 0.930 |",
        "| 1 | local | 1 | 0.700 | 0.950 | 0.930 |",
    ]
    assert [c.split(" |")[0] for c in embedding.body] == ["| 0", "| 0", "| 1"]  # no local row
    assert "At severity 1, personalised" not in text  # no personal run at severity 1


def _fedlora_study(version: str | None) -> dict:
    """The smallest study record simulations.fedlora_study.write_report reads."""
    rnd = {"round": 1, "loss": 1.0, "agg_error": 0.001, "fedit_error": 0.002, "update_norm": 1.0}
    method = {
        "rounds": [rnd], "accuracy": 0.75, "eval": {"answered": 1.0}, "ranks": [8, 8],
        "comm": {"bytes_down_per_site_round": 1000, "bytes_up_per_site_round": 1000},
        "train_s": 1.0, "eval_s": 1.0,
    }  # fmt: skip
    central = {"steps": 6, "accuracy": 0.5, "eval": {"answered": 1.0}, "loss": 1.0}
    central |= {"train_s": 1.0, "eval_s": 1.0}
    task = {"model": "tiny", "lora_r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    task |= {"conditioning": "prefix", "tune": {"batch_size": 4, "lr": 0.003}}
    return {
        "task": task, "command": "python -m simulations.fedlora_study", "data": "toy",
        "num_sites": 2, "rounds": 1, "local_steps": 3, "train_examples": 32,
        "eval_examples": 8, "json": "x.json", "methods": {"fedit": method},
        "reference": {"name": "nearest class mean", "accuracy": 1.0},
        "centralized": {"same_examples": central, "same_steps": central},
    } | ({"code_version": version} if version else {})  # fmt: skip


@pytest.mark.parametrize("version", ["abc1234", None])
def test_the_fedlora_study_page_names_its_version_in_both_captions(tmp_path, version):
    # docs/fedlora.md is written by its study; a regenerated page must pass the rules above,
    # with the study's version, or an explicit "not recorded" for a record without one
    from simulations.fedlora_study import write_report

    doc = tmp_path / "fedlora.md"
    write_report(_fedlora_study(version), doc)
    found = [t for t in tables(doc.read_text(encoding="utf-8"), "fedlora.md") if is_results(t)]
    assert len(found) == 2
    assert all(names_version(t) for t in found), [t.caption for t in found]
    if version:
        assert all(f"code version `{version}`" in t.caption for t in found)
