"""Flower ServerApp for federated LoRA: rounds of site training, LoRA-aware aggregation.

Which instructions each site trains on is the task's site split
(:mod:`fed_iotlm.llm.sites`: by default site k is federation node k with its own uploaded
rows, and the number of sites is the plan's; results.json's ``sites`` says which split
ran, with per-site row and example counts); a site without any example is idle, sent no
round, and named in every round's record.

Ask every node which partition it is (``query.identify``; a site that cannot answer this
roll call fails the run before any round) and keep the answers in the federation's live
roster (:mod:`server.roster`: a restarted site is picked up again, under a new node id
too), then per configured method (one run may hold several, e.g. a study) run its rounds
on the round engine (:mod:`server.engine`) with :class:`server.lora_step.LoraStep`: each
live site gets its ``train`` payload, the replies that
arrive before the deadline are aggregated with
:class:`~fed_iotlm.llm.federated.LoraServerState`, a failed or silent site is recorded
and left out, a round with too few answers is skipped.  Finally the global model is
evaluated by generation on held-out question templates.  ``results.json`` is rewritten
after every method; its per-round loss, aggregation error, FedIT error, faults and bytes
are views of the rounds' records.  After every round the server state, the records and
the finished methods' results are checkpointed into ``<output_dir>/checkpoint``, and
``resume=true`` continues after the last saved round (:mod:`server.lora_resume`).
Each app run is one MLflow run (``mlflow.*``, off with ``mlflow.enabled=false``) with a
nested run per method holding its rounds' metrics, continued on resume and ended FAILED
on an error (:mod:`server.lora_tracking`); results.json also carries ``code_version``,
``seed``, ``wall_s`` and the whole ``config``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.federation.checkpoint import CheckpointError
from fed_iotlm.federation.round_record import TRAIN, RoundRecord, results_blocks
from fed_iotlm.llm.evaluation import generation_accuracy
from fed_iotlm.llm.federated import (
    FederatedSettings,
    LoraServerState,
    federated_settings,
    load_global,
    prepare_site,
)
from fed_iotlm.llm.fedlora import lora_factors
from fed_iotlm.llm.lora_task import LoraTask, TaskData, build_model, load_task_data, task_sites
from fed_iotlm.logs import configure as configure_logging
from fed_iotlm.protocol import code_version
from fed_iotlm.settings import from_run_config
from server.engine import RoundEngine
from server.federated_run import wait_for_nodes
from server.lora_resume import LoraCheckpointer, LoraResumePoint
from server.lora_step import LoraStep, Observer, lora_comm, lora_rounds
from server.lora_tracking import LoraTracking
from server.roster import LiveRoster, identify_nodes

log = logging.getLogger(__name__)

# each round's record as the engine makes it: (method, record)
RecordHook = Callable[[str, RoundRecord], None]


def roll_call(grid: Grid, num_sites: int, timeout_s: float = 120.0) -> LiveRoster:
    """Who serves each partition: every node's ``query.identify`` before round 1 (a site
    that cannot answer fails the run here, with its own error), then the live roster the
    federation uses (:mod:`server.roster`): before every round it identifies the nodes it
    has not seen, so a site restarted under a new node id is sent the next round and its
    rejoin lands in that round's record."""
    wait_for_nodes(grid, num_sites, timeout_s)
    roster = identify_nodes(grid, num_sites, timeout_s)
    return LiveRoster(roster, num_sites, identify_timeout_s=timeout_s, wait_s=timeout_s)


def _evaluate(task: LoraTask, data: TaskData, state: LoraServerState) -> dict:
    """Generation accuracy of the global model; FlexLoRA also of each rank's truncation."""
    gen = {"batch_size": task.eval_batch, "max_new_tokens": task.max_new_tokens}
    model, builder = build_model(task, data, task.lora_r)
    load_global(model, state)
    report = generation_accuracy(model, builder, data.feats, data.evals, data.meta, **gen)
    if state.method == "flexlora":
        report["by_rank"] = {}
        for site, factors in sorted(state.factors.items()):
            rank = next(iter(factors.values())).rank
            if str(rank) in report["by_rank"]:
                continue
            model, builder = build_model(task, data, rank)
            prepare_site(model, state.payload(site))
            acc = generation_accuracy(model, builder, data.feats, data.evals, data.meta, **gen)
            report["by_rank"][str(rank)] = acc["accuracy"]
    return report


def run_method(
    grid: Grid,
    task: LoraTask,
    data: TaskData,
    fs: FederatedSettings,
    roster: LiveRoster,
    observe: Observer | None = None,
    on_record: RecordHook | None = None,
    checkpoint: Callable[[LoraServerState, list[RoundRecord]], None] | None = None,
    resumed: LoraResumePoint | None = None,
    idle: Mapping[int, str] | None = None,
) -> dict:
    """``fs.rounds`` rounds of one method on the round engine (:class:`LoraStep`); returns
    its report, whose per-round blocks are views of the rounds' records (``on_record``
    gets each record as it is made, after ``checkpoint`` has saved the round).  With
    ``resumed`` (a checkpoint of this method) it continues after the saved round;
    ``idle``: sites with no example (partition id -> why), sent no round."""
    t0 = time.time()
    idle = dict(idle or {})
    fs.min_replies(roster.expected - len(idle))  # min_sites above the training sites: fail now
    ranks = dict(enumerate(fs.site_ranks(roster.expected, task.lora_r)))
    template, _ = build_model(task, data, task.lora_r)  # draws from torch's RNG
    state = LoraServerState.start(
        fs.method,
        lora_factors(template.peft),
        template.sensor_state(),
        ranks,
        task.lora_alpha,
        task.seed,
        fs.dense_diagnostics,
    )
    records: list[RoundRecord] = []
    first = 1
    if resumed is not None:
        if resumed.method != fs.method or set(resumed.state.factors) != set(ranks):
            raise ValueError(f"a {resumed.method} checkpoint cannot resume {fs.method}")
        state, records, first = resumed.state, resumed.records, resumed.round + 1
        resumed.restore_rng()  # as after the saved round: the draws that follow match
    step = LoraStep(grid, state, roster, fs, task.lora_alpha, observe, idle)

    def record_hook(record: RoundRecord) -> None:
        if checkpoint is not None:  # before anyone else sees the round: it is done
            checkpoint(state, records)
        if on_record is not None:
            on_record(fs.method, record)

    engine = RoundEngine(
        phase=TRAIN, step=step, records=records, on_record=record_hook, roster=roster,
        label=f"LORA {fs.method}",
    )  # fmt: skip
    engine.run(ArrayRecord(), first, fs.rounds)  # the state is the step's (server/lora_step.py)
    t1 = time.time()
    accuracy = _evaluate(task, data, state)
    return {
        "method": fs.method,
        "settings": asdict(fs),
        "ranks": [ranks[k] for k in sorted(ranks)],
        "rounds": lora_rounds(records),
        "faults_by_round": results_blocks(records).get("faults_by_round", {}),
        "accuracy": accuracy["accuracy"],
        "eval": accuracy,
        "comm": lora_comm(records),
        "train_s": round(t1 - t0, 1),  # resumed: this process's share only
        "eval_s": round(time.time() - t1, 1),
    }


def run_lora_federation(
    grid: Grid,
    task: LoraTask,
    plans: Sequence[FederatedSettings],
    num_sites: int | str,
    out_dir: Path,
    observe: Observer | None = None,
    on_record: RecordHook | None = None,
    resume: bool = False,
    mlflow: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Every plan (method) in turn on the same sites; returns results.json's path.

    ``num_sites``: a number or ``auto`` (node sites: the plan's node count, which a
    number must restate).  The server state is checkpointed after every round
    (:mod:`server.lora_resume`); with ``resume`` the run continues after the
    checkpoint's round, the methods finished before it reported as they were.
    ``mlflow``: the ``mlflow`` config block (None: no MLflow run), recorded through
    :mod:`server.lora_tracking`; ``config``: the composed config the run came from (the
    run config), kept in results.json and as the MLflow run's config artifact."""
    t0 = time.time()
    out_dir = Path(out_dir)
    data = load_task_data(task)
    split = task_sites(task, num_sites)
    num_sites, idle = split.num_sites, split.idle()
    if len(idle) == num_sites:
        raise ValueError(f"no federated-LoRA site has a training example: {idle}")
    checkpointer = LoraCheckpointer(out_dir, task, plans, num_sites, resume)
    resumed = checkpointer.restore()
    methods = [fs.method for fs in plans]
    if resumed is not None and set(resumed.done) != set(methods[: methods.index(resumed.method)]):
        raise CheckpointError(
            f"{checkpointer.directory}: finished methods {sorted(resumed.done)} do not "
            f"precede {resumed.method} in {methods}"
        )
    run_config = run_document(task, plans, num_sites, config)
    tracking = LoraTracking(
        mlflow, run_config, f"fedlora-{'+'.join(methods)}-seed{task.seed}",
        resume=resumed.mlflow if resumed is not None else None,
    )  # fmt: skip
    try:
        # the roll call is the sites' first message: a fresh ClientApp imports torch,
        # transformers and peft before it answers, which on a loaded machine outlasts any
        # short fixed wait, so it gets the same deadline as a round (a dead site still
        # fails the run, at that deadline)
        roster = roll_call(grid, num_sites, max(fs.round_timeout_s for fs in plans))
        doc: dict = {"task": asdict(task) | {"cfg_json": None}, "num_sites": num_sites}
        doc |= {"sites": split.report(), "methods": {}, "seed": task.seed}
        doc |= {"code_version": code_version(), "config": run_config}
        if tracking.run_id is not None:
            doc["mlflow"] = {"experiment": tracking.experiment, "run_id": tracking.run_id}
        path = out_dir / "results.json"

        def record_hook(method: str, record: RoundRecord) -> None:
            tracking.log_record(record)
            if on_record is not None:
                on_record(method, record)

        for fs in plans:
            if resumed is not None and fs.method in resumed.done:
                doc["methods"][fs.method] = resumed.done[fs.method]
                log.info("federated LoRA: %s finished before the checkpoint", fs.method)
                continue
            here = resumed if resumed is not None and resumed.method == fs.method else None
            log.info("federated LoRA: %s, %s sites, %s rounds", fs.method, num_sites, fs.rounds)
            tracking.start_method(fs, here.records if here else [], resumed=here is not None)
            done = dict(doc["methods"])

            def save(state: LoraServerState, records: list[RoundRecord], done=done) -> None:
                checkpointer.save(state, records, done, tracking.ids())

            report = run_method(
                grid, task, data, fs, roster, observe, record_hook,
                checkpoint=save, resumed=here, idle=idle,
            )  # fmt: skip
            doc["methods"][fs.method] = report
            tracking.end_method(report, fs.rounds)
            doc["wall_s"] = round(time.time() - t0, 2)  # resumed: this process's share only
            atomic_write_text(path, json.dumps(doc, indent=2))
            log.info("%s: generation accuracy %.3f", fs.method, report["accuracy"])
        tracking.finish(path)
    except BaseException as err:
        tracking.fail(err)  # MLflow shows the run FAILED, not RUNNING or FINISHED
        raise
    return path


def run_document(
    task: LoraTask,
    plans: Sequence[FederatedSettings],
    num_sites: int,
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The run's whole configuration as one JSON document (results.json's ``config``,
    the MLflow run's params and config artifact): the task, every method's settings,
    the number of sites, and the composed config it came from (the run config's, or the
    one a bundle task carries), if any."""
    if config is None and task.cfg_json:
        config = json.loads(task.cfg_json)
    return {
        "task": asdict(task) | {"cfg_json": None},
        "plans": [asdict(fs) for fs in plans],
        "num_sites": num_sites,
        **({"config": dict(config)} if config is not None else {}),
    }


def make_lora_server_app(
    task: LoraTask | None = None,
    plans: Sequence[FederatedSettings] | None = None,
    num_sites: int | str | None = None,
    out_dir: Path | None = None,
    observe: Observer | None = None,
    on_record: RecordHook | None = None,
    resume: bool | None = None,
    mlflow: Mapping[str, Any] | None = None,
) -> ServerApp:
    """Bound to explicit settings (Python entry point; ``mlflow``: the ``mlflow`` block,
    None for no MLflow run) or, if None, to the run config (``llm.*`` with
    ``llm.federated``; ``resume``, ``output_dir`` and ``mlflow.*`` as the federation's)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configure_logging()  # a ServerApp started by Flower runs in an unconfigured process
        given = task is not None and plans is not None and num_sites is not None
        cfg = {} if given else from_run_config(dict(context.run_config))
        the_task = task or LoraTask.from_cfg(cfg)
        the_plans = plans or [federated_settings(cfg["llm"])]
        n = num_sites or cfg["llm"]["federated"]["sites"]  # a number or auto
        out = out_dir or Path(
            cfg.get("output_dir") or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-fedlora"
        )
        again = bool(cfg.get("resume", False)) if resume is None else resume
        tracking = mlflow if given else cfg.get("mlflow", mlflow)
        path = run_lora_federation(
            grid, the_task, the_plans, n, out, observe, on_record, again, tracking,
            config=None if given else cfg,
        )  # fmt: skip
        print(path, flush=True)

    return app


app = make_lora_server_app()
