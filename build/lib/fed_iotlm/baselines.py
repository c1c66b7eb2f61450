"""Non-federated reference points in the same harness: local-only and centralized.

Both spend the same optimisation budget as a federated run (``rounds`` × ``epochs``
passes over the data a model sees) and report through the same :class:`RunRecorder`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fed_iotlm.data.federation import build_layout, hide_labels
from fed_iotlm.data.preprocess import standardize_own
from fed_iotlm.evaluation import mean_reports, test_report
from fed_iotlm.experiment import model_spec, plan_by_node, train_config
from fed_iotlm.federation.bundle import save_bundle
from fed_iotlm.federation.records import state_to_numpy
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import (
    SplitTensors,
    evaluate,
    mean_accuracy,
    mean_loss,
    train_local,
)
from fed_iotlm.tracking import RunRecorder


def run_local_only(cfg: dict, out_dir: Path) -> Path:
    """Each node trains alone on its own modalities; figures are means over nodes."""
    layout = build_layout(cfg)
    spec, tcfg = model_spec(cfg), train_config(cfg)
    test = SplitTensors.from_split(standardize_own(layout.dataset.test))
    recorder = RunRecorder(cfg, out_dir, dataset=layout.dataset.meta.name, plan=plan_by_node(cfg))
    recorder.start()
    nodes = []
    for i in range(layout.num_nodes):
        torch.manual_seed(int(cfg["seed"]) + i)
        train, own_test = layout.node_data(i)
        nodes.append(
            (
                MultisensoryModel(spec),
                SplitTensors.from_split(train),
                SplitTensors.from_split(own_test),
            )
        )
    for rnd in range(1, int(cfg["rounds"]) + 1):
        accs, losses = [], []
        for i, (model, train, _) in enumerate(nodes):
            train_local(model, train, tcfg, seed=rnd * 10_007 + i)
            per_task = evaluate(model, test, layout.plan[i])
            accs.append(mean_accuracy(per_task))
            losses.append(mean_loss(per_task))
        recorder.log_round(rnd, float(np.mean(accs)), float(np.mean(losses)))
    reports = [test_report(m, test, layout.plan[i]) for i, (m, _, _) in enumerate(nodes)]
    by_node = {str(i): mean_accuracy(evaluate(m, t)) for i, (m, _, t) in enumerate(nodes)}
    model_bytes = sum(v.nbytes for v in state_to_numpy(nodes[0][0]).values())
    return recorder.finish(
        mean_reports(reports),
        by_node,
        {"bytes_up_per_node_round": 0, "bytes_down_per_node_round": 0, "model_bytes": model_bytes},
    )


def run_centralized(cfg: dict, out_dir: Path) -> Path:
    """Upper bound: all training data pooled with every modality, one model."""
    layout = build_layout(cfg)
    spec, tcfg = model_spec(cfg), train_config(cfg)
    torch.manual_seed(int(cfg["seed"]))
    model = MultisensoryModel(spec)
    pooled = layout.dataset.train.subset(np.concatenate(layout.train_parts))
    pooled = hide_labels(pooled, layout.label_fraction, int(cfg["seed"]))
    train = SplitTensors.from_split(standardize_own(pooled))
    test = SplitTensors.from_split(standardize_own(layout.dataset.test))
    recorder = RunRecorder(cfg, out_dir, dataset=layout.dataset.meta.name, plan=plan_by_node(cfg))
    recorder.start()
    for rnd in range(1, int(cfg["rounds"]) + 1):
        train_local(model, train, tcfg, seed=rnd)
        per_task = evaluate(model, test)
        recorder.log_round(rnd, mean_accuracy(per_task), mean_loss(per_task))
    by_node = {}
    for i in range(layout.num_nodes):
        _, own_test = layout.node_data(i)
        by_node[str(i)] = mean_accuracy(evaluate(model, SplitTensors.from_split(own_test)))
    state = state_to_numpy(model)
    save_bundle(
        out_dir / "bundle",
        state,
        spec,
        {"method": "centralized", "dataset": layout.dataset.meta.name},
    )
    return recorder.finish(
        test_report(model, test),
        by_node,
        {
            "bytes_up_per_node_round": 0,
            "bytes_down_per_node_round": 0,
            "model_bytes": sum(v.nbytes for v in state.values()),
        },
    )


def run_centralized_mmbind(cfg: dict, out_dir: Path) -> Path:
    """MMBind with the embeddings pooled at one place: the same encoders, SSL rounds,
    matching and pseudo-pair training as ``method=mmbind``, without federation (one
    model, one optimiser, batches of all nodes' data shuffled together).  The gap to
    ``mmbind`` is the cost of federating it."""
    from fed_iotlm.binding.embeddings import align_partners, node_embeddings
    from fed_iotlm.binding.matching import match_nodes
    from fed_iotlm.binding.training import BoundData, pretrain_shared, train_bound
    from fed_iotlm.experiment import bind_train_config, match_config, shared_modality

    layout = build_layout(cfg)
    spec, tcfg = model_spec(cfg), train_config(cfg)
    b = cfg["binding"]
    shared = shared_modality(cfg)
    torch.manual_seed(int(cfg["seed"]))
    model = MultisensoryModel(spec)
    nodes = [layout.node_data(i) for i in range(layout.num_nodes)]
    trains = [SplitTensors.from_split(tr) for tr, _ in nodes]
    test = SplitTensors.from_split(standardize_own(layout.dataset.test))
    recorder = RunRecorder(cfg, out_dir, dataset=layout.dataset.meta.name, plan=plan_by_node(cfg))
    recorder.start()
    ssl_cfg = replace(tcfg, epochs=int(b["pretrain_epochs"]))
    for rnd in range(1, int(b["pretrain_rounds"]) + 1):
        for i, data in enumerate(trains):
            pretrain_shared(model, data, shared, ssl_cfg, seed=rnd * 7919 + i, method=b["ssl"])
    mcfg, bcfg = match_config(cfg), bind_train_config(cfg)
    label_task = (
        (b.get("label_task") or next(iter(layout.dataset.meta.tasks))) if b["use_labels"] else None
    )
    partners: list[dict] = [{} for _ in trains]
    for rnd in range(1, int(cfg["rounds"]) + 1):
        if (rnd - 1) % max(1, int(b["rebind_every"])) == 0:
            uploads = [
                node_embeddings(model, d, shared, str(i), label_task) for i, d in enumerate(trains)
            ]
            matched = match_nodes(uploads, mcfg)
            partners = [
                align_partners(
                    len(d),
                    {m: (p.query_ids, p.embeddings, p.weight) for m, p in matched[str(i)].items()},
                )
                for i, d in enumerate(trains)
            ]
        sources = [BoundData(d, partners[i]) for i, d in enumerate(trains)]
        train_bound(sources, model, tcfg, bcfg, seed=rnd * 10_007)
        per_task = evaluate(model, test)
        recorder.log_round(rnd, mean_accuracy(per_task), mean_loss(per_task))
    by_node = {
        str(i): mean_accuracy(evaluate(model, SplitTensors.from_split(te)))
        for i, (_, te) in enumerate(nodes)
    }
    return recorder.finish(
        test_report(model, test),
        by_node,
        {"bytes_up_per_node_round": 0, "bytes_down_per_node_round": 0},
    )
