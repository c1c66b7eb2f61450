"""One builder per section of the report.

Each takes the :class:`Study` and the output directory and returns a :class:`Section`,
or a one-line string saying why the section is left out (no run logged that data), so
an experiment of three quick runs and a 200-run study go through the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import plots
from .groups import Study
from .page import Figure, Section, Table, fmt, mean_or_none, mean_std
from .params import as_number, distinguishing, group_label, partition_of, short_keys
from .protocol_table import protocol_tables
from .runs import Run

Builder = Callable[[Study, Path], "Section | str"]
MAX_SWEEPS = 6


def summary(study: Study) -> list[str]:
    """The bullets at the top: what is in the experiment and what did best."""
    methods: dict[str, int] = {}
    for r in study.runs:
        methods[study.method(r)] = methods.get(study.method(r), 0) + 1
    lines = [
        f"**{len(study.runs)} runs** in {len(study.groups)} groups (runs that differ only in "
        f"seed), MLflow experiment `{study.experiment}` at `{study.tracking_uri}`.",
        "Methods: " + ", ".join(f"`{m}` ({n})" for m, n in sorted(methods.items())) + ".",
    ]
    if study.skipped:
        shown = ", ".join(study.skipped[:5]) + (" …" if len(study.skipped) > 5 else "")
        lines.append(f"Left out, not FINISHED: {len(study.skipped)} ({shown}).")
    varying = [k for k in study.varying if k != "method"]
    lines.append(
        "Params that differ between runs: " + ", ".join(f"`{k}`" for k in varying) + "."
        if varying
        else "No param besides the method differs between runs."
    )
    scored = [r for r in study.runs if r.accuracy is not None]
    if scored:
        best = max(scored, key=lambda r: r.accuracy)
        lines.append(
            f"Best run: `{best.name}` — test accuracy **{fmt(best.accuracy)}** "
            f"({study.group_of(best)})."
        )
    multi = {g: rs for g, rs in study.groups.items() if len(rs) > 1}
    if multi:
        g, rs = next(iter(multi.items()))
        lines.append(
            f"Best group over seeds: {g} — {mean_std([r.accuracy for r in rs])} (n={len(rs)})."
        )
    return lines


def rounds(study: Study, out: Path) -> Section | str:
    by_method: dict[str, list[Run]] = {}
    for r in study.runs:
        if r.accuracy_by_round:
            by_method.setdefault(study.method(r), []).append(r)
    if not by_method:
        return "Accuracy per round: no run logged a per-round `accuracy` metric."
    facets: dict[str, dict[str, list]] = {}
    for method, runs in sorted(by_method.items()):
        keys = distinguishing([k for k in study.keys if k != "method"], [r.params for r in runs])
        lines: dict[str, list] = {}
        for r in runs:
            lines.setdefault(group_label(r.params, keys, study.namer), []).append(
                r.accuracy_by_round
            )
        facets[f"method: {method}"] = dict(sorted(lines.items()))
    plots.rounds_plot(facets, out / "accuracy_per_round.png")
    return Section(
        "Accuracy per round",
        text=[
            "Global test accuracy after each round (mean over tasks, all modalities present). "
            "Thin lines: single runs; thick: the mean over seeds of runs with the same "
            "settings (a panel's legend names only the settings that differ in it)."
        ],  # fmt: skip
        figures=[Figure("accuracy_per_round.png", "accuracy per round, one panel per method")],
    )


def _task_names(runs: list[Run]) -> list[str]:
    names: dict[str, None] = {}
    for r in runs:
        for t in (r.results or {}).get("test", {}).get("by_task") or {}:
            names[t] = None
    return list(names)


def _task_acc(run: Run, task: str) -> float | None:
    by_task = (run.results or {}).get("test", {}).get("by_task") or {}
    return by_task.get(task, {}).get("accuracy")


# class-balanced test scores (results.json ``test.<key>``), shown when some run has them
BALANCED: dict[str, str] = {"f1_macro": "macro-F1", "balanced_accuracy": "balanced acc."}


def _test_score(run: Run, key: str) -> float | None:
    value = (run.results or {}).get("test", {}).get(key)
    return run.metrics.get(f"test_{key}") if value is None else value


def final_accuracy(study: Study, out: Path) -> Section | str:
    tasks = _task_names(study.runs)
    bal = [k for k in BALANCED if any(_test_score(r, k) is not None for r in study.runs)]
    groups = Table(
        ["group", "runs", "accuracy (mean ± std)", "best", *[f"{BALANCED[k]} (mean ± std)" for k in bal], *tasks, "wall s"],
        [],
        caption="Groups, best mean first. Accuracy: test set, all modalities, mean over tasks"
        + ("; macro-F1 and balanced accuracy likewise, mean over tasks." if bal else "."),
        numeric=[False, True, True, True, *[True] * len(bal), *[True] * len(tasks), True],
    )  # fmt: skip
    for g, rs in study.groups.items():
        accs = [r.accuracy for r in rs]
        walls = [(r.results or {}).get("wall_s") for r in rs]
        groups.rows.append([
            g, str(len(rs)), mean_std(accs), fmt(max((a for a in accs if a is not None), default=None)),
            *[mean_std([_test_score(r, k) for r in rs]) for k in bal],
            *[fmt(mean_or_none([_task_acc(r, t) for r in rs])) for t in tasks],
            fmt(mean_or_none(walls), 0),
        ])  # fmt: skip
    shown = list(study.varying)
    short = short_keys(shown)
    extra = [] if "rounds" in shown else ["rounds"]
    per_run = Table(
        ["run", *[short[k] for k in shown], "accuracy", *[BALANCED[k] for k in bal], *tasks, *extra],
        [],
        caption="Every run, grouped as above, best first within a group.",
        numeric=[False, *[False] * len(shown), True, *[True] * len(bal), *[True] * len(tasks), *[True] * len(extra)],
    )  # fmt: skip
    for rs in study.groups.values():
        for r in sorted(rs, key=lambda r: -(r.accuracy or -1)):
            per_run.rows.append([
                r.name, *[study.namer.show(k, r.params.get(k)) for k in shown], fmt(r.accuracy),
                *[fmt(_test_score(r, k)) for k in bal],
                *[fmt(_task_acc(r, t)) for t in tasks], *[r.params.get("rounds", "–") for _ in extra],
            ])  # fmt: skip
    return Section(
        "Final accuracy",
        tables=[groups, per_run],
        collapse_tables=len(per_run.rows) > 30,
    )


def _matrix_section(
    study: Study,
    out: Path,
    values: Callable[[Run], dict[str, float]],
    *,
    title: str,
    text: str,
    what: str,
    png: str,
    col_name: str,
    order: Callable[[str], Any] = str,
    label: Callable[[str], str] = str,
) -> Section | str:
    """A groups × columns table of means over seeds and its heatmap (``label`` names a
    column for the reader, e.g. marks a site shifted in some run)."""
    per_group = {g: [values(r) for r in rs] for g, rs in study.groups.items()}
    cols = sorted({c for vs in per_group.values() for v in vs for c in v}, key=order)
    if not cols:
        return f"{title}: {what}"
    per_group = {g: vs for g, vs in per_group.items() if any(vs_ for vs_ in vs)}
    table = Table(["group", *map(label, cols)], [], caption="Mean ± std over seeds.",
                  numeric=[False, *[True] * len(cols)])  # fmt: skip
    matrix = np.full((len(per_group), len(cols)), np.nan)
    for i, (g, vs) in enumerate(per_group.items()):
        cells = []
        for j, c in enumerate(cols):
            xs = [v[c] for v in vs if c in v]
            cells.append(mean_std(xs))
            if xs:
                matrix[i, j] = float(np.mean(xs))
        table.rows.append([g, *cells])
    plots.heatmap(
        list(per_group), [label(c) for c in cols], matrix, out / png, title=title, xlabel=col_name
    )
    return Section(title, text=[text], tables=[table], figures=[Figure(png, title)])


def modalities(study: Study, out: Path) -> Section | str:
    return _matrix_section(
        study, out,
        lambda r: {k.split(".", 1)[1]: v for k, v in r.metrics.items() if k.startswith("test_accuracy.")},
        title="Accuracy per modality",
        text="Test accuracy with only one modality present at test (`test_accuracy.<modality>`).",
        what="no run logged `test_accuracy.<modality>` metrics.",
        png="accuracy_by_modality.png", col_name="modality present at test",
    )  # fmt: skip


def _node_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.lstrip("-").isdigit() else (1 << 30, name)


def nodes(study: Study, out: Path) -> Section | str:
    return _matrix_section(
        study, out,
        lambda r: {k.split(".", 1)[1]: v for k, v in r.metrics.items() if k.startswith("node_accuracy.")},
        title="Accuracy per node",
        text="Each node on its own test split with its own modalities (`test.accuracy_by_node`: "
             "the global model, a `local` node's own model, or the node with its personal adapters).",
        what="no run logged `node_accuracy.<node>` metrics.",
        png="accuracy_by_node.png", col_name="node (partition id)", order=_node_order,
    )  # fmt: skip


def _diagnostics(run: Run) -> dict:
    return (run.results or {}).get("diagnostics") or {}


def _site_acc(run: Run) -> dict[str, float]:
    return {
        s: v["accuracy"]
        for s, v in (_diagnostics(run).get("accuracy_by_site") or {}).items()
        if isinstance(v, dict) and "accuracy" in v
    }


def sites(study: Study, out: Path) -> Section | str:
    """One column per site; ``*`` marks a site some run shifted (the shift's severity,
    a row's knob, says how much)."""
    shifted = {str(s) for r in study.runs for s in _diagnostics(r).get("shifted_sites") or []}
    return _matrix_section(
        study, out, _site_acc,
        title="Accuracy per site",
        text="The global model on each site's test data, all modalities "
             "(results.json `diagnostics.accuracy_by_site`; * = a site shifted in some run).",
        what="no run has `diagnostics.accuracy_by_site` (run with `diagnostics.enabled=true`).",
        png="accuracy_by_site.png", col_name="site", order=_node_order,
        label=lambda s: f"{s}*" if s in shifted else s,
    )  # fmt: skip


def _sweep_params(study: Study) -> list[str]:
    """Numeric params that change alone: one that always moves together with another
    (``data.num_sites`` with ``data.num_train`` between a quick and a full run) is a
    confounded comparison, not a sweep.  Names with severity/shift come first."""
    params = [r.params for r in study.runs]
    others = [k for k in study.varying if k != "seed"]
    parts = {k: partition_of(params, k) for k in others}
    numeric = [
        k
        for k in others
        if all(as_number(p.get(k)) is not None for p in params if k in p)
        and not any(parts[k] == parts[o] for o in others if o != k)
    ]
    return sorted(numeric, key=lambda k: ("severity" not in k and "shift" not in k, k))


def sweeps(study: Study, out: Path) -> Section | str:
    panels: dict[str, dict[str, tuple[list[float], list[float], list[float]]]] = {}
    tables = []
    for param in _sweep_params(study):
        others = [k for k in study.keys if k != param]
        by_line: dict[str, list[Run]] = {}
        for r in study.runs:
            if as_number(r.params.get(param)) is not None and r.accuracy is not None:
                by_line.setdefault(group_label(r.params, others, study.namer), []).append(r)
        kept = [rs for rs in by_line.values() if len({r.params[param] for r in rs}) > 1]
        if not kept:
            continue
        keys = distinguishing(others, [r.params for rs in kept for r in rs])
        lines: dict[str, dict[float, list[float]]] = {}
        for rs in kept:
            line = lines.setdefault(group_label(rs[0].params, keys, study.namer), {})
            for r in rs:
                line.setdefault(as_number(r.params[param]), []).append(r.accuracy)
        lines = dict(sorted(lines.items()))
        panels[param] = {
            k: (sorted(v), [float(np.mean(v[x])) for x in sorted(v)],
                [float(np.std(v[x])) for x in sorted(v)])
            for k, v in lines.items()
        }  # fmt: skip
        xs = sorted({x for v in lines.values() for x in v})
        tables.append(Table(
            [f"{param} →", *[f"{x:g}" for x in xs]],
            [[k, *[mean_std(v.get(x, [])) for x in xs]] for k, v in lines.items()],
            caption=f"Accuracy against `{param}`, mean ± std over seeds (other knobs as labelled).",
            numeric=[False, *[True] * len(xs)],
        ))  # fmt: skip
        if len(panels) == MAX_SWEEPS:
            break
    if not panels:
        return "Shift curves: no numeric param takes two or more values with the others held fixed."
    plots.sweep_plot(panels, out / "sweeps.png")
    return Section(
        "Shift curves and other sweeps",
        text=[
            "Test accuracy against each numeric param the experiment sweeps; one line per "
            "setting of the other knobs, mean ± std over seeds."
        ],  # fmt: skip
        tables=tables,
        figures=[Figure("sweeps.png", "accuracy against swept params")],
    )


def communication(study: Study, out: Path) -> Section | str:
    rows, labels, up, down = [], [], [], []
    for g, rs in study.groups.items():
        comms = [(r.results or {}).get("comm") for r in rs]
        comms = [c for c in comms if c]
        if not comms:
            continue

        def kb(key: str, cs: list[dict] = comms) -> float | None:
            return mean_or_none([c[key] / 1e3 for c in cs if c.get(key) is not None])

        n_rounds = mean_or_none([as_number(r.params.get("rounds")) for r in rs])
        u, d = kb("bytes_up_per_node_round"), kb("bytes_down_per_node_round")
        total = (u + d) * n_rounds / 1e3 if None not in (u, d, n_rounds) else None
        rows.append([g, fmt(u, 1), fmt(d, 1), fmt(kb("model_bytes"), 1), fmt(total, 2)])
        labels.append(g)
        up.append(u or 0.0)
        down.append(d or 0.0)
    if not rows:
        return "Communication: no run's results.json has a `comm` block."
    rows_sorted = sorted(zip(rows, labels, up, down, strict=True), key=lambda t: -(t[2] + t[3]))
    table = Table(
        ["group", "up kB / node / round", "down kB / node / round", "model kB", "MB / node / run"],
        [t[0] for t in rows_sorted],
        caption="Means over seeds; most traffic first. Groups that send nothing (`local`, "
        "`centralized`) are not in the plot.",
        numeric=[False, True, True, True, True],
    )
    figures = []
    sending = [t for t in rows_sorted if t[2] or t[3]]
    if sending:
        plots.comm_plot([t[1] for t in sending], [t[2] for t in sending],
                        [t[3] for t in sending], out / "communication.png")  # fmt: skip
        figures.append(Figure("communication.png", "kB per node per round, up and down"))
    return Section("Communication", tables=[table], figures=figures)


def _robust_row(r: Run) -> dict[str, Any]:
    res = r.results or {}
    rob = res.get("robustness") or {}
    hist = res.get("history") or []
    p = r.params
    return {
        "aggregation": (rob.get("aggregation") or {}).get("rule") or p.get("strategy.aggregation"),
        "max_update_norm": (rob.get("checks") or {}).get("max_update_norm"),
        "attack": p.get("attack.kind"),
        "attack_fraction": as_number(p.get("attack.fraction")),
        "rejected": sum(h.get("rejected_updates", 0) for h in hist) if hist else None,
        "noise": as_number(p.get("binding.noise_sigma")) if p.get("method") == "mmbind" else None,
        "int8": p.get("binding.quantize") if p.get("method") == "mmbind" else None,
    }


def _interesting(row: dict[str, Any]) -> bool:
    return bool(
        row["aggregation"] not in (None, "mean", "None")
        or row["max_update_norm"] not in (None, "None")
        or row["attack"] not in (None, "none", "None")
        or row["rejected"]
        or row["noise"]
        or row["int8"] == "True"
    )


def privacy_robustness(study: Study, out: Path) -> Section | str:
    per_group = {g: [_robust_row(r) for r in rs] for g, rs in study.groups.items()}
    if not any(_interesting(row) for rows in per_group.values() for row in rows):
        return ("Privacy and robustness: no run used an attack, a robust aggregation rule, "
                "update checks, embedding noise or int8 embeddings, and none rejected an update.")  # fmt: skip
    table = Table(
        ["group", "aggregation", "max update norm", "attack", "attackers", "rejected updates",
         "embedding noise σ", "int8"],
        [],
        caption="Rejected updates: total over rounds, mean over seeds. Noise and int8 apply to "
                "MMBind's uploaded embeddings.",
        numeric=[False, False, True, False, True, True, True, False],
    )  # fmt: skip
    for g, rows in per_group.items():
        first = rows[0]
        table.rows.append([
            g, str(first["aggregation"] or "–"), str(first["max_update_norm"] or "–"),
            str(first["attack"] or "–"), fmt(first["attack_fraction"], 2),
            fmt(mean_or_none([r["rejected"] for r in rows]), 1),
            fmt(first["noise"], 2), str(first["int8"] or "–"),
        ])  # fmt: skip
    return Section("Privacy and robustness", tables=[table])


BUILDERS: tuple[Builder, ...] = (
    rounds,
    final_accuracy,
    protocol_tables,
    sweeps,
    modalities,
    nodes,
    sites,
    communication,
    privacy_robustness,
)
