"""Objects every entry point derives the same way from the experiment config."""

from __future__ import annotations

from fed_iotlm.data.federation import build_layout
from fed_iotlm.models.multisensory import ModelSpec
from fed_iotlm.models.training import TrainConfig

METHODS = ("federated", "fedavg", "local", "centralized")


def check_method(cfg: dict) -> str:
    method = cfg["method"]
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    return method


def model_spec(cfg: dict) -> ModelSpec:
    """Architecture from the dataset (all its modalities) and ``cfg['model']``.

    The naive ``fedavg`` baseline feeds zero-filled inputs without a mask.
    """
    layout = build_layout(cfg)
    m = cfg["model"]
    return ModelSpec.from_dataset(
        layout.dataset,
        dim=int(m["dim"]),
        fusion_layers=int(m["fusion_layers"]),
        fusion_heads=int(m["fusion_heads"]),
        use_mask=cfg["method"] != "fedavg",
    )


def train_config(cfg: dict) -> TrainConfig:
    t = cfg["train"]
    return TrainConfig(
        epochs=int(t["epochs"]),
        batch_size=int(t["batch_size"]),
        lr=float(t["lr"]),
        weight_decay=float(t.get("weight_decay", 0.0)),
        task_weights=dict(t.get("task_weights") or {}) or None,
    )


def plan_by_node(cfg: dict) -> dict[str, list[str]]:
    """``{"0": ["imu", "audio"], ...}`` as results.json records it."""
    return {str(i): mods for i, mods in enumerate(build_layout(cfg).plan)}
