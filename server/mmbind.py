"""MMBind phases on a Flower Grid: shared-modality rounds, binding, multimodal rounds.

a. ``train.pretrain`` rounds: nodes holding the shared modality train its encoder and
   SSL head (:mod:`fed_iotlm.binding.ssl`), averaged over exactly those nodes.
b. ``query.embed``: every node uploads shared-modality embeddings and the tokens of
   the modalities it holds (never raw samples).
c. the server matches across nodes (:func:`fed_iotlm.binding.matching.match_nodes`).
d. ``train.bind``: each node receives its partners' tokens and pair weights.
e. multimodal rounds through the configured strategy; b-d repeat every
   ``binding.rebind_every`` rounds as the encoders improve (``binding.bind=false``:
   never, which is SSL pretraining + the spine, the baseline that isolates binding).

In simulation each binding's same-class pair accuracy goes to results.json as
``binding.pair_accuracy_by_binding`` (binding round -> task -> share).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed_iotlm.binding.matching import match_nodes
from fed_iotlm.binding.messages import pack_partners, unpack_upload
from fed_iotlm.binding.stats import binding_stats
from fed_iotlm.data.federation import FederationLayout
from fed_iotlm.experiment import match_config
from fed_iotlm.federation.aggregation import NodeUpdate, aggregate_groups
from fed_iotlm.federation.records import metrics_to_counts, numpy_to_record, record_to_numpy
from fed_iotlm.tracking import RunRecorder, console

from .participation import RoundOutcome
from .rounds import run_rounds


def _send(grid: Grid, node_ids: list[int], message_type: str, content: dict[int, RecordDict]):
    messages = [Message(content[n], dst_node_id=n, message_type=message_type) for n in node_ids]
    replies = list(grid.send_and_receive(messages))
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise RuntimeError(
            f"{message_type}: {len(failed)} node(s) failed: {failed[0].error.reason}"
        )
    return replies


def pretrain_rounds(
    grid: Grid,
    arrays: ArrayRecord,
    rounds: int,
    *,
    first: int = 1,
    on_round: Callable[[int, ArrayRecord], None] | None = None,
    secure_round: Callable[[int, ArrayRecord], ArrayRecord | None] | None = None,
) -> ArrayRecord:
    """Phase a: federated autoencoder rounds on the shared modality (``first``..``rounds``;
    ``on_round``, the checkpoint, after each).  ``secure_round`` (SecAgg+, a
    :class:`server.secure_rounds.SecureRounds` of phase ``pretrain``) sums the shared
    encoder and decoder instead, so no node's update or count reaches the server."""
    node_ids = list(grid.get_node_ids())
    state = record_to_numpy(arrays)
    for rnd in range(first, rounds + 1):
        if secure_round is not None:
            arrays = secure_round(rnd, arrays) or arrays
            console.print(f"[bold]shared-modality round {rnd}/{rounds}[/bold]  (SecAgg+)")
            if on_round is not None:
                on_round(rnd, arrays)
            continue
        content = {
            n: RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
            for n in node_ids
        }
        replies = _send(grid, node_ids, "train.pretrain", content)
        updates, losses = [], []
        for r in replies:
            metrics = r.content["metrics"]
            counts = metrics_to_counts(metrics)
            if counts:
                losses.append(float(metrics["pretrain_loss"]))
                pid = str(int(metrics["partition-id"]))
                updates.append(NodeUpdate(pid, record_to_numpy(r.content["arrays"]), counts))
        updates.sort(key=lambda u: int(u.node))  # reply order varies; the sums must not
        state = aggregate_groups(state, updates).state
        arrays = numpy_to_record(state)
        console.print(
            f"[bold]shared-modality round {rnd}/{rounds}[/bold]  SSL loss "
            f"{np.mean(losses) if losses else float('nan'):.3f}  ({len(updates)} nodes)"
        )
        if on_round is not None:
            on_round(rnd, arrays)
    return arrays


def bind(
    grid: Grid,
    arrays: ArrayRecord,
    cfg: dict,
    rnd: int,
    layout: FederationLayout | None,
    delivered: dict[str, ArrayRecord] | None = None,
) -> dict:
    """Phases b-d; returns binding statistics (pair accuracy where the server can check it).

    ``delivered`` (the checkpoint's) is refilled with partition id -> partners sent."""
    node_ids = list(grid.get_node_ids())
    content = {
        n: RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
        for n in node_ids
    }
    replies = _send(grid, node_ids, "query.embed", content)
    uploads, dst = [], {}
    for r in replies:
        config = r.content["config"]
        pid = str(int(config["partition-id"]))
        uploads.append(unpack_upload(pid, r.content["embeddings"], config, list(config["held"])))
        dst[pid] = r.metadata.src_node_id
    uploads.sort(key=lambda u: int(u.node))
    partners = match_nodes(uploads, match_config(cfg))
    packed = {pid: pack_partners(p) for pid, p in partners.items()}
    deliveries = {dst[pid]: RecordDict({"partners": rec}) for pid, rec in packed.items()}
    _send(grid, list(deliveries), "train.bind", deliveries)
    if delivered is not None:
        delivered.clear()
        delivered.update(packed)
    stats = binding_stats(partners, [u.node for u in uploads], layout)
    console.print(
        f"[bold]binding @ round {rnd}[/bold]  pairs {stats['pairs']}  refused {stats['refused']}"
        f"  mean similarity {stats['mean_similarity']:.3f}"
        + "".join(
            f"  pair accuracy ({t}) {a:.3f}" for t, a in stats.get("pair_accuracy", {}).items()
        )
    )
    return stats


def multimodal_rounds(
    grid: Grid,
    strategy: FedAvg,
    arrays: ArrayRecord,
    cfg: dict,
    evaluate_fn: Callable[[int, ArrayRecord], object],
    recorder: RunRecorder,
    layout: FederationLayout | None,
    *,
    first: int = 1,
    on_round: Callable[[int, ArrayRecord], None] | None = None,
    partners: dict[str, ArrayRecord] | None = None,
    node_ids: dict[int, int] | None = None,
    train_round: Callable[[int, ArrayRecord], ArrayRecord | None] | None = None,
    timeout: float = 3600.0,
    outcomes: dict[int, RoundOutcome] | None = None,
) -> ArrayRecord:
    """Phase e with re-binding every K rounds; the strategy aggregates as in the spine.

    A resumed run (``first`` > 1) between two bindings first gives every node back the
    partners of the last binding (``partners``, by partition id; ``node_ids`` maps
    partition ids to this run's Flower node ids), which the node kept in its state.
    ``timeout`` and ``outcomes``: the round deadline and its record (:func:`run_rounds`);
    the binding phases still need every node to answer."""
    every = max(1, int(cfg["binding"]["rebind_every"]))
    binds = bool(cfg["binding"].get("bind", True))  # false: SSL + the spine, no binding
    binding_log = recorder.extra.setdefault("binding", {})
    if binds and first > 1 and (first - 1) % every != 0 and partners:
        redeliver(grid, partners, node_ids or {})

    def rebind(rnd: int, arrays: ArrayRecord) -> None:
        if binds and (rnd - 1) % every == 0:
            binding_log[str(rnd)] = stats = bind(grid, arrays, cfg, rnd, layout, partners)
            if "pair_accuracy" in stats:  # simulation only: the truth is known
                by_binding = binding_log.setdefault("pair_accuracy_by_binding", {})
                by_binding[str(rnd)] = stats["pair_accuracy"]

    return run_rounds(
        grid, strategy, arrays, first=first, last=int(cfg["rounds"]),
        evaluate_fn=evaluate_fn, on_round=on_round, before_round=rebind,
        train_round=train_round,
        timeout=timeout, outcomes=outcomes,
    )  # fmt: skip


def redeliver(grid: Grid, partners: dict[str, ArrayRecord], node_ids: dict[int, int]) -> None:
    """Send each node the partners it was sent at the last binding (``train.bind``)."""
    missing = sorted(int(p) for p in partners if int(p) not in node_ids)
    if missing:
        raise RuntimeError(f"cannot re-deliver MMBind partners: no node has partition-id {missing}")
    deliveries = {
        node_ids[int(pid)]: RecordDict({"partners": rec}) for pid, rec in partners.items()
    }
    _send(grid, list(deliveries), "train.bind", deliveries)
    console.print(f"re-delivered the last binding's partners to {len(deliveries)} node(s)")
