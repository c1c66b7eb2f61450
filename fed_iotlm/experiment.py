"""Objects every entry point derives the same way from the experiment config."""

from __future__ import annotations

from dataclasses import replace

from fed_iotlm.binding.index import SearchConfig
from fed_iotlm.binding.matching import MatchConfig
from fed_iotlm.binding.ssl import SSLConfig, rotation_groups
from fed_iotlm.binding.training import BindTrainConfig
from fed_iotlm.config_schema import GRID_METHODS, block, effective, section
from fed_iotlm.data.federation import build_layout
from fed_iotlm.models.class_weights import class_weighting_mode
from fed_iotlm.models.device import binding_device
from fed_iotlm.models.multisensory import ModelSpec
from fed_iotlm.models.training import TrainConfig

METHODS = (*GRID_METHODS, "local", "centralized", "centralized_mmbind")


def check_method(cfg: dict) -> str:
    method = cfg["method"]
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    return method


def model_spec(cfg: dict) -> ModelSpec:
    """Architecture from the experiment's dataset; see :func:`spec_for_dataset`."""
    return spec_for_dataset(cfg, build_layout(cfg).dataset)


def spec_for_dataset(cfg: dict, ds) -> ModelSpec:
    """Architecture from ``ds`` (all its modalities; only kinds and feature shapes
    matter) and ``cfg['model']``.

    The naive ``fedavg`` baseline feeds zero-filled inputs without a mask; ``harmony``
    (modality-wise FedAvg + late fusion) averages per-modality logits; MMBind adds a
    self-supervised head on the shared modality.
    """
    m = cfg["model"]
    spec = ModelSpec.from_dataset(
        ds,
        dim=int(m["dim"]),
        fusion_layers=int(m["fusion_layers"]),
        fusion_heads=int(m["fusion_heads"]),
        use_mask=cfg["method"] != "fedavg",
    )
    fusion = str(section("model", m)["fusion"])
    if fusion not in ("attention", "late"):
        raise ValueError(f"model.fusion={fusion!r}: expected 'attention' or 'late'")
    spec = replace(spec, fusion=effective(cfg["method"], "model.fusion", fusion))  # harmony: late
    if cfg["method"] in ("mmbind", "centralized_mmbind"):
        return replace(spec, extra=ssl_extra(cfg, ds))
    return spec


def ssl_extra(cfg: dict, ds) -> dict:
    """The SSL head on the shared modality (a decoder for ``binding.ssl=autoencoder``, a
    projection head otherwise) and its xyz channel triplets, which SSL views rotate."""
    shared = shared_modality(cfg, ds)
    head = "decoders" if block(cfg, "binding")["ssl"] == "autoencoder" else "projections"
    groups = rotation_groups(ds.meta.modalities[shared].channels)
    return {head: [shared], **({"rotation_groups": {shared: groups}} if groups else {})}


def shared_modality(cfg: dict, ds=None) -> str:
    """MMBind's binding modality: ``binding.shared``, else ``partition.shared``."""
    shared = block(cfg, "binding")["shared"] or block(cfg, "partition")["shared"]
    mods = (ds if ds is not None else build_layout(cfg).dataset).meta.modalities
    if not shared:
        raise ValueError("method=mmbind needs a shared modality: partition.shared=<modality>")
    if shared not in mods:
        raise ValueError(f"shared modality {shared!r} is not in the dataset ({', '.join(mods)})")
    return shared


def train_config(cfg: dict) -> TrainConfig:
    """Local training settings; class weights (``train.class_weighting=balanced``) are
    added where the class counts are known (statistics round, baselines)."""
    t = block(cfg, "train")
    class_weighting_mode(cfg)  # a bad value fails here, before any data is read
    return TrainConfig(
        epochs=int(t["epochs"]),
        batch_size=int(t["batch_size"]),
        lr=float(t["lr"]),
        weight_decay=float(t["weight_decay"]),
        task_weights=dict(t["task_weights"]) or None,
        steps=None if t["steps"] is None else int(t["steps"]),
    )


def plan_by_node(cfg: dict) -> dict[str, list[str]]:
    """``{"0": ["imu", "audio"], ...}`` as results.json records it."""
    return {str(i): mods for i, mods in enumerate(build_layout(cfg).plan)}


def match_config(cfg: dict) -> MatchConfig:
    """How the server pairs samples across nodes, from ``cfg['binding']``."""
    b = block(cfg, "binding")
    return MatchConfig(
        k=int(b["k"]),
        floor=float(b["floor"]),
        weight_power=float(b["weight_power"]),
        use_labels=bool(b["use_labels"]),
        search=SearchConfig(exact_limit=int(b["exact_limit"]), device=binding_device(cfg)),
    )


def bind_train_config(cfg: dict) -> BindTrainConfig:
    """Weights of the MMBind loss terms, from ``cfg['binding']``."""
    b = block(cfg, "binding")
    return BindTrainConfig(
        pseudo_weight=float(b["pseudo_weight"]),
        contrastive_weight=float(b["contrastive_weight"]),
        temperature=float(b["temperature"]),
        own_pair_weight=float(b["own_pair_weight"]),
    )


def ssl_train_config(cfg: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Budget of one shared-modality SSL round at a node: ``binding.pretrain_steps``
    optimiser steps when set, else ``train.steps`` (the federation's per-round budget)
    when set, else ``binding.pretrain_epochs`` passes.  SSL rounds are rounds of their
    own, so their budget is a setting of its own; every SSL variant (``ssl_spine``,
    ``mmbind`` and its ablations) gets the same one."""
    b, tcfg = block(cfg, "binding"), base or train_config(cfg)
    steps = b["pretrain_steps"]
    return replace(
        tcfg,
        epochs=int(b["pretrain_epochs"]),
        steps=tcfg.steps if steps is None else int(steps),
    )


def ssl_config(cfg: dict) -> SSLConfig:
    """MMBind's shared-modality SSL rounds, from ``cfg['binding']``."""
    b = block(cfg, "binding")
    return SSLConfig(
        method=str(b["ssl"]),
        temperature=float(b["ssl_temperature"]),
        batch_size=int(b["ssl_batch_size"]),
        rotation_deg=float(b["ssl_rotation_deg"]),
        gain=float(b["ssl_gain"]),
        label_task=b["label_task"],
    )
