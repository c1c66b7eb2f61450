"""Flower ClientApp for federated LoRA: a site with (ideally) a GPU and its own instructions.

Partition k's instructions are site k's of the task's site split
(:mod:`fed_iotlm.llm.sites`): by default node k's own uploaded rows, and the federation's
``num-partitions`` must be the plan's node count.

* ``query.identify``: the site's partition id, before round 1 and whenever the server's
  live roster meets a node id it has not seen (a restarted site), so the server can give
  each partition its rank (FlexLoRA) and send each round to one live node per partition.
* ``train``: build the model on the pristine base, add the received cumulative residual
  beside it in fp32 (FedEx, stacked factors), load the factors and projector, freeze A
  (FFA: regenerated from ``a-seed``; only B travels, both ways), train ``local-steps``
  steps continuing one lr schedule over all rounds, and reply with factors + projector +
  n + mean loss.

The site keeps nothing between rounds (see :mod:`fed_iotlm.llm.federated`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fed_iotlm.federation.records import numpy_to_record, record_to_numpy
from fed_iotlm.llm.federated import (
    SitePayload,
    initial_factors,
    prepare_site,
    site_tune_settings,
    train_site,
)
from fed_iotlm.llm.fedlora import lora_factors
from fed_iotlm.llm.lora_task import LoraTask, build_model, load_task_data, site_examples
from fed_iotlm.llm.lora_wire import pack, unpack
from fed_iotlm.llm.sites import AUTO
from fed_iotlm.settings import from_run_config


def _site(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def make_lora_client_app(
    task: LoraTask | None = None, threads: int = 1, mods: Sequence[Mod] = ()
) -> ClientApp:
    """Bound to ``task`` (Python entry point) or, if None, to the run config (``llm.*``).

    ``threads``: torch CPU threads per site (simulated sites share the machine's cores);
    ``mods``: Flower client mods around every handler (tests use them to inject faults)."""
    app = ClientApp(mods=list(mods))

    def _task(context: Context) -> LoraTask:
        return task or LoraTask.from_cfg(from_run_config(dict(context.run_config)))

    def _examples(context: Context, the_task: LoraTask):
        pid, num = _site(context)
        data = load_task_data(the_task)
        if the_task.site_split == "nodes" and num != data.num_nodes:
            raise ValueError(
                f"{num} partitions, but node sites are the plan's {data.num_nodes} nodes: "
                f"run {data.num_nodes} SuperNodes (llm.federated.sites={AUTO})"
            )
        return data, site_examples(the_task, pid, num)

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        """The roll call and the live roster's question (:mod:`server.roster`); loading the
        site's data first makes a site that cannot train fail the run before round 1."""
        _examples(context, _task(context))
        identity = {"partition-id": _site(context)[0], "source": "partition"}
        return Message(RecordDict({"identity": ConfigRecord(identity)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        the_task = _task(context)
        data, examples = _examples(context, the_task)
        if not examples:  # the server leaves idle sites out (server/lora_step.py)
            raise ValueError(
                f"partition {_site(context)[0]} has no instruction example to train on "
                "(its node has no labelled training row left); it should not be sent a round"
            )
        config = msg.content["config"]
        arrays = record_to_numpy(msg.content["arrays"])
        freeze_a = bool(config["freeze-a"])
        shared_a = None
        if freeze_a:  # FFA: A never travels; every site rebuilds it from the shared seed
            rank = the_task.lora_r
            model, builder = build_model(the_task, data, rank)
            template = lora_factors(model.peft)
            shared_a = initial_factors(template, rank, the_task.lora_alpha, int(config["a-seed"]))
        factors, sensor, residual = unpack(arrays, the_task.lora_alpha, shared_a)
        rnd, version = int(config["server-round"]), int(config["residual-version"])
        if residual and not 1 <= version <= rnd - 1:  # C_{t-1}: at most t-1 rounds (fewer
            raise ValueError(f"round {rnd} got a residual of version {version}")  # if skipped)
        payload = SitePayload(factors, sensor, residual, version, freeze_a)
        if not freeze_a:
            rank = next(iter(factors.values())).rank
            model, builder = build_model(the_task, data, rank)
        prepare_site(model, payload)
        pid, _ = _site(context)
        settings = site_tune_settings(
            the_task.tune,
            int(config["local-steps"]),
            rnd,
            int(config["total-rounds"]),
            pid,
            the_task.seed,
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        update = train_site(model, builder, examples, data.feats, settings, device=device)
        metrics = MetricRecord(
            {
                "num-examples": float(update.n),
                "loss": update.loss,
                "partition-id": float(pid),
                "rank": float(rank),
            }
        )
        arrays = numpy_to_record(pack(update.factors, update.sensor_state, b_only=freeze_a))
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


app = make_lora_client_app()
