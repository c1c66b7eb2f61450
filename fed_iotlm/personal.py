"""Personalised site adapters (FedRep/FedPer style): small per-node modules that never
leave the node.

Domain shift between sites (a rotated IMU, a different microphone) is a per-site
nuisance: one global model has to be robust to every site's version of a signal at
once, while a node only ever sees its own.  So each node trains, jointly with the
shared model, a few parameters of its own that map *its* signal towards what the
shared encoders expect, and keeps them: they are dropped from every upload, stored in
the node's Flower ``context.state`` (which Flower persists per node, whichever worker
runs the node next) and put back after each global model arrives.  The shared part
is federated exactly as before, so the server and its aggregation do not change.

Kinds (``personal.kind``):

* ``adapter`` (default): per modality, a low-rank residual map on the encoder's INPUT
  channels, ``x + B A x`` (rank ``min(rank, channels)``), and a bottleneck adapter on
  its output token, ``z + U gelu(D z)`` (width ``rank``).  The input map is linear so
  it can undo a placement rotation exactly: for an IMU rotated by R, ``R^-1 - I`` has
  rank <= 4 over the 6 accelerometer+gyroscope channels.
* ``lora``: LoRA on every ``nn.Linear`` inside the encoders, ``W x + (alpha/r) B A x``.
  Implemented with forward hooks rather than peft's ``inject_adapter_in_model``,
  because peft renames the wrapped weights (``proj.base_layer.weight``) and the shared
  keys must stay exactly those of the server's model to be aggregated.

Both start as the identity (``B``/``U`` are zero), so a node that has not trained yet
behaves exactly like the global model.  ``personal.keep_local`` also keeps whole
parameter groups on the node (``[head]``: FedPer's personal heads); the server then
never trains them, so its own global-test figures are not meaningful for those groups.

Adapter parameters live under ``adapt.*`` in the node model's state dict; the
server's model has no such keys, so an adapter that leaked into an upload would be
refused by aggregation as an unknown parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fed_iotlm.config_schema import block
from fed_iotlm.federation.groups import group_of
from fed_iotlm.federation.records import load_into, numpy_to_record, record_to_numpy
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors, TrainConfig, train_local

ADAPTER_PREFIX = "adapt"
STATE_KEY = "personal.state"  # the node's context.state entry
KINDS = ("adapter", "lora")


@dataclass(frozen=True)
class PersonalConfig:
    """``cfg['personal']``."""

    enabled: bool = False
    kind: str = "adapter"
    rank: int = 4
    alpha: float = 1.0
    keep_local: tuple[str, ...] = ()
    epochs: int = 1
    lr_scale: float = 10.0


def personal_config(cfg: Mapping) -> PersonalConfig:
    """The validated ``personal`` block (absent: the schema's, disabled)."""
    p = block(cfg, "personal")
    pcfg = PersonalConfig(
        enabled=bool(p["enabled"]),
        kind=str(p["kind"]),
        rank=int(p["rank"]),
        alpha=float(p["alpha"]),
        keep_local=tuple(str(g) for g in p["keep_local"]),
        epochs=int(p["epochs"]),
        lr_scale=float(p["lr_scale"]),
    )
    if pcfg.kind not in KINDS:
        raise ValueError(f"personal.kind={pcfg.kind!r}: expected one of {', '.join(KINDS)}")
    if pcfg.rank < 1:
        raise ValueError(f"personal.rank must be >= 1, got {pcfg.rank}")
    if pcfg.epochs < 0 or not pcfg.lr_scale > 0:
        raise ValueError("personal.epochs must be >= 0 and personal.lr_scale > 0")
    return pcfg


def is_local_group(group: str, keep_local: Iterable[str]) -> bool:
    """``head`` keeps every ``head.<task>``; ``head.activity`` only that one."""
    return any(group == g or group.startswith(g + ".") for g in keep_local)


# ---------------------------------------------------------------------------- modules


class LowRankResidual(nn.Module):
    """``x + up(act(down(x)))`` along ``axis``; ``up`` starts at zero (identity map)."""

    def __init__(self, features: int, rank: int, axis: int, nonlinear: bool) -> None:
        super().__init__()
        self.axis = axis
        self.down = nn.Linear(features, rank, bias=False)
        self.up = nn.Linear(rank, features, bias=nonlinear)
        self.act: nn.Module = nn.GELU() if nonlinear else nn.Identity()
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(self.axis, -1)
        return x + self.up(self.act(self.down(h))).movedim(-1, self.axis)


class LoRADelta(nn.Module):
    """The low-rank update ``scale · B A x`` of one Linear layer; ``B`` starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=5**0.5)
        nn.init.zeros_(self.B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x)) * self.scale


# Hooks are small objects (not closures) so a deep copy of the model copies them along
# with the adapter modules they point to.


class _InputHook:
    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.adapter(args[0]), *args[1:])


class _OutputHook:
    def __init__(self, adapter: nn.Module, residual: bool) -> None:
        self.adapter, self.residual = adapter, residual

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        # residual: the adapter maps the output; otherwise it adds a delta from the input
        return self.adapter(out) if self.residual else out + self.adapter(args[0])


# ---------------------------------------------------------------------------- attach


def attach_personal(
    model: MultisensoryModel,
    pcfg: PersonalConfig,
    seed: int,
    modalities: Iterable[str] | None = None,
) -> frozenset[str]:
    """Add the node's adapters to ``model`` (``model.adapt``, hooked into the encoders of
    ``modalities``, default all) and return every personal state-dict key: the adapters
    and the ``keep_local`` groups.

    ``seed`` makes the adapters' random halves reproducible per node; the global
    model's parameters and the global torch RNG are untouched.
    """
    if hasattr(model, ADAPTER_PREFIX):
        raise ValueError("personal adapters are already attached to this model")
    gen = torch.Generator().manual_seed(int(seed))
    adapters = nn.ModuleDict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        wanted = set(model.enc) if modalities is None else set(modalities)
        for m, enc in model.enc.items():
            if m not in wanted:  # a modality the node never sees needs no adapter
                continue
            if pcfg.kind == "adapter":
                attach_adapter(adapters, m, enc, model, pcfg.rank)
            else:
                attach_lora(adapters, m, enc, pcfg.rank, pcfg.alpha)
    model.add_module(ADAPTER_PREFIX, adapters)
    keys = {k for k in model.state_dict() if k.startswith(ADAPTER_PREFIX + ".")}
    keys |= {k for k in model.state_dict() if is_local_group(group_of(k), pcfg.keep_local)}
    return frozenset(keys)


def attach_adapter(
    adapters: nn.ModuleDict,
    m: str,
    enc: nn.Module,
    model: MultisensoryModel,
    rank: int,
    prefix: str | None = None,
) -> None:
    """Low-rank input map + bottleneck token adapter on encoder ``enc`` of modality ``m``,
    stored in ``adapters`` as ``<prefix>input`` / ``<prefix>token`` (prefix ``<m>__``
    by default; the federated adapters of :mod:`fed_iotlm.federation.adapter_sync`
    keep one dict per modality and need none)."""
    prefix = f"{m}__" if prefix is None else prefix
    shape = tuple(model.spec.modalities[m]["feature_shape"])  # one sample, no batch axis
    axis = 1 if len(shape) == 3 else -1  # grid [B, C, H, W]: channels; else the last axis
    channels = shape[0] if len(shape) == 3 else shape[-1]
    inp = LowRankResidual(channels, min(rank, channels), axis, nonlinear=False)
    out = LowRankResidual(model.spec.dim, rank, -1, nonlinear=True)
    adapters[f"{prefix}input"], adapters[f"{prefix}token"] = inp, out
    enc.register_forward_pre_hook(_InputHook(inp))
    enc.register_forward_hook(_OutputHook(out, residual=True))


def attach_lora(
    adapters: nn.ModuleDict,
    m: str,
    enc: nn.Module,
    rank: int,
    alpha: float,
    prefix: str | None = None,
) -> None:
    """LoRA on every ``nn.Linear`` of ``enc``, stored as ``<prefix><path>`` (``<m>__``)."""
    prefix = f"{m}__" if prefix is None else prefix
    for path, layer in list(enc.named_modules()):
        if isinstance(layer, nn.Linear):
            delta = LoRADelta(layer.in_features, layer.out_features, rank, alpha)
            adapters[f"{prefix}{path.replace('.', '__')}"] = delta
            layer.register_forward_hook(_OutputHook(delta, residual=False))


# ---------------------------------------------------------------------------- training


def train_personal(
    model: nn.Module,
    data: SplitTensors,
    keys: frozenset[str],
    tcfg: TrainConfig,
    pcfg: PersonalConfig,
    *,
    seed: int,
) -> dict[str, float]:
    """FedRep's first phase: ``personal.epochs`` epochs on the personal parameters only
    (the shared ones frozen), at ``lr x personal.lr_scale``, before the usual local
    training (which then updates shared and personal parameters together).

    Why a phase of its own: an adapter starts at the identity and may have to move far
    (undoing a 180-degree placement is an eigenvalue of -2); at the shared learning rate
    and inside joint training the shared model absorbs the shift first, and that part
    is averaged away at the server every round.  No-op without personal keys.
    """
    if not keys or pcfg.epochs == 0:
        return {}
    names = {name for name, _ in model.named_parameters()}
    personal = {n for n in names if n in keys}
    frozen = []
    for name, p in model.named_parameters():
        if name not in personal and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(p)
    try:
        cfg = replace(tcfg, epochs=pcfg.epochs, lr=tcfg.lr * pcfg.lr_scale, proximal_mu=0.0)
        stats = train_local(model, data, cfg, seed=seed)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {"personal_loss": stats["train_loss"]}


# ------------------------------------------------------------------------- persistence


def without_personal(
    state: Mapping[str, np.ndarray], keys: frozenset[str]
) -> dict[str, np.ndarray]:
    """``state`` minus the personal keys: what may be uploaded."""
    return {k: v for k, v in state.items() if k not in keys}


def store_personal(state: RecordDict, model: nn.Module, keys: frozenset[str]) -> None:
    """Save the node's personal parameters into its ``context.state``."""
    if not keys:
        return
    own = model.state_dict()
    arrays = {k: own[k].detach().cpu().numpy().copy() for k in sorted(keys)}
    state[STATE_KEY] = numpy_to_record(arrays)


def restore_personal(
    state: RecordDict,
    model: nn.Module,
    keys: frozenset[str],
    initial: Mapping[str, np.ndarray],
) -> bool:
    """Put the node's personal parameters back after a global model was loaded.

    Before the node's first training round ``context.state`` has none: the adapters are
    reset to ``initial`` (identity) and ``keep_local`` groups keep the global values
    just loaded (FedPer starts personal layers from the global initialisation).  The
    reset matters because a worker process may hold a model that last served another
    round of this node.  Returns whether a stored state was found.
    """
    if not keys:
        return False
    if STATE_KEY in state:
        load_into(model, record_to_numpy(state[STATE_KEY]))
        return True
    load_into(model, initial)
    return False


def personalise_node(
    cfg: Mapping,
    model: MultisensoryModel,
    node: int,
    counts: Mapping[str, float],
    modalities: Iterable[str] | None = None,
) -> tuple[frozenset[str], dict[str, np.ndarray], dict[str, float]]:
    """A node's personal part when ``personal.enabled``: attach adapters to the encoders
    of its ``modalities`` (after the model's own initialisation, so the shared
    parameters are the same with or without them) and return (personal keys, the
    adapters' initial values, the group counts without ``keep_local`` groups, which are
    neither sent nor counted).  Disabled: no keys, and ``counts`` unchanged."""
    pcfg = personal_config(cfg)
    if not pcfg.enabled:
        return frozenset(), {}, dict(counts)
    if pcfg.keep_local and cfg["method"] == "fedavg":
        raise ValueError(
            "personal.keep_local needs a modality-aware method (federated, harmony, mmbind): "
            "flwr's plain FedAvg drops keys no node sends from the global model"
        )
    keys = attach_personal(model, pcfg, int(cfg["seed"]) * 1000 + int(node), modalities)
    state = model.state_dict()
    prefix = ADAPTER_PREFIX + "."
    init = {k: state[k].detach().cpu().numpy().copy() for k in keys if k.startswith(prefix)}
    kept = {g: n for g, n in counts.items() if not is_local_group(g, pcfg.keep_local)}
    return keys, init, kept
