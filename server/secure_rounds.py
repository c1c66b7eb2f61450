"""Training rounds under SecAgg+: the server learns only the sum of Σ-ready vectors.

Flower's ``SecAggPlusWorkflow`` drives the protocol (setup, key sharing, masked vectors,
unmasking, dropouts) over the Grid; it speaks the legacy Strategy interface, so
:class:`_SumCollector` is the smallest legacy strategy that samples the nodes and keeps
the unmasked aggregate.  The workflow hands that aggregate to ``aggregate_fit`` as the
mean of the submitted vectors (every node reports the same public weight, so no sample
count leaks through it); times the number of nodes it is the sum, which
:meth:`SumLayout.decode` turns into group-wise FedAvg (:mod:`fed_iotlm.federation.secure`).

Each round is two SecAgg+ sums: a census of holder flags (no model goes down, no update
comes up), then the round itself, in which nodes submit only the groups the census
found held by at least ``secagg.min_holders`` nodes.  ``phase`` says which local step
the nodes run: ``train`` (the multimodal round) or ``pretrain`` (MMBind's shared-modality
round).  Each round returns a :class:`~fed_iotlm.federation.round_record.StepResult`:
how many nodes were summed (``stats``), which groups were not released (``withheld``)
and, under ``dp.mode=distributed``, the release the accountant composes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fed_iotlm.config_schema import section
from fed_iotlm.federation.groups import group_of
from fed_iotlm.federation.privacy import CentralPrivacy, DPConfig
from fed_iotlm.federation.records import numpy_to_record, record_to_numpy
from fed_iotlm.federation.round_record import (
    Participation,
    RoundRecord,
    StepResult,
    releases_of,
)
from fed_iotlm.federation.secure import PUBLIC_WEIGHT, SecureSettings, SumLayout
from fed_iotlm.federation.secure_dp import round_config

log = logging.getLogger(__name__)


class _SumCollector(Strategy):
    """Legacy strategy for the workflow: sample nodes, keep the unmasked mean."""

    def __init__(self, fraction: float, min_nodes: int, fit_config: dict) -> None:
        self.fraction, self.min_nodes, self.fit_config = fraction, min_nodes, fit_config
        self.mean: list[np.ndarray] | None = None
        self.nodes = 0
        self.failures = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        available = client_manager.num_available()
        wanted = min(available, max(int(self.fraction * available), self.min_nodes))
        proxies = client_manager.sample(num_clients=wanted, min_num_clients=self.min_nodes)
        config = {**self.fit_config, "server-round": server_round}
        return [(proxy, FitIns(parameters, config)) for proxy in proxies]

    def aggregate_fit(self, server_round, results: list[tuple[ClientProxy, FitRes]], failures):
        self.failures = len(failures)
        if results:  # the workflow put the same unmasked aggregate into every result
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.nodes = len(results)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _FaultWatch:
    """The Grid as the SecAgg+ workflow uses it for one sum, noting each node whose reply
    is an error (with its reason) or that did not answer, over all the protocol's stages.

    The workflow keeps its failures to itself and, once too few nodes are left, stops
    without a word to the strategy; a round none of whose masked vectors arrived is then
    reported from these notes, as a plaintext round with no usable reply is."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.sent: set[int] = set()
        self.failed: dict[int, str] = {}  # node id -> the first error it replied
        self.silent: set[int] = set()

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        asked = {m.metadata.dst_node_id for m in messages}
        self.sent |= asked
        for reply in replies:
            if reply.has_error():
                self.failed.setdefault(reply.metadata.src_node_id, reply.error.reason)
        answered = {r.metadata.src_node_id for r in replies}
        self.silent |= asked - answered - set(self.failed)
        return replies

    def participation(self) -> Participation:
        """A sum that produced nothing: nobody answered usably, so the round is skipped."""
        return Participation(
            sent=len(self.sent),
            answered=0,
            failed=tuple(f"node {n}: {why}" for n, why in sorted(self.failed.items())),
            missing=tuple(f"node {n}" for n in sorted(self.silent)),
            skipped=True,
        )


class SecureRounds:
    """The round engine's step (:mod:`server.engine`) with SecAgg+ aggregation."""

    def __init__(
        self,
        grid: Grid,
        settings: SecureSettings,
        strategy_cfg: dict,
        num_nodes: int,
        phase: str = "train",
        dp: DPConfig | None = None,
    ):
        self.grid, self.settings, self.phase = grid, settings, phase
        # dp.mode=distributed: nodes clip and add their noise share (secure_dp.py)
        self.privacy = CentralPrivacy(dp, num_nodes) if dp is not None and dp.enabled else None
        if num_nodes > settings.max_nodes():
            raise ValueError(
                f"secagg: {num_nodes} nodes overflow modulus_range/quantization_range "
                f"(at most {settings.max_nodes()}); lower secagg.quantization_range"
            )
        fit_config: dict = {}
        strategy_cfg = section("strategy", strategy_cfg)
        if strategy_cfg["name"] == "fedprox":
            fit_config["proximal-mu"] = float(strategy_cfg["proximal_mu"])
        min_nodes = max(2, int(strategy_cfg["min_nodes"] or num_nodes))
        self.collector = _SumCollector(float(strategy_cfg["fraction_train"]), min_nodes, fit_config)
        self.workflow = SecAggPlusWorkflow(
            num_shares=_int_or_fraction(settings.num_shares),
            reconstruction_threshold=_int_or_fraction(settings.reconstruction_threshold),
            max_weight=float(PUBLIC_WEIGHT),
            clipping_range=float(settings.clipping_range),
            quantization_range=int(settings.quantization_range),
            modulus_range=int(settings.modulus_range),
            timeout=float(settings.timeout_s),
        )
        self.base_config = dict(fit_config)
        self.watch = _FaultWatch(grid)  # the last sum's faults (_sum replaces it)

    def __call__(
        self, rnd: int, arrays: ArrayRecord, records: Sequence[RoundRecord] = ()
    ) -> StepResult:
        current = record_to_numpy(arrays)
        layout = SumLayout.of(current)
        minimum = int(self.settings.min_holders)
        census = self._sum(rnd, [], {"phase": "census", "census-of": self.phase})
        if census is None:
            return self._skip(rnd, "the census of holders got no sum", [], failed=True)
        holders = layout.holders(census)
        release = [g for g in layout.groups if holders[g] >= minimum]
        few = [g for g in layout.groups if 0 < holders[g] < minimum]
        if few:
            log.warning("round %s: %s held by fewer than secagg.min_holders=%s nodes: not released",
                rnd, ", ".join(few), minimum,
            )  # fmt: skip
        if not release:
            return self._skip(rnd, "no group has enough holders", few)
        config = {"phase": self.phase, "release": ",".join(release)}
        if self.privacy is not None:
            config.update(round_config(self.privacy.config, {g: holders[g] for g in release}))
        sums = self._sum(rnd, list(current.values()), config)
        if sums is None:
            return self._skip(rnd, "the round got no sum", few, failed=True)
        decoded = layout.decode(sums, current, float(self.settings.max_count), minimum)
        state, withheld = decoded.state, set(decoded.withheld)
        if self.privacy is not None:  # fewer holders than counted: the sum lacks noise
            short = {g for g in release if decoded.holders.get(g, 0) != holders[g]}
            state = {k: current[k] if group_of(k) in short else v for k, v in state.items()}
            withheld |= short
        if withheld:  # a holder dropped out between the census and the round
            few = sorted({*few, *withheld})
        stats = {
            "secagg.nodes": float(self.collector.nodes),
            "secagg.failures": float(self.collector.failures),
            "secagg.withheld_groups": float(len(few)),
        }
        dp_release = None
        if self.privacy is None:
            stats.update({f"secagg.count.{g}": c for g, c in decoded.counts.items()})
        else:
            releases = releases_of(records, self.phase)
            stats.update(self.privacy.account(rnd, self.collector.nodes, releases))
            dp_release = dict(releases[rnd])
        log.info("round %s: SecAgg+ summed %s nodes", rnd, self.collector.nodes)
        return StepResult(
            numpy_to_record(state), stats=stats, dp_release=dp_release, withheld=tuple(few)
        )

    def privacy_report(self, records: Sequence[RoundRecord]) -> dict | None:
        """results.json's ``privacy`` block (dp.mode=distributed) from the run's round
        records, else None."""
        if self.privacy is None:
            return None
        return self.privacy.report(releases_of(records, self.phase))

    def secure_sum(self, rnd: int, arrays: list[np.ndarray], config: dict) -> list[np.ndarray]:
        """One SecAgg+ sum of every sampled node's vector for ``config`` (the statistics
        round's census and sum); an error if the protocol produced none."""
        out = self._sum(rnd, arrays, config)
        if out is None:
            raise RuntimeError(f"SecAgg+ ({config.get('phase')}): the protocol produced no sum")
        return out

    def _sum(self, rnd: int, arrays: list[np.ndarray], config: dict) -> list[np.ndarray] | None:
        """One SecAgg+ run: every sampled node's vector summed (None if it failed)."""
        self.collector.fit_config = {**self.base_config, **config}
        self.collector.mean, self.collector.nodes, self.collector.failures = None, 0, 0
        self.watch = _FaultWatch(self.grid)
        self.workflow(self.watch, self._legacy_context(rnd, arrays))
        if self.collector.mean is None:
            return None
        return [m.astype(np.float64) * self.collector.nodes for m in self.collector.mean]

    def _skip(self, rnd: int, why: str, withheld: list[str], failed: bool = False) -> StepResult:
        """A round that releases nothing; ``failed``: because a sum produced nothing (no
        node's masked vector arrived), which is the round's fault, counted and reported
        with each node's reason (results.json ``faults_by_round``), as the plaintext
        rounds report a round with no usable reply."""
        log.warning("round %s: %s; keeping the model", rnd, why)
        participation = self.watch.participation() if failed else None
        if participation is not None:
            for fault in (*participation.failed, *participation.missing):
                log.warning("round %s: SecAgg+ got nothing from %s", rnd, fault)
        stats = {
            "secagg.nodes": 0.0,
            "secagg.failures": float(
                self.collector.failures if participation is None else len(participation.failed)
            ),
            "secagg.withheld_groups": float(len(withheld)),
            **(participation.metrics() if participation is not None else {}),
        }
        return StepResult(None, participation, stats=stats, withheld=tuple(withheld))

    def _legacy_context(self, rnd: int, arrays: list[np.ndarray]) -> LegacyContext:
        """A fresh legacy context per sum: the nodes now connected, what goes down."""
        manager = SimpleClientManager()
        run_id = self.grid.run.run_id
        for node_id in self.grid.get_node_ids():
            manager.register(GridClientProxy(node_id, self.grid, run_id))
        base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        context = LegacyContext(base, strategy=self.collector, client_manager=manager)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: rnd}
        )
        legacy = ndarrays_to_parameters(arrays)
        context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(legacy, True)
        return context


def _int_or_fraction(value: float) -> int | float:
    """Flower reads an int as a count and a float as a fraction of the sampled nodes."""
    v = float(value)
    return int(v) if v >= 1 and v.is_integer() and v != 1 else v
