"""Node-level differential privacy for the modality-aware federation (DP-FedAvg).

What Flower ships does not fit as it is: ``fixedclipping_mod`` refuses a reply whose keys
differ from the arrays it received, and the ``DifferentialPrivacy*FixedClipping``
wrappers add one noise scale to every key of a model that every node sent in full.
Our nodes send only the groups they hold, and each group is averaged over its own
holders.  So this module reuses Flower's clipping function
(:func:`flwr.supercore.differential_privacy.compute_clip_model_update`) and its config
key, and calibrates the noise per group:

* **node** (:func:`update_clipping_mod`): the update ``sent - received`` over *every*
  group the node sends is clipped to L2 norm ``C`` (one joint norm, not one per
  group), so a node moves the concatenation of all group sums by at most ``C``.
  ``mode=local`` also adds ``N(0, (σC)²)`` to each coordinate it sends, before the
  reply leaves the node.
* **server** (:class:`CentralPrivacy`, used by ``ModalityAwareFedAvg``): each group is
  averaged *unweighted* over its ``h_g`` holders (count weights would let one large
  node move the average by more than ``C / h_g``), and in ``mode=central``
  ``N(0, (σC / h_g)²)`` is added to each coordinate of the group's average, i.e.
  ``N(0, (σC)²)`` on the group's sum.  The concatenated noisy sums are one Gaussian
  mechanism with sensitivity ``C`` and noise multiplier ``σ``; dividing by ``h_g`` is
  post-processing.  That is exactly the noise
  ``DifferentialPrivacyClientSideFixedClipping`` adds (``σC / num_sampled_clients``),
  with the group's holders in place of all sampled clients.

Why a group with few holders gets relatively more noise: its average is a mean of only
``h_g`` clipped updates, so one node can move it by up to ``C / h_g`` — the fewer the
holders, the more of the average any one of them is.  Hiding that node takes noise of
the same scale, ``σC / h_g``, while the signal (the mean update) does not grow as
holders drop.  A modality held by one node gets noise ``σC`` on its average: with
``σ ≥ 1`` its encoder learns little.  Groups held by every node (fusion, heads) are
the least affected.

The accountant is opacus' RDP accountant for the sampled Gaussian mechanism with
sampling rate ``q = nodes sampled / nodes`` and multiplier ``σ``, composed over the
rounds released (:func:`epsilon_after`).  The guarantee is node-level (user-level when
a node is one person or site) under zero-out adjacency: the models released after
every round barely change if any one node's whole data set is replaced by nothing (its
update by zero).  Who takes part and which groups each node holds are public (``h_g``
sets the noise), and Flower samples a fixed number of nodes where the accountant
assumes Poisson sampling (exact only at ``q = 1``, the default).  It covers the
parameter updates only; train metrics (loss, ``count.<group>``, ``num-examples``) go
up in the clear.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from math import isfinite
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    compute_clip_model_update,
    get_norm,
)

from fed_iotlm.config_schema import block, setting

from .aggregation import NodeUpdate
from .groups import group_of
from .records import like_record, record_to_numpy

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

log = logging.getLogger(__name__)

MODES = ("central", "local", "distributed")  # distributed: under SecAgg+ (secure_dp.py)
KEY_LOCAL_NOISE = "dp-local-noise-multiplier"  # train config: the node adds σC itself
DP_METHODS = ("federated", "harmony")  # updates are the only thing nodes upload
DP_STRATEGIES = ("fedavg", "fedprox")  # the released model is the noisy average itself


@dataclass(frozen=True)
class DPConfig:
    """The ``dp:`` block of the config (off unless ``enabled``)."""

    enabled: bool = False
    mode: str = "central"
    clipping_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    seed: int | None = None  # server noise seed: tests only, a known seed voids the guarantee

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"dp.mode={self.mode!r}: choose one of {MODES}")
        if not (isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(
                f"dp.clipping_norm must be a finite number > 0, got {self.clipping_norm}"
            )
        if not (isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"dp.noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}"
            )
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")


def dp_config(cfg: Mapping) -> DPConfig:
    """``cfg['dp']`` as a validated :class:`DPConfig` (absent = the schema's: off); the
    schema refuses unknown keys, so a typo such as ``dp.noise=1`` does not silently run
    without noise."""
    dp = block(cfg, "dp")
    return DPConfig(
        enabled=bool(dp["enabled"]),
        mode=str(dp["mode"]),
        clipping_norm=float(dp["clipping_norm"]),
        noise_multiplier=float(dp["noise_multiplier"]),
        delta=float(dp["delta"]),
        seed=None if dp["seed"] is None else int(dp["seed"]),
    )


def check_dp_run(cfg: Mapping) -> DPConfig:
    """The run's DP settings, refusing combinations the guarantee does not cover."""
    dp = dp_config(cfg)
    if not dp.enabled:
        return dp
    method = setting(cfg, "method")
    if method not in DP_METHODS:
        raise ValueError(
            f"dp.enabled with method={method!r}: DP runs with method in {DP_METHODS} "
            "(method=fedavg is flwr's plain baseline; mmbind also uploads embeddings, "
            "which the clipped update does not cover)"
        )
    strategy = block(cfg, "strategy")
    name = strategy["name"]
    if name not in DP_STRATEGIES:
        raise ValueError(
            f"dp.enabled with strategy={name!r}: the noise is calibrated to the average, "
            f"so the server must release the average itself; use one of {DP_STRATEGIES}"
        )
    rule = strategy["aggregation"]
    if rule != "mean":
        raise ValueError(
            f"dp.enabled with strategy.aggregation={rule!r}: the noise is calibrated to a "
            "mean of clipped updates; use strategy.aggregation=mean"
        )
    secure = bool(block(cfg, "secagg")["enabled"])
    if (dp.mode == "distributed") != secure:
        raise ValueError(
            f"dp.mode={dp.mode!r} with secagg.enabled={secure}: under SecAgg+ the server "
            "never sees a sum before it is released, so the noise is added at the nodes "
            "(dp.mode=distributed); without SecAgg+ use dp.mode=central or local"
        )
    if dp.noise_multiplier == 0:
        log.warning("dp.noise_multiplier=0: updates are clipped but nothing is private")
    return dp


# -- node side ----------------------------------------------------------------------------


def clip_update(
    sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], clipping_norm: float
) -> dict[str, np.ndarray]:
    """``sent`` moved so that ``||sent - received||₂ <= clipping_norm`` over the keys sent
    (all groups at once); keys not sent play no part.  Flower's FlatClip does the work."""
    missing = [k for k in sent if k not in received]
    if missing:
        raise KeyError(f"clip_update: sent keys the server did not send: {missing[:5]}")
    keys = list(sent)
    out = [np.array(sent[k], copy=True) for k in keys]
    base = [received[k] for k in keys]
    # inside the ball nothing moves; flwr's clip would also divide by a zero norm
    if get_norm([np.subtract(a, b) for a, b in zip(out, base, strict=True)]) > clipping_norm:
        compute_clip_model_update(out, base, clipping_norm)
    return {k: v.astype(sent[k].dtype, copy=False) for k, v in zip(keys, out, strict=True)}


def add_noise(
    arrays: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``arrays`` plus i.i.d. ``N(0, std²)`` on every coordinate, dtypes kept."""
    return {
        k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype, copy=False)
        for k, v in arrays.items()
    }


def update_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod for the ``train`` handler: clip (and in local mode noise) the
    update the node sends, relative to the arrays it received.

    A no-op unless the server's train config carries ``clipping_norm`` (flwr's
    ``KEY_CLIPPING_NORM``), so the same ClientApp serves runs with and without DP.
    Put it innermost (the handler's own ``mods``): any mod that transforms the reply
    further (SecAgg+ masking) must see the clipped update.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    config: ConfigRecord = msg.content.get("config", ConfigRecord())
    if KEY_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)
    clipping_norm = float(config[KEY_CLIPPING_NORM])
    local_sigma = float(config.get(KEY_LOCAL_NOISE, 0.0))
    received = record_to_numpy(msg.content["arrays"])
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    sent = record_to_numpy(reply.content["arrays"])  # per key, packed or not
    clipped = clip_update(sent, received, clipping_norm)
    if local_sigma > 0:
        # fresh OS entropy: a node's noise must be unpredictable to the server
        clipped = add_noise(clipped, local_sigma * clipping_norm, np.random.default_rng())
    reply.content["arrays"] = like_record(reply.content["arrays"], clipped)  # same form
    return reply


# -- server side --------------------------------------------------------------------------


def uniform_weights(updates: Iterable[NodeUpdate]) -> list[NodeUpdate]:
    """Each holder counts once per group it sent (count 1), whatever its sample count:
    the bound ``C / h_g`` on one node's share of a group's average needs equal weights."""
    out = []
    for upd in updates:
        sent = {group_of(k) for k in upd.arrays}
        counts = {g: 1.0 for g in sent if float(upd.counts.get(g, 0.0)) > 0}
        out.append(replace(upd, counts=counts))
    return out


def noise_std(noise_multiplier: float, clipping_norm: float, holders: int) -> float:
    """Std of the central noise on a group's average: ``σC / h_g`` (Flower's
    ``compute_stdv`` with the group's holders as the sampled clients)."""
    if holders < 1:
        raise ValueError(f"a group with {holders} holders is not released")
    return noise_multiplier * clipping_norm / holders


def epsilon_after(releases: Iterable[tuple[float, float]], delta: float) -> float:
    """ε at ``delta`` after the given (noise multiplier, sample rate) releases, by
    opacus' RDP accountant for the sampled Gaussian mechanism (``inf`` if σ = 0)."""
    accountant = _rdp_accountant()
    for sigma, q in releases:
        if sigma <= 0:
            return float("inf")
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta))


def _rdp_accountant() -> RDPAccountant:
    """A fresh opacus ``RDPAccountant``, imported here so that opacus (and torch's import
    cost) stays off processes that never account.

    Importing opacus calls ``logging.basicConfig`` (opacus/utils/module_utils.py, opacus
    1.6), which gives an unconfigured root logger a stderr handler.  Flower's ``flwr``
    logger and ours propagate to the root, so from the first DP round on every line
    would print twice, the copy as ``MM/DD/YYYY HH:MM:SS:INFO:...``.  The handlers that
    import added are removed again; handlers that were there before stay, and no
    record is dropped (our own handlers, fed_iotlm/logs.py, are not on the root)."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        from opacus.accountants import RDPAccountant
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
    return RDPAccountant()


class CentralPrivacy:
    """The server's part: the train config nodes need, equal weights, the per-group
    noise and the accounting.  ``releases`` maps each round whose average was released
    to its ``{"sigma", "q"}``; the round records carry it (and the checkpoint them), so a
    resumed run keeps composing where it stopped."""

    def __init__(self, config: DPConfig, num_nodes: int) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.config = config
        self.num_nodes = num_nodes

    def train_config(self) -> dict[str, float]:
        """Keys added to every train message (read by :func:`update_clipping_mod`)."""
        out = {KEY_CLIPPING_NORM: self.config.clipping_norm}
        if self.config.mode == "local":
            out[KEY_LOCAL_NOISE] = self.config.noise_multiplier
        return out

    def release(
        self,
        server_round: int,
        state: Mapping[str, np.ndarray],
        holders: Mapping[str, list[str]],
    ) -> dict[str, np.ndarray]:
        """``state`` (the unweighted per-group averages) with central noise on each
        group that had holders this round; groups nobody sent stay as they were."""
        if self.config.mode != "central" or self.config.noise_multiplier == 0:
            return dict(state)
        seed = self.config.seed
        rng = np.random.default_rng(None if seed is None else [seed, server_round])
        out = dict(state)
        for key in sorted(state):  # fixed order: a seeded run is reproducible
            h = len(holders.get(group_of(key), []))
            if h:
                std = noise_std(self.config.noise_multiplier, self.config.clipping_norm, h)
                out[key] = add_noise({key: state[key]}, std, rng)[key]
        log.info("dp: round %s: central noise sigma*C/h on %d group(s)", server_round, len(holders))
        return out

    def account(
        self, server_round: int, sampled: int, releases: dict[int, dict[str, float]]
    ) -> dict[str, float]:
        """Record round ``server_round``'s release in ``releases``; its metrics
        (``dp.epsilon`` once σ > 0, ``dp.sample_rate``, ``dp.noise_multiplier``)."""
        q = min(1.0, sampled / self.num_nodes)
        releases[server_round] = {"sigma": self.config.noise_multiplier, "q": q}
        stats = {"dp.sample_rate": q, "dp.noise_multiplier": self.config.noise_multiplier}
        eps = self.epsilon(releases)
        if isfinite(eps):
            stats["dp.epsilon"] = eps
        return stats

    def epsilon(self, releases: Mapping[int, Mapping[str, float]]) -> float:
        """ε after every release so far, at ``dp.delta``."""
        ordered = [releases[r] for r in sorted(releases)]
        return epsilon_after(((r["sigma"], r["q"]) for r in ordered), self.config.delta)

    def report(self, releases: Mapping[int, Mapping[str, float]]) -> dict:
        """results.json's ``privacy`` block."""
        by_round: dict[str, float | None] = {}
        done: dict[int, Mapping[str, float]] = {}
        for r in sorted(releases):
            done[r] = releases[r]
            eps = self.epsilon(done)
            by_round[str(r)] = eps if isfinite(eps) else None
        final = self.epsilon(releases)
        cfg = asdict(self.config)
        cfg.pop("enabled")
        return {
            **cfg,
            "mechanism": "sampled Gaussian (DP-FedAvg): joint L2 clipping of each node's "
            "update at the node, Gaussian noise "
            + {
                "central": "sigma*C/h_g on each group's unweighted average at the server",
                "local": "sigma*C on each node's clipped update at the node",
                "distributed": "N(0, (sigma*C)^2/h_g) from each of the h_g holders of a group "
                "under SecAgg+, so the unmasked sum carries sigma*C and the unweighted "
                "average sigma*C/h_g",
            }[self.config.mode],
            "level": "node-level (user-level when a node is one user or site), zero-out adjacency",
            "accountant": "opacus RDPAccountant",
            "num_nodes": self.num_nodes,
            "sample_rate_by_round": {str(r): releases[r]["q"] for r in sorted(releases)},
            "epsilon_by_round": by_round,
            "epsilon": final if isfinite(final) else None,
            "covers": "parameter updates only; train metrics are sent in the clear",
        }


def attach_privacy(strategy: object, cfg: Mapping, num_nodes: int) -> None:
    """Turn on ``cfg['dp']`` in a modality-aware strategy (no-op when DP is off)."""
    dp = check_dp_run(cfg)
    if not dp.enabled or dp.mode == "distributed":  # secure rounds account for themselves
        return
    if not hasattr(strategy, "privacy"):
        raise TypeError(f"{type(strategy).__name__} has no DP support (dp.enabled)")
    strategy.privacy = CentralPrivacy(dp, num_nodes)


def privacy_report(strategy: object, releases: Mapping[int, Mapping[str, float]]) -> dict | None:
    """results.json's ``privacy`` block of ``strategy``'s run, from its ``releases``
    (round -> sigma, q: the round records'); None when DP is off."""
    privacy = getattr(strategy, "privacy", None)
    if privacy is None:
        return None
    return privacy.report(releases)
