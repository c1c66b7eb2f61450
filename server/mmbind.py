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

Phases a and e run on the round engine (:mod:`server.engine`): :func:`pretrain_step` is
phase a's step, :func:`rebinder` phase e's ``before_round``.  Each binding's statistics
go into the record of the round it preceded; in simulation its same-class pair
accuracy reaches results.json as ``binding.pair_accuracy_by_binding`` (binding round ->
task -> share).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fed_iotlm.binding.matching import match_nodes
from fed_iotlm.binding.messages import pack_partners, unpack_upload
from fed_iotlm.binding.stats import binding_stats
from fed_iotlm.data.federation import FederationLayout
from fed_iotlm.experiment import match_config
from fed_iotlm.federation.aggregation import NodeUpdate, aggregate_groups
from fed_iotlm.federation.records import metrics_to_counts, numpy_to_record, record_to_numpy
from fed_iotlm.federation.round_record import RoundRecord, StepResult

from .secure_rounds import SecureRounds

log = logging.getLogger(__name__)


def _send(grid: Grid, node_ids: list[int], message_type: str, content: dict[int, RecordDict]):
    messages = [Message(content[n], dst_node_id=n, message_type=message_type) for n in node_ids]
    replies = list(grid.send_and_receive(messages))
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise RuntimeError(
            f"{message_type}: {len(failed)} node(s) failed: {failed[0].error.reason}"
        )
    return replies


def pretrain_step(grid: Grid, rounds: int):
    """Phase a as a round engine step (:mod:`server.engine`): nodes holding the shared
    modality train its autoencoder, averaged per group over exactly those nodes."""

    def step(rnd: int, arrays: ArrayRecord, records: Sequence[RoundRecord]) -> StepResult:
        node_ids = list(grid.get_node_ids())
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
        result = aggregate_groups(record_to_numpy(arrays), updates)
        loss = float(np.mean(losses)) if losses else float("nan")
        log.info(
            "shared-modality round %s/%s: SSL loss %.3f (%s nodes)", rnd, rounds, loss, len(updates)
        )
        return StepResult(
            numpy_to_record(result.state),
            holders=result.holders,
            metrics={"pretrain_loss": loss, "nodes": float(len(updates))},
        )

    return step


def secure_pretrain_step(secure: SecureRounds, rounds: int):
    """Phase a under SecAgg+: the shared encoder and decoder are summed, so no node's
    update or count reaches the server (``secure`` is of phase ``pretrain``)."""

    def step(rnd: int, arrays: ArrayRecord, records: Sequence[RoundRecord]) -> StepResult:
        result = secure(rnd, arrays, records)
        log.info("shared-modality round %s/%s (SecAgg+)", rnd, rounds)
        return result

    return step


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
    similarity = stats["mean_similarity"]
    log.info(
        f"binding @ round {rnd}: pairs {stats['pairs']}  refused {stats['refused']}"
        + (f"  mean similarity {similarity:.3f}" if similarity is not None else "  (no pairs)")
        + "".join(
            f"  pair accuracy ({t}) {a:.3f}" for t, a in stats.get("pair_accuracy", {}).items()
        )
    )
    return stats


def rebinder(
    grid: Grid,
    cfg: dict,
    layout: FederationLayout | None,
    partners: dict[str, ArrayRecord] | None = None,
):
    """Phase e's ``before_round`` for the round engine: phases b-d every
    ``binding.rebind_every`` rounds as the encoders improve (``binding.bind=false``:
    never, which is SSL pretraining + the spine, the baseline that isolates binding).
    It returns the binding's statistics, which go into that round's record."""
    every = max(1, int(cfg["binding"]["rebind_every"]))
    binds = bool(cfg["binding"]["bind"])

    def before_round(rnd: int, arrays: ArrayRecord) -> dict | None:
        if binds and (rnd - 1) % every == 0:
            return bind(grid, arrays, cfg, rnd, layout, partners)
        return None

    return before_round


def redeliver_on_resume(
    grid: Grid,
    cfg: dict,
    first: int,
    partners: dict[str, ArrayRecord],
    node_ids: dict[int, int],
) -> None:
    """A resumed run (``first`` > 1) between two bindings first gives every node back
    the partners of the last binding (``partners``, by partition id; ``node_ids`` maps
    partition ids to this run's Flower node ids), which the node kept in its state."""
    every = max(1, int(cfg["binding"]["rebind_every"]))
    binds = bool(cfg["binding"]["bind"])
    if binds and first > 1 and (first - 1) % every != 0 and partners:
        redeliver(grid, partners, node_ids)


def redeliver(grid: Grid, partners: dict[str, ArrayRecord], node_ids: dict[int, int]) -> None:
    """Send each node the partners it was sent at the last binding (``train.bind``)."""
    missing = sorted(int(p) for p in partners if int(p) not in node_ids)
    if missing:
        raise RuntimeError(f"cannot re-deliver MMBind partners: no node has partition-id {missing}")
    deliveries = {
        node_ids[int(pid)]: RecordDict({"partners": rec}) for pid, rec in partners.items()
    }
    _send(grid, list(deliveries), "train.bind", deliveries)
    log.info("re-delivered the last binding's partners to %s node(s)", len(deliveries))
