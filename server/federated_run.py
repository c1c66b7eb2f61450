"""One federated run on a Grid: strategy rounds, per-round test, node evaluation, outputs."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fed_iotlm.config_schema import GRID_METHODS, block
from fed_iotlm.data.federation import build_layout
from fed_iotlm.data.reference import reference_sets
from fed_iotlm.diagnostics import diagnostics_config, run_diagnostics
from fed_iotlm.evaluation import test_report
from fed_iotlm.experiment import check_method, model_spec
from fed_iotlm.federation.adapter_sync import sync_meta
from fed_iotlm.federation.bundle import save_bundle, statistics_meta
from fed_iotlm.federation.checkpoint import rng_untouched
from fed_iotlm.federation.class_balance import weights_record
from fed_iotlm.federation.normalization import norm_record, normalization_mode
from fed_iotlm.federation.privacy import attach_privacy, dp_config, privacy_report
from fed_iotlm.federation.records import (
    load_into,
    numpy_to_record,
    record_nbytes,
    record_to_numpy,
    state_to_numpy,
)
from fed_iotlm.federation.round_record import (
    PRETRAIN,
    TRAIN,
    RoundRecord,
    communication_totals,
    releases_of,
    results_blocks,
    robustness_block,
    withheld_by_round,
)
from fed_iotlm.federation.run_model import sync_model
from fed_iotlm.federation.secure import SecureSettings, check_composable
from fed_iotlm.federation.secure_statistics import StatsLayout, channel_shape
from fed_iotlm.federation.strategy import ModalityAwareFedAvg, build_strategy
from fed_iotlm.models.class_weights import balanced_weights, class_weighting_mode, weights_block
from fed_iotlm.models.device import train_placement
from fed_iotlm.models.training import (
    SplitTensors,
    evaluate,
    mean_accuracy,
    mean_loss,
    mean_metric,
)
from fed_iotlm.protocol import protocol_record
from fed_iotlm.selection import BEST_VAL, SCORE, BestRound, select_round_mode
from fed_iotlm.tracking import RunRecorder

from .engine import RoundEngine, StrategyStep
from .llm_uploads import collect_enabled, collect_uploads
from .mmbind import pretrain_step, rebinder, redeliver_on_resume, secure_pretrain_step
from .node_evaluation import SERVER, evaluate_on_nodes, evaluation_mode
from .participation import round_timeout_s
from .resume import ServerCheckpointer
from .roster import LiveNodesGrid, LiveRoster, identify_nodes
from .secure_rounds import SecureRounds
from .statistics import (
    STATISTICS_TIMEOUT_S,
    StatisticsGrid,
    gather_statistics,
    secure_statistics_round,
)

log = logging.getLogger(__name__)


def default_out_dir(cfg: dict) -> Path:
    return Path(cfg.get("output_dir") or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg['method']}")


def run_federated(grid: Grid, cfg: dict, out_dir: Path) -> Path:
    """Run ``cfg['rounds']`` rounds of the configured strategy; returns results.json's path."""
    method = check_method(cfg)
    if method not in GRID_METHODS:
        raise ValueError(f"method={method!r} does not run on a Flower Grid")
    select = select_round_mode(cfg)  # a bad value fails before any node is contacted
    seed_everything(int(cfg["seed"]))
    layout = build_layout(cfg)
    spec = model_spec(cfg)
    place = train_placement(cfg)  # the server's evaluation follows train.device too
    model = place.model(sync_model(cfg, spec))  # sync.mode=adapters: frozen encoders + adapters
    initial = numpy_to_record(state_to_numpy(model))
    wait_s = float(block(cfg, "strategy")["wait_for_nodes_s"])
    round_timeout = round_timeout_s(cfg["strategy"])
    wait_for_nodes(grid, layout.num_nodes, wait_s)
    roster = identify_nodes(grid, layout.num_nodes)  # deployed sites report their own plan
    # input statistics from the nodes' training data; every later message carries them
    stats_withheld: list[str] = []  # SecAgg+: modalities with too few holders
    balance: dict = {}  # train.class_weighting=balanced: the global counts and weights
    grid, scaler = pooled_statistics(
        grid, cfg, roster.node_ids.values(), round_timeout, layout, stats_withheld, balance
    )
    # deployed sites: the config's dataset is not their data, so the nodes score each round
    where = evaluation_mode(cfg, roster.deployed)
    test = val = None
    if where == SERVER:
        refs = reference_sets(layout, scaler, normalization_mode(cfg))
        test = SplitTensors.from_split(refs.test).placed(place)
        val = SplitTensors.from_split(refs.val).placed(place)
        if select == BEST_VAL and len(val) == 0:
            raise ValueError(
                "select_round=best_val needs validation samples, and the validation "
                "reference set is empty (partition.val_fraction=0 and no val.npz)"
            )
    # sites that die and come back (maybe under a new node id) are picked up per round
    live = LiveRoster(roster, layout.num_nodes, identify_timeout_s=round_timeout, wait_s=wait_s)
    strategy = build_strategy(
        "fedavg" if method == "fedavg" else "federated", cfg["strategy"], layout.num_nodes
    )
    attach_privacy(strategy, cfg, layout.num_nodes)  # dp.enabled: clipping + noise + accountant
    secure = check_composable(cfg)  # SecAgg+: the server learns only sums
    secure_rounds = (
        SecureRounds(grid, secure, cfg["strategy"], layout.num_nodes, dp=dp_config(cfg))
        if secure.enabled
        else None
    )
    recorder = RunRecorder(cfg, out_dir, dataset=layout.dataset.meta.name, plan=roster.plan)
    checkpointer = ServerCheckpointer(cfg, out_dir, strategy)
    if balance:
        recorder.extra["class_weighting"] = balance

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> dict[str, float]:
        """The round's evaluation: on the server's reference sets, or (evaluation=nodes)
        each node on its own test split, weighted."""
        if test is None:
            live_grid = LiveNodesGrid(grid, live.refresh(grid, rnd))
            nodes = evaluate_on_nodes(live_grid, arrays, round_timeout, rnd)
            scored = nodes.weighted()
            out = {
                "accuracy": scored["accuracy"],
                "loss": scored["loss"],
                "val_accuracy": nodes.val_accuracy(),
                "evaluated_nodes": float(scored["nodes"]),
            }
            if select == BEST_VAL:  # the nodes' own validation shares, weighted
                out[SCORE] = nodes.weighted_val_metric(SCORE)
            return out
        load_into(model, record_to_numpy(arrays))
        per_task, val_task = evaluate(model, test), evaluate(model, val)
        out = {
            "accuracy": mean_accuracy(per_task),
            "loss": mean_loss(per_task),
            "val_accuracy": mean_accuracy(val_task),
        }
        if select == BEST_VAL:  # only then: select_round=last keeps its history as it was
            out[SCORE] = mean_metric(val_task, "f1_macro")
        return out

    resumed = checkpointer.restore()  # resume=true: the state after the last saved round
    # after the checkpoint's checks (a refused resume leaves its MLflow run as it was),
    # without moving the RNG states restore() just put back
    with rng_untouched():
        recorder.start(resume_id=resumed.mlflow_run if resumed else None)
    arrays = resumed.arrays if resumed else initial
    records: list[RoundRecord] = resumed.records if resumed else []  # the run's rounds
    recorder.restore(records)  # resumed: its rounds, logged where the MLflow run lacks them
    # select_round=best_val: the best training round so far and its model (checkpointed)
    best: BestRound[ArrayRecord] = resumed.best if resumed else BestRound()

    def on_record(record: RoundRecord) -> None:
        if select == BEST_VAL and record.phase == TRAIN:
            best.offer(record.round, record.metrics[SCORE], lambda: record.arrays)
        # checkpoint first: a crash before the metrics are logged leaves the round to
        # recorder.restore() on resume, not to be run and logged again
        checkpointer.save(records, mlflow_run=recorder.run_id, best=best)
        if record.phase == TRAIN:
            recorder.log_record(record)

    first = resumed.next_round(TRAIN, int(cfg["rounds"])) if resumed else 1
    train_step = secure_rounds or StrategyStep(
        grid, strategy, round_timeout, roster=None if method == "mmbind" else live
    )
    engine = RoundEngine(
        TRAIN, train_step, records, evaluate=evaluate_fn, on_record=on_record, roster=live
    )
    if method == "mmbind":
        pretrain = int(cfg["binding"]["pretrain_rounds"])
        step = (
            secure_pretrain_step(
                SecureRounds(grid, secure, cfg["strategy"], layout.num_nodes, phase="pretrain"),
                pretrain,
            )
            if secure.enabled
            else pretrain_step(grid, pretrain)
        )
        arrays = RoundEngine(
            PRETRAIN, step, records, on_record=on_record, label="SHARED-MODALITY ROUND"
        ).run(arrays, resumed.next_round(PRETRAIN, pretrain) if resumed else 1, pretrain)
        sites = None if roster.deployed else layout  # sites' data: no ground truth here
        redeliver_on_resume(grid, cfg, first, checkpointer.partners, roster.node_ids)
        engine.before_round = rebinder(grid, cfg, sites, checkpointer.partners)
    arrays = engine.run(arrays, first, int(cfg["rounds"]))
    selected_round = int(cfg["rounds"])  # select_round=last: the model after the last round
    if select == BEST_VAL:  # every figure and the bundle from here on are of that round
        selected_round, arrays = best.chosen()
        log.info("select_round=best_val: round %s (%s %.4f)", selected_round, SCORE, best.score)
    final = record_to_numpy(arrays)
    load_into(model, final)
    final_grid = LiveNodesGrid(grid, live.refresh(grid))  # one live node per partition
    node_scores = evaluate_on_nodes(final_grid, arrays, timeout=round_timeout)
    node_accuracy = node_scores.accuracy_by_node()
    # deployed: only what the nodes measured on their own data; simulation: the server's
    # copy of the test split, with single-modality accuracies
    report = node_scores.weighted() if test is None else test_report(model, test)
    for key in ("f1_macro", "balanced_accuracy"):  # beside test.accuracy_by_node
        report[f"{key}_by_node"] = node_scores.metric_by_node(key)
    val_report = node_scores.weighted_val() if test is None else test_report(model, val)
    recorder.extra["evaluation"] = where
    comm = communication(strategy, initial, records)
    save_bundle(
        out_dir / "bundle",
        final,
        spec,
        {
            "method": method,
            "dataset": layout.dataset.meta.name,
            "rounds": int(cfg["rounds"]),
            **({"selected_round": selected_round} if select == BEST_VAL else {}),
            **sync_meta(cfg),
            **statistics_meta(scaler),
        },
    )
    if collect_enabled(cfg):  # llm.upload.collect: the LM stage's tokens, over Flower
        recorder.extra["llm_uploads"] = collect_uploads(
            final_grid, arrays, layout.dataset.meta, layout.num_nodes, out_dir, round_timeout
        )
    if diagnostics_config(cfg).enabled:  # domain-shift diagnostics (off by default)
        recorder.extra["diagnostics"] = run_diagnostics(
            cfg, layout, spec, before=record_to_numpy(initial), after=final, scaler=scaler
        )
    # every per-round block of results.json comes from the round records
    recorder.extra.update(results_blocks(records, binding=method == "mmbind"))
    if late := live.take_rejoins():  # sites that rejoined for the final evaluation
        recorder.extra["rejoined"] = [*recorder.extra.get("rejoined", []), *late]
    if isinstance(strategy, ModalityAwareFedAvg):
        recorder.extra["robustness"] = robustness_block(
            records, asdict(strategy.robust), asdict(strategy.checks)
        )
    if secure_rounds is not None:  # what SecAgg+ hid, and what it did not release
        recorder.extra["secagg"] = {
            "plan": "hidden: nodes report liveness only",
            "min_holders": int(secure.min_holders),
            "withheld_by_round": withheld_by_round(records),
            "statistics_withheld": stats_withheld,  # no pooled statistics: raw scale
        }
    if secure_rounds is not None and (privacy := secure_rounds.privacy_report(records)):
        recorder.extra["privacy"] = privacy
    if (privacy := privacy_report(strategy, releases_of(records))) is not None:
        recorder.extra["privacy"] = privacy
    recorder.extra.update(
        protocol_record(cfg, layout, recorder.history, selected_round=selected_round)
    )
    return recorder.finish(report, node_accuracy, comm, val=val_report)


def pooled_statistics(
    grid: Grid,
    cfg: dict,
    node_ids,
    timeout: float,
    layout,
    withheld: list[str],
    balance: dict | None = None,
):
    """``normalization=federated``: the statistics round (under SecAgg+ with
    ``secagg.enabled``; modalities it did not release are appended to ``withheld``), and
    a Grid that attaches its result to every later message; ``per_site``: the Grid as
    it is, no statistics.  ``train.class_weighting=balanced``: the same round sums the
    nodes' class counts; the weights travel with every later message and ``balance``
    receives what results.json records."""
    balanced = class_weighting_mode(cfg) == "balanced"
    if normalization_mode(cfg) != "federated":
        if balanced:
            raise ValueError(
                "train.class_weighting=balanced needs normalization=federated: the global "
                "class counts are summed by the statistics round, which per_site skips"
            )
        return grid, None
    secure = SecureSettings.from_config(cfg)
    tasks = {t: s.num_classes for t, s in layout.dataset.meta.tasks.items()}
    if secure.enabled:  # one SecAgg+ sum: no node's sums reach the server
        shapes = training_channel_shapes(layout)
        stats_layout = StatsLayout.of(shapes, secure, tasks if balanced else None)
        found = secure_statistics_round(grid, stats_layout, secure, len(list(node_ids)))
        if found.withheld:
            withheld.extend(found.withheld)
        scaler, counts = found.scaler, found.class_counts
    else:
        # every node must answer, cold ClientApp starts included: the roll call's patience
        wait = max(timeout, STATISTICS_TIMEOUT_S)
        sums, counts = gather_statistics(grid, node_ids, wait, class_counts=balanced)
        scaler = sums.standardizer()
    weights = None
    if balanced:
        counts = {t: counts.get(t, np.zeros(k, np.int64)) for t, k in tasks.items()}
        by_task = balanced_weights(counts, "federation's training data (summed over nodes)")
        weights = weights_record(by_task)
        if balance is not None:
            how = GLOBAL_COUNTS + (
                " under SecAgg+ (the server saw only the sum)" if secure.enabled else ""
            )
            balance.update(weights_block(how, counts, by_task))
    return StatisticsGrid(grid, norm_record(scaler), weights), scaler


GLOBAL_COUNTS = "global: every node's labelled training samples, summed by the statistics round"


def training_channel_shapes(layout) -> dict[str, tuple[int, ...]]:
    """Per-channel statistics shape of every modality of the federation (public: the
    model's input layout), from the featurized training data the server's config builds."""
    return {m: channel_shape(arr) for m, arr in layout.dataset.train.x.items()}


def seed_everything(seed: int) -> None:
    """Seed every generator the server draws from (the model's initialisation; Python's
    ``random`` for flwr's node sampling), so a run, and its resumption, is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> None:
    """Fail clearly unless exactly ``expected`` nodes connect within ``timeout_s``.

    More nodes than the plan has would raise on every round at the extra nodes; fewer
    would make the strategy wait forever.  Both are a configuration error.
    """
    hint = (
        "set partition.num_nodes (or the length of partition.plan) to the number of "
        "SuperNodes (flwr run: --federation-config 'num-supernodes=N')"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected > expected:
            raise RuntimeError(f"{connected} nodes connected but the plan has {expected}: {hint}")
        if connected == expected:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {connected} of {expected} nodes connected after {timeout_s:.0f}s: {hint}"
            )
        time.sleep(1.0)  # nodes are still connecting; polling the Grid is all it offers


def evaluate_nodes(grid: Grid, arrays: ArrayRecord, timeout: float = 3600) -> dict[str, float]:
    """Each node's accuracy on its own test split with its own modalities, by partition
    id (:func:`server.node_evaluation.evaluate_on_nodes`)."""
    return evaluate_on_nodes(grid, arrays, timeout).accuracy_by_node()


def communication(strategy, initial: ArrayRecord, records: list[RoundRecord]) -> dict:
    """Payload bytes per node per round, as the round records measured them (the
    modality-aware strategies' plaintext rounds; else the full model each way)."""
    full = record_nbytes(initial)
    c = communication_totals(records)
    if isinstance(strategy, ModalityAwareFedAvg) and c["messages_up"]:
        return {
            "bytes_up_per_node_round": int(c["bytes_up"] / c["messages_up"]),
            "bytes_down_per_node_round": int(c["bytes_down"] / max(c["messages_down"], 1)),
            "model_bytes": full,
        }
    return {"bytes_up_per_node_round": full, "bytes_down_per_node_round": full, "model_bytes": full}
