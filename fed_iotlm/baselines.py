"""Non-federated reference points in the same harness: local-only and centralized.

Both spend the same optimisation budget per round as a federated node (``train.steps``
optimiser steps, or ``epochs`` passes over the data a model sees) and report through
the same :class:`RunRecorder`, validation beside test.  Inputs are standardised with
training statistics only: a local node with its own, the centralized model with the
pooled training data's (the same statistics the federation's statistics round
computes); a reference set never with its own unless ``normalization=per_site``.
Each trains with ``train.threads`` torch threads, as each federated node does.
Each reports the round ``select_round`` chooses (:mod:`fed_iotlm.selection`), as the
federation does, so every row of a study table is under one rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fed_iotlm.data.federation import build_layout, hide_labels
from fed_iotlm.data.preprocess import Standardizer
from fed_iotlm.data.reference import ReferenceSets, reference_sets
from fed_iotlm.evaluation import mean_reports, test_report
from fed_iotlm.experiment import model_spec, plan_by_node, train_config
from fed_iotlm.federation.bundle import save_bundle, statistics_meta
from fed_iotlm.federation.normalization import normalization_mode
from fed_iotlm.federation.records import load_into, state_to_numpy
from fed_iotlm.models.class_weights import (
    as_train_weights,
    balanced_weights,
    class_counts,
    class_weighting_mode,
    weights_block,
)
from fed_iotlm.models.device import train_placement
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.threads import with_train_threads
from fed_iotlm.models.training import (
    SplitTensors,
    TrainConfig,
    evaluate,
    mean_accuracy,
    mean_loss,
    train_local,
)
from fed_iotlm.protocol import protocol_record
from fed_iotlm.selection import InProcessSelection
from fed_iotlm.tracking import RunRecorder


@dataclass
class _LocalNode:
    """One node of the local-only baseline: its model, data and its view of the
    reference sets (standardised with ITS training statistics: it knows no others)."""

    model: MultisensoryModel
    train: SplitTensors
    own_test: SplitTensors
    val: SplitTensors
    test: SplitTensors
    tcfg: TrainConfig  # with the node's own class weights (train.class_weighting)


@with_train_threads  # train.threads, as each federated node
def run_local_only(cfg: dict, out_dir: Path) -> Path:
    """Each node trains alone on its own modalities; figures are means over nodes.

    ``select_round=best_val`` picks one round for every node, the one whose mean over the
    nodes of their validation macro-F1 is best: the figures stay means over nodes at one
    budget, as the federation's are at one round (a round per node would be another
    rule, and would favour local-only)."""
    selection = InProcessSelection(cfg)
    layout = build_layout(cfg)
    spec, tcfg = model_spec(cfg), train_config(cfg)
    per_site = normalization_mode(cfg) == "per_site"
    place = train_placement(cfg)  # train.device
    recorder = RunRecorder(cfg, out_dir, dataset=layout.dataset.meta.name, plan=plan_by_node(cfg))
    recorder.start()
    nodes = []
    weighted: dict[str, dict] = {}  # node -> its class weights block (balanced only)
    for i in range(layout.num_nodes):
        torch.manual_seed(int(cfg["seed"]) + i)
        raw = layout.node_raw(i)
        scaler = Standardizer.fit(raw.train)
        own = raw.standardized(scaler)
        refs = reference_sets(layout, None if per_site else scaler, normalization_mode(cfg))
        node_cfg, weighted[str(i)] = weighted_config(
            cfg, tcfg, spec.tasks, raw.train.y, f"node {i}"
        )
        nodes.append(
            _LocalNode(
                place.model(MultisensoryModel(spec)),
                *(
                    SplitTensors.from_split(s).placed(place)
                    for s in (own.train, own.test, refs.val, refs.test)
                ),
                node_cfg,
            )
        )
    if class_weighting_mode(cfg) == "balanced":
        recorder.extra["class_weighting"] = {
            "mode": "balanced",
            "counts_from": "local: each node's own labelled training samples",
            "by_node": weighted,
        }
    spent = []
    for rnd in range(1, int(cfg["rounds"]) + 1):
        accs, losses, vals, val_tasks = [], [], [], []
        for i, node in enumerate(nodes):
            spent.append(train_local(node.model, node.train, node.tcfg, seed=rnd * 10_007 + i))
            per_task = evaluate(node.model, node.test, layout.plan[i])
            accs.append(mean_accuracy(per_task))
            losses.append(mean_loss(per_task))
            val_tasks.append(evaluate(node.model, node.val, layout.plan[i]))
            vals.append(mean_accuracy(val_tasks[-1]))
        chosen_by = selection.round_metrics(val_tasks)
        recorder.log_round(
            rnd, float(np.mean(accs)), float(np.mean(losses)), val_accuracy=float(np.mean(vals)),
            **chosen_by,
        )  # fmt: skip
        selection.offer(rnd, chosen_by, lambda: [state_to_numpy(n.model) for n in nodes])
    selected_round, states = selection.chosen()
    for node, state in zip(nodes, states or [], strict=False):  # best_val: that round's
        load_into(node.model, state)
    report = mean_reports(
        [test_report(n.model, n.test, layout.plan[i]) for i, n in enumerate(nodes)]
    )
    val = mean_reports([test_report(n.model, n.val, layout.plan[i]) for i, n in enumerate(nodes)])
    by_node = {str(i): mean_accuracy(evaluate(n.model, n.own_test)) for i, n in enumerate(nodes)}
    model_bytes = sum(v.nbytes for v in state_to_numpy(nodes[0].model).values())
    recorder.extra.update(
        protocol_record(cfg, layout, [], budget=_budget(spent), selected_round=selected_round)
    )
    return recorder.finish(
        report,
        by_node,
        {"bytes_up_per_node_round": 0, "bytes_down_per_node_round": 0, "model_bytes": model_bytes},
        val=val,
    )


def weighted_config(
    cfg: dict, tcfg: TrainConfig, tasks: dict[str, int], y: dict[str, np.ndarray], where: str
) -> tuple[TrainConfig, dict | None]:
    """``tcfg`` with balanced class weights from the labels ``y`` (and the block
    results.json records), or ``tcfg`` unchanged and None under ``class_weighting=none``."""
    if class_weighting_mode(cfg) != "balanced":
        return tcfg, None
    counts = class_counts(y, tasks)
    weights = balanced_weights(counts, f"training data of {where}")
    block = weights_block(where, counts, weights)
    return replace(tcfg, class_weights=as_train_weights(weights)), block


def _budget(spent: list[dict]) -> dict:
    """Mean steps/examples per training call (per node per round) of a baseline."""
    return {
        "steps_per_node_round": float(np.mean([s["steps"] for s in spent])) if spent else None,
        "examples_per_node_round": float(np.mean([s["examples"] for s in spent]))
        if spent
        else None,
    }


def pooled_reference(cfg: dict, layout) -> tuple[Standardizer, ReferenceSets]:
    """The pooled training statistics (what the statistics round computes) and the
    reference sets standardised as ``normalization`` says."""
    scaler = layout.training_sums().standardizer()
    return scaler, reference_sets(layout, scaler, normalization_mode(cfg))


@with_train_threads  # train.threads, as each federated node
def run_centralized(cfg: dict, out_dir: Path) -> Path:
    """Upper bound: all training data pooled with every modality, one model.

    A round is ``epochs`` passes over the pooled data or, under ``train.steps``, the
    steps of all nodes together (``steps`` x nodes), as in centralized MMBind: the
    pooled model sees as many examples per round as the whole federation, so an
    equal-budget table does not starve the reference it is compared with."""
    selection = InProcessSelection(cfg)
    layout = build_layout(cfg)
    spec, tcfg = model_spec(cfg), train_config(cfg)
    tcfg = replace(tcfg, steps=None if tcfg.steps is None else tcfg.steps * layout.num_nodes)
    torch.manual_seed(int(cfg["seed"]))
    place = train_placement(cfg)  # train.device
    model = place.model(MultisensoryModel(spec))
    pooled = layout.dataset.train.subset(np.concatenate(layout.train_parts))
    pooled = hide_labels(pooled, layout.label_fraction, int(cfg["seed"]))
    scaler, refs = pooled_reference(cfg, layout)
    tcfg, weighted = weighted_config(cfg, tcfg, spec.tasks, pooled.y, "the pooled training data")
    train = SplitTensors.from_split(scaler.transform(pooled)).placed(place)
    test = SplitTensors.from_split(refs.test).placed(place)
    val = SplitTensors.from_split(refs.val).placed(place)
    recorder = RunRecorder(cfg, out_dir, dataset=layout.dataset.meta.name, plan=plan_by_node(cfg))
    recorder.start()
    if weighted is not None:
        recorder.extra["class_weighting"] = {**weighted, "counts_from": "pooled: every node's "
            "labelled training samples, at one place"}  # fmt: skip
    for rnd in range(1, int(cfg["rounds"]) + 1):
        done = train_local(model, train, tcfg, seed=rnd)
        per_task, val_task = evaluate(model, test), evaluate(model, val)
        chosen_by = selection.round_metrics([val_task])
        recorder.log_round(
            rnd, mean_accuracy(per_task), mean_loss(per_task),
            val_accuracy=mean_accuracy(val_task), **chosen_by,
            steps=done["steps"], examples=done["examples"],
        )  # fmt: skip
        selection.offer(rnd, chosen_by, lambda: state_to_numpy(model))
    selected_round, best_state = selection.chosen()
    if best_state is not None:  # best_val: every figure and the bundle are of that round
        load_into(model, best_state)
    by_node = {}
    for i in range(layout.num_nodes):
        _, own_test = layout.node_data(i, scaler)
        own = SplitTensors.from_split(own_test).placed(place)
        by_node[str(i)] = mean_accuracy(evaluate(model, own))
    state = state_to_numpy(model)
    save_bundle(
        out_dir / "bundle",
        state,
        spec,
        {
            "method": "centralized",
            "dataset": layout.dataset.meta.name,
            **({"selected_round": selected_round} if best_state is not None else {}),
            **statistics_meta(scaler),
        },
    )
    recorder.extra.update(
        protocol_record(cfg, layout, recorder.history, selected_round=selected_round)
    )
    return recorder.finish(
        test_report(model, test),
        by_node,
        {
            "bytes_up_per_node_round": 0,
            "bytes_down_per_node_round": 0,
            "model_bytes": sum(v.nbytes for v in state.values()),
        },
        val=test_report(model, val),
    )


@with_train_threads  # train.threads, as each federated node
def run_centralized_mmbind(cfg: dict, out_dir: Path) -> Path:
    """MMBind with everything at one place: the fair reference for ``method=mmbind``.

    The same encoders, matching and loss terms, at the same budget in samples seen, but
    without federation's constraints: SSL runs once on the pooled shared modality with
    one optimiser (``pretrain_rounds`` x ``pretrain_epochs`` passes, or the federation's
    SSL steps of all nodes together); pseudo-partners are raw samples that go through
    the live encoders (gradients reach both sides of a pair) instead of frozen tokens.
    Matching, re-binding cadence and per-binding pair accuracy are as in the federated
    run; a round is ``epochs`` passes over the pooled data (or ``steps`` per node x
    nodes)."""
    from fed_iotlm.binding.embeddings import node_embeddings, raw_partners
    from fed_iotlm.binding.matching import match_nodes
    from fed_iotlm.binding.ssl import pooled_modality, pretrain_shared
    from fed_iotlm.binding.stats import binding_stats
    from fed_iotlm.binding.training import BoundData, train_bound
    from fed_iotlm.experiment import (
        bind_train_config,
        match_config,
        shared_modality,
        ssl_config,
        ssl_train_config,
    )

    selection = InProcessSelection(cfg)
    layout = build_layout(cfg)
    spec, tcfg = model_spec(cfg), train_config(cfg)
    b = cfg["binding"]
    shared = shared_modality(cfg)
    torch.manual_seed(int(cfg["seed"]))
    model = MultisensoryModel(spec)
    scaler, refs = pooled_reference(cfg, layout)
    nodes = [layout.node_data(i, scaler) for i in range(layout.num_nodes)]
    trains = [SplitTensors.from_split(tr) for tr, _ in nodes]
    pooled_y = {t: np.concatenate([tr.y[t] for tr, _ in nodes]) for t in spec.tasks}
    tcfg, weighted = weighted_config(cfg, tcfg, spec.tasks, pooled_y, "the pooled training data")
    test, val = SplitTensors.from_split(refs.test), SplitTensors.from_split(refs.val)
    recorder = RunRecorder(cfg, out_dir, dataset=layout.dataset.meta.name, plan=plan_by_node(cfg))
    recorder.start()
    if weighted is not None:
        recorder.extra["class_weighting"] = {**weighted, "counts_from": "pooled: every node's "
            "labelled training samples, at one place"}  # fmt: skip
    n_nodes, ssl_rounds = layout.num_nodes, int(b["pretrain_rounds"])
    per_round = ssl_train_config(cfg, tcfg)  # one federated SSL round's budget at a node
    ssl_cfg = replace(
        per_round,
        epochs=ssl_rounds * per_round.epochs,
        steps=None if per_round.steps is None else per_round.steps * ssl_rounds * n_nodes,
    )
    ssl = ssl_config(cfg)
    recorder.extra["ssl"] = pretrain_shared(
        model, pooled_modality(trains, shared), shared, ssl_cfg, seed=7919, ssl=ssl
    )
    round_cfg = replace(tcfg, steps=None if tcfg.steps is None else tcfg.steps * n_nodes)
    mcfg, bcfg = match_config(cfg), bind_train_config(cfg)
    label_task = (
        (b["label_task"] or next(iter(layout.dataset.meta.tasks))) if b["use_labels"] else None
    )
    binding_log = recorder.extra.setdefault("binding", {})
    partners: list[dict] = [{} for _ in trains]
    for rnd in range(1, int(cfg["rounds"]) + 1):
        if b["bind"] and (rnd - 1) % max(1, int(b["rebind_every"])) == 0:
            uploads = [
                node_embeddings(model, d, shared, str(i), label_task) for i, d in enumerate(trains)
            ]
            matched = match_nodes(uploads, mcfg)
            stats = binding_stats(matched, [u.node for u in uploads], layout)
            binding_log[str(rnd)] = stats
            by_binding = binding_log.setdefault("pair_accuracy_by_binding", {})
            by_binding[str(rnd)] = stats.get("pair_accuracy", {})
            partners = [
                {m: raw_partners(p, len(d), trains) for m, p in matched[str(i)].items()}
                for i, d in enumerate(trains)
            ]
        sources = [BoundData(d, partners[i]) for i, d in enumerate(trains)]
        done = train_bound(sources, model, round_cfg, bcfg, seed=rnd * 10_007)
        per_task, val_task = evaluate(model, test), evaluate(model, val)
        chosen_by = selection.round_metrics([val_task])
        recorder.log_round(
            rnd, mean_accuracy(per_task), mean_loss(per_task),
            val_accuracy=mean_accuracy(val_task), **chosen_by,
            steps=done["steps"], examples=done["examples"],
        )  # fmt: skip
        selection.offer(rnd, chosen_by, lambda: state_to_numpy(model))
    selected_round, best_state = selection.chosen()
    if best_state is not None:  # best_val: every figure is of that round
        load_into(model, best_state)
    by_node = {
        str(i): mean_accuracy(evaluate(model, SplitTensors.from_split(te)))
        for i, (_, te) in enumerate(nodes)
    }
    recorder.extra.update(
        protocol_record(cfg, layout, recorder.history, selected_round=selected_round)
    )
    return recorder.finish(
        test_report(model, test),
        by_node,
        {"bytes_up_per_node_round": 0, "bytes_down_per_node_round": 0},
        val=test_report(model, val),
    )
