"""Flower ServerApp for federated LoRA: rounds of site training, LoRA-aware aggregation.

Per configured method (one run may hold several, e.g. a study): ask every node which
partition it is (``query.site``), send each site its ``train`` payload, aggregate the
replies with :class:`~fed_iotlm.llm.federated.LoraServerState`, and finally evaluate the
global model by generation on held-out question templates.  ``results.json`` is rewritten
after every method with the per-round loss, aggregation error and FedIT error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_iotlm.atomic import atomic_write_text
from fed_iotlm.federation.records import numpy_to_record, record_nbytes, record_to_numpy
from fed_iotlm.llm.evaluation import generation_accuracy
from fed_iotlm.llm.federated import (
    FederatedSettings,
    LoraServerState,
    SiteUpdate,
    federated_settings,
    load_global,
    prepare_site,
)
from fed_iotlm.llm.fedlora import lora_factors
from fed_iotlm.llm.lora_task import LoraTask, TaskData, build_model, load_task_data
from fed_iotlm.llm.lora_wire import pack, unpack
from fed_iotlm.settings import from_run_config
from fed_iotlm.tracking import console
from server.federated_run import wait_for_nodes

# called after each aggregation: (method, round, replies by partition id, server state)
Observer = Callable[[str, int, Mapping[int, SiteUpdate], LoraServerState], None]


def _send(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [r for r in replies if r.has_error()]
    if failed or len(replies) != len(messages):
        reason = failed[0].error.reason if failed else "no reply before the timeout"
        raise RuntimeError(f"{messages[0].metadata.message_type}: {reason}")
    return replies


def discover_sites(grid: Grid, num_sites: int, timeout_s: float = 120.0) -> dict[int, int]:
    """node id -> partition id; the per-site rank and data share follow the partition id."""
    wait_for_nodes(grid, num_sites, timeout_s)
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type="query.site")
        for n in grid.get_node_ids()
    ]
    sites = {
        r.metadata.src_node_id: int(r.content["metrics"]["partition-id"])
        for r in _send(grid, messages, timeout_s)
    }
    if sorted(sites.values()) != list(range(num_sites)):
        raise RuntimeError(f"partition ids {sorted(sites.values())}, expected 0..{num_sites - 1}")
    return sites


def _train_message(
    node: int, state: LoraServerState, site: int, rnd: int, fs: FederatedSettings
) -> Message:
    p = state.payload(site)
    config = ConfigRecord(
        {
            "server-round": rnd,
            "method": state.method,
            "local-steps": fs.local_steps,
            "residual-version": p.version,
            "freeze-a": p.freeze_a,
            "a-seed": -1 if state.a_seed is None else state.a_seed,
            "total-rounds": fs.rounds,
        }
    )
    arrays = numpy_to_record(pack(p.factors, p.sensor, p.residual, b_only=p.freeze_a))
    return Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type="train"
    )


def _lora_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the LoRA factors and residual in a payload (the projector state excluded)."""
    return sum(a.nbytes for k, a in arrays.items() if not k.startswith("sensor|"))


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
    sites: dict[int, int],
    observe: Observer | None = None,
    timeout_s: float = 3600.0,
) -> dict:
    """``fs.rounds`` rounds of one method; returns its report (rounds, accuracy, errors)."""
    t0 = time.time()
    ranks = dict(enumerate(fs.site_ranks(len(sites), task.lora_r)))
    template, _ = build_model(task, data, task.lora_r)
    state = LoraServerState.start(
        fs.method,
        lora_factors(template.peft),
        template.sensor_state(),
        ranks,
        task.lora_alpha,
        task.seed,
        fs.dense_diagnostics,
    )
    down = up = lora_down = lora_up = 0  # payload bytes, summed over sites and rounds
    for rnd in range(1, fs.rounds + 1):
        messages = [_train_message(node, state, pid, rnd, fs) for node, pid in sites.items()]
        down += sum(record_nbytes(m.content["arrays"]) for m in messages)
        lora_down += sum(_lora_nbytes(record_to_numpy(m.content["arrays"])) for m in messages)
        updates: dict[int, SiteUpdate] = {}
        for reply in _send(grid, messages, timeout_s):
            up += record_nbytes(reply.content["arrays"])
            metrics = reply.content["metrics"]
            pid = sites[reply.metadata.src_node_id]
            shared_a = state.factors[pid] if state.a_seed is not None else None  # FFA: B only
            arrays = record_to_numpy(reply.content["arrays"])
            lora_up += _lora_nbytes(arrays)
            factors, sensor, _ = unpack(arrays, task.lora_alpha, shared_a)
            updates[pid] = SiteUpdate(
                factors, sensor, int(metrics["num-examples"]), float(metrics["loss"])
            )
        report = state.aggregate(updates)
        if observe is not None:
            observe(fs.method, rnd, updates, state)
        fedit = "" if report.fedit_error is None else f", FedIT would lose {report.fedit_error:.4f}"
        console.print(
            f"  {fs.method} round {rnd}/{fs.rounds}: loss {report.loss:.3f}, "
            f"aggregation error {report.agg_error:.4f} = {report.rel_error:.2%} of the "
            f"round's update {report.update_norm:.3f}{fedit}"
        )
    t1 = time.time()
    accuracy = _evaluate(task, data, state)
    return {
        "method": fs.method,
        "settings": asdict(fs),
        "ranks": [ranks[k] for k in sorted(ranks)],
        "rounds": [asdict(r) for r in state.reports],
        "accuracy": accuracy["accuracy"],
        "eval": accuracy,
        "comm": {  # FedEx adds its stacked residual factors down; FFA moves B only
            "bytes_down_per_site_round": down // (fs.rounds * len(sites)),
            "bytes_up_per_site_round": up // (fs.rounds * len(sites)),
            "lora_bytes_down_per_site_round": lora_down // (fs.rounds * len(sites)),  # no projector
            "lora_bytes_up_per_site_round": lora_up // (fs.rounds * len(sites)),
        },
        "train_s": round(t1 - t0, 1),
        "eval_s": round(time.time() - t1, 1),
    }


def run_lora_federation(
    grid: Grid,
    task: LoraTask,
    plans: Sequence[FederatedSettings],
    num_sites: int,
    out_dir: Path,
    observe: Observer | None = None,
) -> Path:
    """Every plan (method) in turn on the same sites; returns results.json's path."""
    out_dir = Path(out_dir)
    data = load_task_data(task)
    sites = discover_sites(grid, num_sites)
    doc: dict = {"task": asdict(task) | {"cfg_json": None}, "num_sites": num_sites, "methods": {}}
    path = out_dir / "results.json"
    for fs in plans:
        console.print(
            f"[bold]federated LoRA[/bold]: {fs.method}, {num_sites} sites, {fs.rounds} rounds"
        )
        doc["methods"][fs.method] = run_method(grid, task, data, fs, sites, observe)
        atomic_write_text(path, json.dumps(doc, indent=2))
        console.print(
            f"  {fs.method}: generation accuracy {doc['methods'][fs.method]['accuracy']:.3f}"
        )
    return path


def make_lora_server_app(
    task: LoraTask | None = None,
    plans: Sequence[FederatedSettings] | None = None,
    num_sites: int | None = None,
    out_dir: Path | None = None,
    observe: Observer | None = None,
) -> ServerApp:
    """Bound to explicit settings (Python entry point) or, if None, to the run config
    (``llm.*`` with ``llm.federated``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        given = task is not None and plans is not None and num_sites is not None
        cfg = {} if given else from_run_config(dict(context.run_config))
        the_task = task or LoraTask.from_cfg(cfg)
        the_plans = plans or [federated_settings(cfg["llm"])]
        n = num_sites or int(cfg["llm"]["federated"]["sites"])
        out = out_dir or Path(
            cfg.get("output_dir") or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-fedlora"
        )
        print(run_lora_federation(grid, the_task, the_plans, n, out, observe), flush=True)

    return app


app = make_lora_server_app()
