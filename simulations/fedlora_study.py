"""Federated LoRA study: ``python -m simulations.fedlora_study [--bundle DIR] [--model NAME]``.

A small federation tunes the
central stage's LoRA + sensor projector with each aggregation method — FedIT, FFA-LoRA,
FedEx-LoRA and FlexLoRA with heterogeneous ranks — in one Flower simulation (one Ray
start; the methods run one after another on the same virtual SuperNodes), next to
centralized LoRA trained on the union of the sites' data, twice: for the same total number
of steps (sites × rounds × local steps, i.e. the same number of examples seen) and for the
same number of *sequential* steps (rounds × local steps, what the global model gets).

Without ``--bundle`` the data is the toy feature set (classes carried only by random
sensor features, dealt IID over ``--sites``, default 3), so the study runs anywhere; with
it, the tokens the configured federation's nodes upload through that bundle, one site per
node with the node's own rows and labels (``--sites auto``; ``--site-split iid`` for the
IID baseline over the same instructions).  Writes ``docs/fedlora.md`` (table) and
``docs/fedlora.json``; the Flower run's own results.json lies under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.llm.evaluation import generation_accuracy
from fed_iotlm.llm.federated import FederatedSettings
from fed_iotlm.llm.lora_task import ALL_LINEAR, LoraTask, build_model, load_task_data, task_sites
from fed_iotlm.llm.tuning import tune
from fed_iotlm.logs import configure as configure_logging
from fed_iotlm.protocol import code_version, version_label
from simulations.ray_cluster import RAY_START_HINT, backend_config, ray_settings

REPO = Path(__file__).resolve().parents[1]


def run_lora_simulation(
    task: LoraTask,
    plans: Sequence[FederatedSettings],
    num_sites: int | str,
    out_dir: Path,
    observe=None,
    gpus_per_site: float = 0.0,
    client_mods: Sequence = (),
    on_record=None,
    resume: bool = False,
    mlflow=None,
) -> dict:
    """All ``plans`` under Flower's simulation engine, one virtual SuperNode per site
    (``client_mods``: Flower client mods around every site's handlers; ``observe``,
    ``on_record``, ``resume`` and ``mlflow`` (the ``mlflow`` config block; None: no MLflow
    run): :func:`server.lora_app.make_lora_server_app`'s).
    ``num_sites``: a number or ``auto`` (node sites: one SuperNode per node of the plan)."""
    from clients.lora_app import make_lora_client_app
    from server.lora_app import make_lora_server_app
    from simulations.runtime_watch import run_watched

    out_dir = Path(out_dir)
    results = out_dir / "results.json"
    results.unlink(missing_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    num_sites = task_sites(task, num_sites).num_sites  # a plan contradicting it fails here
    run_watched(  # a backend that fails to start stops the ServerApp at once too
        make_lora_server_app(task, plans, num_sites, out_dir, observe, on_record, resume, mlflow),
        f"Each site holds 1 CPU and gpus_per_site={gpus_per_site:g} GPU of a private Ray "
        f"instance (a GPU share needs a GPU). {RAY_START_HINT}",
        client_app=make_lora_client_app(task, mods=client_mods),
        num_supernodes=num_sites,
        backend_config=lora_backend_config(gpus_per_site),
    )
    if not results.is_file():
        raise RuntimeError(f"the federation ended without writing {results}; see the log above")
    return json.loads(results.read_text())


def lora_backend_config(gpus_per_site: float) -> dict:
    """Flower's ``backend_config`` for the LoRA federation: one CPU (and ``gpus_per_site``)
    per site on a private local Ray, built by the federation's own
    :func:`simulations.ray_cluster.backend_config` so both start Ray the same way
    (``address="local"``: never silently joining a cluster ``RAY_ADDRESS`` or the last
    ``ray start`` on this machine names)."""
    return backend_config(ray_settings({"cpus_per_node": 1.0, "gpus_per_node": gpus_per_site}))


def centralized(task: LoraTask, steps: int) -> dict:
    """One model on the union of the sites' data: the upper reference for every method."""
    data = load_task_data(task)
    model, builder = build_model(task, data, task.lora_r)
    settings = replace(
        task.tune, steps=steps, log_every=max(1, steps // 10), checkpoint_every=10**9
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        hist = tune(model, builder, data.train, data.feats, settings, Path(tmp) / "ckpt")
    t1 = time.time()
    gen = {"batch_size": task.eval_batch, "max_new_tokens": task.max_new_tokens}
    report = generation_accuracy(model, builder, data.feats, data.evals, data.meta, **gen)
    return {
        "method": "centralized",
        "accuracy": report["accuracy"],
        "eval": report,
        "loss": hist[-1]["loss"],
        "steps": steps,
        "train_s": round(t1 - t0, 1),
        "eval_s": round(time.time() - t1, 1),
    }


def _rel(err: float | None, norm: float) -> str:
    return "–" if err is None else f"{err / norm:.3f}" if norm > 0 else f"{err:.2e}"


def _split_words(doc: dict) -> str:
    """How the instructions were split over the sites, with the per-site counts."""
    sites = doc.get("sites") or {"split": "iid", "per_site": []}
    counts = ", ".join(str(s["examples"]) for s in sites["per_site"])
    counts = f" (examples per site: {counts})" if counts else ""
    if sites["split"] == "nodes":
        return f"one per federation node, each on its own rows{counts}, of"
    return f"IID split{counts} of"


def write_report(doc: dict, path: Path) -> None:
    """The Markdown table: accuracy by generation and how inexact each aggregation was."""
    t = doc["task"]
    # every results table names its code version (issue 11; tests/test_doc_tables.py)
    recorded = doc.get("code_version")
    version = f"code version `{recorded}`" if recorded else "code version not recorded"
    lines = [
        "# Federated LoRA: FedIT, FFA-LoRA, FedEx-LoRA, FlexLoRA vs centralized LoRA",
        "",
        f"Generated by `{doc['command']}` ({time.strftime('%Y-%m-%d')}), {version}.",
        "",
        f"- LM `{t['model']}`, LoRA r={t['lora_r']} α={t['lora_alpha']} on "
        f"{', '.join(t['target_modules'])}, `{t['conditioning']}` sensor conditioning "
        f"(projector averaged with FedAvg)",
        f"- data: {doc['data']}; {doc['num_sites']} sites, {_split_words(doc)} "
        f"{doc['train_examples']} training instructions; {doc['eval_examples']} evaluation "
        "questions on held-out templates, answered by greedy generation",
        f"- federation: {doc['rounds']} rounds × {doc['local_steps']} local steps "
        f"(batch {t['tune']['batch_size']}, lr {t['tune']['lr']}); centralized LoRA on the "
        f"union for {doc['centralized']['same_examples']['steps']} steps (as many examples as "
        f"all sites together) and for {doc['centralized']['same_steps']['steps']} steps (as "
        "many sequential steps as the global model)",
        "- aggregation error: ‖applied update − Σ p_k s_k B_k A_k‖_F over all adapted layers, "
        "relative to the round's own update ‖Σ p_k (s B_k A_k − s B⁰_k A⁰_k)‖_F (how far the "
        "round moved ΔW from what the sites loaded), in the last round (FlexLoRA: the smallest rank's "
        "truncation); FedIT error: what plain factor averaging loses on the same replies",
        "",
        "| method | site ranks | accuracy | answered | final training loss | aggregation error "
        "| FedIT error, same replies | KB down / up per site-round | time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in doc["methods"].items():
        last = r["rounds"][-1]
        acc = f"{r['accuracy']:.3f}"
        if "by_rank" in r["eval"]:
            acc += " (" + ", ".join(f"r{k}: {v:.3f}" for k, v in r["eval"]["by_rank"].items()) + ")"
        lines.append(
            f"| {name} | {', '.join(map(str, r['ranks']))} | {acc} | {r['eval']['answered']:.2f} "
            f"| {last['loss']:.3f} | {_rel(last['agg_error'], last['update_norm'])} "
            f"| {_rel(last['fedit_error'], last['update_norm'])} "
            f"| {r['comm']['bytes_down_per_site_round'] / 1e3:.0f} / "
            f"{r['comm']['bytes_up_per_site_round'] / 1e3:.0f} | {r['train_s'] + r['eval_s']:.0f} |"
        )
    for c in doc["centralized"].values():
        lines.append(
            f"| centralized LoRA, {c['steps']} steps | {t['lora_r']} | {c['accuracy']:.3f} "
            f"| {c['eval']['answered']:.2f} | {c['loss']:.3f} | – | – | – "
            f"| {c['train_s'] + c['eval_s']:.0f} |"
        )
    ref = doc["reference"]
    lines.append(f"| *{ref['name']}* (no LM) | – | {ref['accuracy']:.3f} | – | – | – | – | – | – |")
    fed = [r["accuracy"] for r in doc["methods"].values()]
    p, n = sum(fed) / len(fed), doc["eval_examples"]
    lines += [
        "",
        "FlexLoRA's accuracy is the server's full-rank aggregate (folded into the base); in "
        "brackets, each rank's own truncation as its sites load it.  Training loss: mean over "
        "the last round's local steps on the sites (weighted by n_k), over the last tenth of "
        "the steps for centralized LoRA.",
        "",
        f"One seed and {n} questions: at accuracy {p:.2f} the binomial standard error is "
        f"±{math.sqrt(p * (1 - p) / n):.3f}, so differences between the federated methods "
        "of that order are noise, not a ranking.",
        "",
        f"Relative aggregation error per round, the same runs ({version}):",
        "",
        "| method | " + " | ".join(f"round {i + 1}" for i in range(doc["rounds"])) + " |",
        "|---|" + "---:|" * doc["rounds"],
    ]
    for name, r in doc["methods"].items():
        by_round = {x["round"]: x for x in r["rounds"]}  # a skipped round has no report
        cells = [
            _rel(by_round[i]["agg_error"], by_round[i]["update_norm"])
            if i in by_round
            else "skipped"
            for i in range(1, doc["rounds"] + 1)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    faults = {
        name: sorted(r.get("faults_by_round", {}), key=int) for name, r in doc["methods"].items()
    }
    lines += [
        "",
        "Rounds run on the round engine (`server/lora_step.py`): a site that fails or misses "
        "the deadline is left out of its round, a round with fewer than "
        "`llm.federated.min_sites` answers is skipped. Rounds with a failed or silent site: "
        + (
            "; ".join(f"{m}: {', '.join(rs)}" for m, rs in faults.items() if rs)
            or "none (every site answered every round)"
        )
        + ".",
    ]
    lines += ["", f"Raw numbers: `{doc['json']}`.", ""]
    atomic_write_text(path, "\n".join(lines))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", type=Path, help="model bundle of a federated run (default: toy features)"
    )
    parser.add_argument(
        "--override", action="append", default=[], help="config override when --bundle is given"
    )
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--methods", default="fedit,ffa,fedex,flexlora")
    parser.add_argument(
        "--sites", default="auto", help="auto: the plan's nodes (bundle), 3 (toy data)"
    )
    parser.add_argument(
        "--site-split", default="auto", choices=("auto", "nodes", "iid"),
        help="nodes: site k trains on node k's rows (default with --bundle); iid: a random deal",
    )  # fmt: skip
    # 9: with one warm-up + cosine schedule across every round (issue 13 build 6), 3 rounds
    # left every method, centralized LoRA at the same steps included, at chance (docs/fedlora.md)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--local-steps", type=int, default=40)
    parser.add_argument("--flex-ranks", default="4,8,16", help="FlexLoRA's per-site ranks")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (server, centralized)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fedlora_study")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "fedlora.md")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    configure_logging()  # the federation runs in this process: its round lines are logged
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)  # on busy cores, more threads spin far more than they help
    task = LoraTask(
        model=args.model, lora_r=args.rank, target_modules=ALL_LINEAR, seed=args.seed,
        site_split=args.site_split,
    )  # fmt: skip
    if args.bundle:
        from fed_iotlm.settings import compose

        cfg = compose(
            [
                f"llm.bundle={args.bundle.resolve()}",
                f"llm.model={args.model}",
                f"seed={args.seed}",
                *args.override,
            ]
        )
        task = replace(
            LoraTask.from_cfg(cfg), lora_r=args.rank, target_modules=ALL_LINEAR,
            site_split=args.site_split,
        )  # fmt: skip
    task = replace(task, tune=replace(task.tune, lr=args.lr, sensor_lr=args.lr, warmup=5))
    flex = tuple(int(r) for r in args.flex_ranks.split(","))
    plans = [
        FederatedSettings(m, args.rounds, args.local_steps, flex if m == "flexlora" else None)
        for m in args.methods.split(",")
    ]
    t0 = time.time()
    version = version_label(code_version())  # before the runs: the tree they run from
    fed = run_lora_simulation(task, plans, args.sites, args.out)
    sites = fed["num_sites"]
    central = {
        "same_examples": centralized(task, sites * args.rounds * args.local_steps),
        "same_steps": centralized(task, args.rounds * args.local_steps),
    }
    data = load_task_data(task)
    doc = {
        "command": "python -m simulations.fedlora_study" + "".join(f" {a}" for a in argv),
        "data": f"bundle {args.bundle}"
        if args.bundle
        else f"toy ({task.toy_classes} classes carried only by noisy 8-d sensor features, noise {task.toy_noise})",
        "task": asdict(task) | {"cfg_json": None},
        "num_sites": sites,
        "sites": fed["sites"],
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "train_examples": len(data.train),
        "eval_examples": len(data.evals),
        "reference": data.reference,
        "methods": fed["methods"],
        "centralized": central,
        "code_version": version,
        "wall_s": round(time.time() - t0, 1),
        "json": str(
            args.doc.with_suffix(".json").relative_to(REPO)
            if args.doc.is_relative_to(REPO)
            else args.doc.with_suffix(".json")
        ),
    }
    atomic_write_text(args.doc.with_suffix(".json"), json.dumps(doc, indent=2))
    write_report(doc, args.doc)
    print(args.doc)


if __name__ == "__main__":
    main()
