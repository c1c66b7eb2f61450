"""Transfer to a held-out task: ``python -m simulations.transfer_study --bundle DIR``.

Issue 13 build 4 asks what makes zero/few-shot answers to a task the LM was never tuned
on work at this scale.  The LM stage is tuned on every task but ``--task`` (location on
the demo data) under four wordings of the questions, each a ``llm.fewshot`` knob:

* ``baseline``: the questions as the stage asks them;
* ``+options``: every question ends with its task's classes ("Answer with one of: ...");
* ``+options+descriptions``: that list describes each class in words;
* ``+options+descriptions+diversity``: training questions from a larger phrasing pool;

and each tuned model answers the held-out task's validation and test questions
(held-out templates) with no example and with k answered in-context examples, each
with its own sensor tokens, by generation and by option log-likelihood.  Prefix
conditioning for every variant; the gated adapter for the best one, zero-shot and with the
same in-context examples (routed per token: each example's turns see only its own
readings).

The best (variant, k, scoring) is chosen on the held-out task's *validation* questions
(mean over the seeds run); test figures are only reported.  One ``fed-iotlm tune`` per
(variant, conditioning, seed), each in its own process, cached under ``--out`` by code
version and overrides (:func:`simulations.study_runner.point_key`), so an interrupted
study resumes.  Writes ``--report`` (Markdown, naming its code version) and a JSON of
the same figures beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.protocol import one_code_version
from simulations.study_progress import current, follow_child, study_progress
from simulations.study_runner import REPO, fmt_mean_std, point_key

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "+options": ["llm.fewshot.options=true"],
    "+options+descriptions": ["llm.fewshot.options=true", "llm.fewshot.descriptions=true"],
    "+options+descriptions+diversity": [
        "llm.fewshot.options=true",
        "llm.fewshot.descriptions=true",
        "llm.fewshot.diversity=true",
    ],
}
SCORINGS = ("generation", "loglik")


def overrides(bundle: str, task: str, k: int, steps: int, variant: str, kind: str, seed: int) -> list[str]:  # fmt: skip
    """The ``fed-iotlm tune`` overrides of one run (controls: majority and head only; the
    held-out task's figures are what this study reads)."""
    return [
        f"llm.bundle={bundle}", f"seed={seed}", "mlflow.enabled=false",
        f"llm.conditioning=[{kind}]", "llm.controls=[majority,head]",
        f"llm.fewshot.task={task}", f"llm.fewshot.k={k}", f"llm.steps={steps}",
        *VARIANTS[variant],
    ]  # fmt: skip


def run_tune(out_root: Path, name: str, args: list[str]) -> dict:
    """results.json of ``fed-iotlm tune args`` (run unless cached under this code version)."""
    out = out_root / f"{name}-{point_key(args, experiment=None)}"  # tune: no experiment=
    results = out / "results.json"
    with current() as view:
        if results.is_file():
            view.end(cached=True)
            return json.loads(results.read_text())
        out.mkdir(parents=True, exist_ok=True)
        log = out / "run.log"
        print(f"  running {out.name}: tail -f {log}", flush=True)
        view.begin(name)
        cmd = [sys.executable, "-m", "fed_iotlm.cli", "tune", *args, f"output_dir={out}"]
        code = follow_child(cmd, log, view.mark, cwd=REPO)
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (log: {log}):\n{log.read_text()[-3000:]}")
        view.end()
    return json.loads(results.read_text())


def held_out(result: dict, kind: str) -> dict:
    """The held-out task's report of conditioning ``kind`` in one run's results.json."""
    return result["llm"]["conditioning"][kind]["fewshot"]


def figure(fs: dict, part: str, shots: str, scoring: str, key: str = "accuracy") -> float | None:
    """One figure of a held-out report; None where it was not measured (refused shots)."""
    res = (fs[part][shots] or {}).get(scoring)
    return None if res is None else res.get(key)


def choose(cells: dict[tuple[str, str, str], list[float]]) -> tuple[str, str, str]:
    """(variant, shots, scoring) with the best mean *validation* accuracy of the held-out
    task; ties go to the first listed.  Given validation figures only."""
    if not cells:
        raise ValueError("nothing to choose from")
    keys = list(cells)
    best = max(range(len(keys)), key=lambda i: (float(np.mean(cells[keys[i]])), -i))
    return keys[best]


def val_cells(runs: dict[tuple[str, str], list[dict]], kind: str = "prefix") -> dict:
    """{(variant, shots, scoring): [validation accuracy per seed]} of ``kind``'s runs."""
    cells: dict = {}
    for (variant, k), results in runs.items():
        if k != kind:
            continue
        for shots in ("zero_shot", "few_shot"):
            for s in SCORINGS:
                vals = [figure(held_out(r, kind), "val", shots, s) for r in results]
                if vals and all(v is not None for v in vals):
                    cells[(variant, shots, s)] = vals
    return cells


def _cell(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    return f"{vals[0]:.3f}" if len(vals) == 1 else fmt_mean_std(vals)


def table(runs: dict[tuple[str, str], list[dict]], task: str, k: int) -> list[dict]:
    """One row per (variant, conditioning, shots): the held-out task's figures."""
    rows = []
    for (variant, kind), results in runs.items():
        for shots in ("zero_shot", "few_shot"):
            fss = [held_out(r, kind) for r in results]
            refused = fss[0]["shots_refused"] if shots == "few_shot" else None
            rows.append({
                "variant": variant, "conditioning": kind,
                "shots": 0 if shots == "zero_shot" else k,
                "seeds": [r["seed"] for r in results],
                "refused": refused,
                **{f"{part}_{s}": [figure(f, part, shots, s) for f in fss]
                   for part in ("val", "test") for s in SCORINGS},
                "answered": [figure(f, "test", shots, "generation", "answered") for f in fss],
                # the tuned task(s), this run's chosen scoring: is the LM still fine there?
                "tuned_test": [r["test"]["accuracy"] for r in results],
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], chosen, task: str, version: str, baselines: dict, command: str) -> str:  # fmt: skip
    lines = [
        f"# Transfer to a held-out task ({task}), code `{version}`",
        "",
        "Written by `python -m simulations.transfer_study`; figures are the held-out task's",
        "accuracy (tuned on the other task(s) only), held-out templates. "
        f"Chosen on the held-out task's validation questions: **{chosen[0]}, "
        f"{'k-shot' if chosen[1] == 'few_shot' else 'zero-shot'}, {chosen[2]}**.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Held-out task {task}, test, code `{version}`:",
        "",
        "| variant | conditioning | in-context examples | val (generation) | val (log-lik.) "
        "| test (generation) | answered | test (log-lik.) | tuned task, test | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["refused"]:
            lines.append(
                f"| {r['variant']} | {r['conditioning']} | {r['shots']} | refused: "
                "the conditioning cannot keep each example's readings with it | | | | | | |"
            )
            continue
        cells = [_cell(r[c]) for c in ("val_generation", "val_loglik", "test_generation",
                                       "answered", "test_loglik", "tuned_test")]  # fmt: skip
        seeds = ", ".join(str(s) for s in r["seeds"])
        lines.append(
            f"| {r['variant']} | {r['conditioning']} | {r['shots']} | {' | '.join(cells)} | {seeds} |"
        )
    lines.append(
        f"| majority class ({task}, fit rows) | – | – | | | {_cell(baselines['majority'])} | "
        f"| {_cell(baselines['majority'])} | | |"
    )
    lines.append(
        f"| chance | – | – | | | {baselines['chance']:.3f} | | {baselines['chance']:.3f} | | |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="the model bundle of a federated run")
    p.add_argument("--task", default="location", help="the task held out from tuning")
    p.add_argument("--k", type=int, default=4, help="in-context examples")
    p.add_argument("--steps", type=int, default=80, help="llm.steps of every tune")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every variant")
    p.add_argument("--more-seeds", type=int, nargs="*", default=[],
                   help="seeds for the baseline and the chosen variant only")  # fmt: skip
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-adapter", action="store_true", help="skip the adapter run")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "transfer_study")
    p.add_argument("--report", type=Path, default=REPO / "docs" / "transfer.md")
    p.add_argument("extra", nargs="*",
                   help="overrides for every tune, e.g. llm.model=tiny-random-llama llm.steps=2 "
                        "for a smoke run")  # fmt: skip
    a = p.parse_args(argv)
    run = lambda v, kind, s: run_tune(  # noqa: E731
        a.out,
        f"{v.strip('+') or 'baseline'}-{kind}-seed{s}".replace("+", "_"),
        [*overrides(a.bundle, a.task, a.k, a.steps, v, kind, s), *a.extra],
    )
    runs: dict[tuple[str, str], list[dict]] = {}
    total = len(a.variants) * len(a.seeds) + (0 if a.no_adapter else len(a.seeds))
    with study_progress(total):
        for s in a.seeds:
            for v in a.variants:
                runs.setdefault((v, "prefix"), []).append(run(v, "prefix", s))
        chosen = choose(val_cells(runs))
        print(f"chosen on validation ({a.task}): {chosen}", flush=True)
        for s in a.more_seeds:
            for v in dict.fromkeys(["baseline", chosen[0]]):
                runs[(v, "prefix")].append(run(v, "prefix", s))
        if not a.no_adapter:
            for s in a.seeds:
                runs.setdefault((chosen[0], "adapter"), []).append(run(chosen[0], "adapter", s))
    every = [r for rs in runs.values() for r in rs]
    version = one_code_version(every)
    base = runs.get(("baseline", "prefix")) or next(iter(runs.values()))
    kind0 = "prefix" if ("baseline", "prefix") in runs else next(iter(runs))[1]
    baselines = {  # the held-out task's majority class among each seed's fit rows
        "majority": [held_out(r, kind0)["majority"]["accuracy"] for r in base],
        "chance": held_out(base[0], kind0)["chance"],
    }
    rows = table(runs, a.task, a.k)
    command = "python -m simulations.transfer_study " + " ".join(argv or sys.argv[1:])
    doc = markdown(rows, chosen, a.task, version, baselines, command)
    a.report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.report, doc)
    payload = {"task": a.task, "k": a.k, "code_version": version, "chosen_on": "val",
               "chosen": list(chosen), "rows": rows, "baselines": baselines}  # fmt: skip
    atomic_write_text(a.report.with_suffix(".json"), json.dumps(payload, indent=2))
    print(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
