"""Flower ClientApp: a sensor node's behaviour per message type.

* ``train``: load the global arrays, train on the node's own modalities and labels,
  reply with ONLY the parameter groups it holds plus a ``count.<group>`` per group.
* ``evaluate``: accuracy of the received model on the node's own test split, with
  the node's own modalities.
* MMBind (``method=mmbind``): ``train.pretrain`` (self-supervised shared-modality
  round), ``query.embed`` (embeddings up, never raw samples), ``train.bind``
  (partners down, kept in the node's state); ``train`` then adds the pseudo-pair terms.
* DP (``dp.enabled``): ``update_clipping_mod`` clips what ``train`` sends to the
  server's clipping norm (:mod:`fed_iotlm.federation.privacy`); a no-op otherwise.
* ``query.llm_upload`` (``llm.upload.collect``, after the last round): frozen-encoder
  tokens and the node's labels for the central LM stage, never raw windows
  (:mod:`.llm_upload`).
* ``attack`` (studies only, off by default): the first partition ids poison what
  ``train`` sends (:mod:`fed_iotlm.federation.attacks`).

The registered ClientApp (``app``, what ``flwr run .`` and a deployed SuperNode load) hands
each message to the app the run config's ``app`` key names (:mod:`fed_iotlm.flwr_apps`):
this one (the default) or federated LoRA's (:mod:`clients.lora_app`, imported only then).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_iotlm.binding.training import train_with_partners
from fed_iotlm.experiment import bind_train_config
from fed_iotlm.federation.attacks import attack_config, maybe_attack
from fed_iotlm.federation.class_balance import weights_from_message
from fed_iotlm.federation.groups import select_groups
from fed_iotlm.federation.privacy import update_clipping_mod
from fed_iotlm.federation.records import (
    counts_to_metrics,
    load_into,
    numpy_to_record,
    packed_record,
    state_to_numpy,
)
from fed_iotlm.federation.secure import SecureSettings
from fed_iotlm.flwr_apps import FEDERATION, FEDLORA, chosen_app
from fed_iotlm.llm.uploads import UPLOAD_QUERY
from fed_iotlm.models.class_weights import class_weighting_mode
from fed_iotlm.models.threads import apply_threads
from fed_iotlm.models.training import (
    evaluate,
    mean_accuracy,
    mean_loss,
    mean_metric,
    train_local,
)
from fed_iotlm.personal import (
    personal_config,
    restore_personal,
    store_personal,
    train_personal,
    without_personal,
)
from fed_iotlm.settings import from_run_config

from .deadline import make_deadline_mod
from .fault_marker import mark_train_start, maybe_hang
from .identify import identify_reply
from .llm_upload import upload_reply
from .mmbind import (
    embed_reply,
    partner_tensors,
    pretrain_groups,
    pretrain_local,
    pretrain_reply,
    store_partners,
)
from .node import NodeRuntime, get_node, get_site_node
from .secure import (
    census_of,
    census_reply,
    is_secure,
    phase,
    received_state,
    secure_aggregation_mod,
    secure_reply,
    train_config,
)
from .site import partition_id, site_config
from .statistics import (
    is_secure_statistics,
    secure_stats_reply,
    standardized_for,
    stats_reply,
)


def _settings(context: Context, cfg: dict | None) -> dict:
    return cfg if cfg is not None else from_run_config(dict(context.run_config))


def _node_for(context: Context, cfg: dict | None) -> NodeRuntime:
    """A deployed site's own data (node config ``data-dir``), else the simulation share."""
    site = site_config(context.node_config)
    if site is not None:
        return get_site_node(_settings(context, cfg), site)
    return get_node(_settings(context, cfg), partition_id(context.node_config))


def _node_with_global_model(msg: Message, context: Context, cfg: dict | None) -> NodeRuntime:
    """The node, its model loaded with the arrays the server sent (``train.threads``
    torch threads, default one per node), and its own personal adapters put back
    (``personal.enabled``; no-op otherwise)."""
    return _load_global_model(msg, context, cfg)[0]


def _load_global_model(
    msg: Message, context: Context, cfg: dict | None
) -> tuple[NodeRuntime, dict[str, np.ndarray]]:
    """:func:`_node_with_global_model` and the arrays as received, by key."""
    apply_threads(_settings(context, cfg))  # train.threads: as the in-process baselines
    node = standardized_for(msg, _node_for(context, cfg), _settings(context, cfg))
    shared = without_personal(state_to_numpy(node.model), node.personal_keys)
    received = received_state(msg, shared)
    load_into(node.model, received)
    restore_personal(context.state, node.model, node.personal_keys, node.personal_init)
    return node, received


def received_class_weights(
    msg: Message, settings: dict, node: int
) -> dict[str, tuple[float, ...]] | None:
    """The federation's class weights the server attached (``train.class_weighting=
    balanced``); None under ``none``.  A balanced run whose message lacks them fails
    here rather than train this node on a different objective from the others."""
    if class_weighting_mode(settings) != "balanced":
        return None
    weights = weights_from_message(msg)
    if weights is None:
        raise RuntimeError(
            f"node {node}: train.class_weighting=balanced but the server's "
            f"{msg.metadata.message_type} message carries no class weights ('class_weights')"
        )
    return weights


def make_client_app(cfg: dict | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg`` (Python entry point) or, if None, to the run config.

    ``mods`` are Flower client mods (e.g. DP clipping, or a recorder in tests)."""
    # outermost: a handler still running at the round deadline is cut off (clients/deadline.py)
    deadline_mod = make_deadline_mod(lambda context: _settings(context, cfg))
    app = ClientApp(mods=[deadline_mod, secure_aggregation_mod, *(mods or [])])

    @app.train(mods=[update_clipping_mod])  # innermost: DP clips what train sends
    def train(msg: Message, context: Context) -> Message:
        settings = _settings(context, cfg)
        if is_secure(msg) and is_secure_statistics(msg):  # the statistics round, masked
            return secure_stats_reply(msg, _node_for(context, cfg), settings)
        if is_secure(msg) and phase(msg) == "census":  # holder flags only, no model
            node = _node_for(context, cfg)
            counts = pretrain_groups(node, settings) if census_of(msg) == "pretrain" else None
            shared = without_personal(state_to_numpy(node.model), node.personal_keys)
            return census_reply(msg, shared, node.group_counts if counts is None else counts)
        node, received = _load_global_model(msg, context, cfg)
        config = train_config(msg)
        if is_secure(msg) and phase(msg) == "pretrain":  # MMBind's SSL round under SecAgg+
            rnd = int(config.get("server-round", 0))
            groups, _ = pretrain_local(node, settings, rnd)
            state = without_personal(state_to_numpy(node.model), node.personal_keys)
            return secure_reply(msg, state, received, groups, settings, f"node {node.node}")
        mark_train_start(context.node_config, node.node, int(config.get("server-round", 0)))
        maybe_hang(context.node_config, int(config.get("server-round", 0)))  # test hook
        tcfg = dataclasses.replace(
            node.train_cfg,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            class_weights=received_class_weights(msg, settings, node.node),
        )
        round_seed = int(config.get("server-round", 0)) * 10_007 + node.node
        pstats = train_personal(  # personal adapters first (personal.enabled; else no-op)
            node.model,
            node.train,
            node.personal_keys,
            tcfg,
            personal_config(settings),
            seed=round_seed + 1_000_003,
        )
        if node.method == "mmbind" and settings["binding"]["bind"]:
            stats = train_with_partners(  # no partners yet: own pairs + labels still train
                node.model,
                node.train,
                partner_tensors(context, node),
                tcfg,
                bind_train_config(settings),
                round_seed,
            )
        else:
            stats = train_local(node.model, node.train, tcfg, seed=round_seed)
        store_personal(context.state, node.model, node.personal_keys)  # kept, never sent
        state = without_personal(state_to_numpy(node.model), node.personal_keys)
        if is_secure(msg):  # SecAgg+: one masked Σ-ready vector, counts inside it
            return secure_reply(
                msg, state, received, node.group_counts, settings, f"node {node.node}"
            )
        sent = state if node.sends_all_groups else select_groups(state, node.group_counts)
        sent = maybe_attack(
            sent,
            received,
            attack_config(settings),
            node.node,
            node.num_nodes,
        )
        metrics = counts_to_metrics(
            node.group_counts,
            {
                **stats,
                **pstats,
                "num-examples": float(node.num_train),
                "partition-id": float(node.node),
            },
        )
        # one buffer per group: the server screens and averages per group; naive FedAvg
        # (method=fedavg) runs Flower's own FedAvg, which averages every array by key
        record = numpy_to_record(sent) if node.sends_all_groups else packed_record(sent)
        return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate_node(msg: Message, context: Context) -> Message:
        node = _node_with_global_model(msg, context, cfg)
        per_task = evaluate(node.model, node.test)
        metrics = {
            "accuracy": mean_accuracy(per_task),
            "loss": mean_loss(per_task),
            "partition-id": float(node.node),
        }
        if not SecureSettings.from_config(_settings(context, cfg)).enabled:
            metrics["num-examples"] = float(len(node.test))  # SecAgg+ hides every count
        metrics.update({f"accuracy.{t}": v["accuracy"] for t, v in per_task.items()})
        if node.val is not None and len(node.val) > 0:  # the node's validation share
            val_task = evaluate(node.model, node.val)
            metrics.update(
                val_accuracy=mean_accuracy(val_task),
                val_loss=mean_loss(val_task),
                val_f1_macro=mean_metric(val_task, "f1_macro"),  # select_round=best_val
            )
            if "num-examples" in metrics:
                metrics["val_examples"] = float(len(node.val))
        for key in ("f1_macro", "balanced_accuracy"):  # class-balanced scores, same split
            metrics[key] = mean_metric(per_task, key)
            metrics.update({f"{key}.{t}": v[key] for t, v in per_task.items()})
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.train("pretrain")
    def pretrain(msg: Message, context: Context) -> Message:
        node = _node_with_global_model(msg, context, cfg)
        return pretrain_reply(msg, node, _settings(context, cfg))

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        return identify_reply(msg, _node_for(context, cfg), _settings(context, cfg))

    @app.query("stats")
    def stats(msg: Message, context: Context) -> Message:
        return stats_reply(msg, _node_for(context, cfg))

    @app.query("embed")
    def embed(msg: Message, context: Context) -> Message:
        node = _node_with_global_model(msg, context, cfg)
        return embed_reply(msg, node, _settings(context, cfg))

    @app.train("bind")
    def bind(msg: Message, context: Context) -> Message:
        return store_partners(msg, context, _node_for(context, cfg), _settings(context, cfg))

    @app.query(UPLOAD_QUERY)
    def llm_upload(msg: Message, context: Context) -> Message:
        settings = _settings(context, cfg)
        apply_threads(settings)
        node = standardized_for(msg, _node_for(context, cfg), settings)
        return upload_reply(msg, node, settings)

    return app


# every message type either app handles (Flower routes by exact type, so the registered
# app lists them all); tests/test_flwr_apps.py checks the list against both apps
DISPATCHED = (
    "train", "train.pretrain", "train.bind", "evaluate",
    "query.identify", "query.stats", "query.embed", f"query.{UPLOAD_QUERY}",
)  # fmt: skip


def _lora_client_app() -> ClientApp:
    from clients.lora_app import app as lora_app  # transformers, peft: the llm extra

    return lora_app


def make_registered_client_app(
    apps: Mapping[str, Callable[[], ClientApp]] | None = None,
) -> ClientApp:
    """The ClientApp ``pyproject.toml`` registers: each message goes, whole, to the
    federation's ClientApp (:func:`make_client_app`, its mods included) or to the
    federated-LoRA one, as the run config's ``app`` says; the ServerApp (``server/app.py``)
    dispatches on the same key, so a site always answers the app the server runs.
    ``apps``: app name -> the ClientApp (tests stand in their own)."""
    federation = make_client_app()
    choices = apps or {FEDERATION: lambda: federation, FEDLORA: _lora_client_app}
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        return choices[chosen_app(context.run_config)]()(msg, context)

    for message_type in DISPATCHED:
        category, _, action = message_type.partition(".")
        register = {"train": app.train, "evaluate": app.evaluate, "query": app.query}[category]
        (register(action) if action else register())(handle)
    return app


# `flwr run .` loads this object; it reads its settings from the Flower run config.
app = make_registered_client_app()
