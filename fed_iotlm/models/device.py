"""Where a process trains and evaluates: ``train.device`` / ``binding.device`` resolved once.

One small module so every caller (nodes, baselines, the server's evaluation, the
binding search) decides the same way and the training loop only asks two questions:
*which autocast?* and *how to copy a batch?*

* ``auto``: CUDA when this process may use a GPU, else the CPU.  Inside a Ray worker
  (a simulated node) that means the GPU share Ray gave it (``simulation.gpus_per_node``;
  Ray sets ``CUDA_VISIBLE_DEVICES`` to the shared GPU), never a GPU the node holds no
  share of; elsewhere, any GPU torch sees.
* ``cpu``: always the CPU.
* ``cuda`` / ``cuda:N``: that GPU, or a one-line :class:`DeviceError` naming the key
  when there is none (at start-up, not deep inside a round).

On CUDA a model runs under bf16 autocast (parameters and optimiser state stay float32),
host tensors are pinned and copies are non-blocking, so a copy overlaps the previous
batch's kernels.  On the CPU every helper here is a no-op: the CPU path is unchanged.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from fed_iotlm.config_schema import GRID_METHODS, block
from fed_iotlm.config_schema import setting as config_setting

CHOICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """A device setting this process cannot honour; the message names the key."""


def ray_gpu_share() -> list | None:
    """GPU ids Ray assigned to this worker; None when this is not a Ray worker.

    A simulated node is a Ray actor; an actor without ``num_gpus`` must not wander onto
    a GPU others were given, whatever ``CUDA_VISIBLE_DEVICES`` shows."""
    ray = sys.modules.get("ray")  # never import Ray just to ask
    try:
        if ray is None or not ray.is_initialized():
            return None
        if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None  # the driver (server process) is not a node
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001
        # Ray half-imported by another thread (the simulation engine starting it while
        # the ServerApp thread asks), or an older Ray: either way not a Ray worker,
        # whose Ray is imported in full before any node code runs.
        return None


def gpu_visible() -> bool:
    """Whether this process may put work on a GPU (see the module docstring)."""
    share = ray_gpu_share()
    if share is not None and not share:
        return False
    return torch.cuda.is_available()


def resolve_device(setting: object, key: str, *, gpu: bool | None = None) -> torch.device:
    """``auto|cpu|cuda|cuda:N`` -> a torch device, or a :class:`DeviceError` naming ``key``.

    ``gpu``: whether a GPU is usable here (default: :func:`gpu_visible`); tests pass it."""
    value = "auto" if setting is None else str(setting).strip().lower()
    base, _, index = value.partition(":")
    if base not in CHOICES or (index and (base != "cuda" or not index.isdigit())):
        raise DeviceError(f"{key}={setting!r}: expected one of auto, cpu, cuda (or cuda:N)")
    if base == "cpu":
        return torch.device("cpu")
    usable = gpu_visible() if gpu is None else gpu
    if base == "auto":
        return torch.device("cuda") if usable else torch.device("cpu")
    if not usable:
        raise DeviceError(f"{key}={setting}: {why_no_gpu()}; set {key}=auto or {key}=cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceError(
            f"{key}={setting}: this process sees {torch.cuda.device_count()} GPU(s) "
            f"(indices 0..{torch.cuda.device_count() - 1})"
        )
    return torch.device(value)


def why_no_gpu() -> str:
    """One clause saying why no GPU is usable in this process."""
    share = ray_gpu_share()
    if share is not None and not share:
        return "this simulated node holds no GPU share (simulation.gpus_per_node=0)"
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return f"no CUDA GPU is visible to this process{hidden}"


@dataclass(frozen=True)
class Placement:
    """How one process moves models and tensors to its compute device."""

    device: torch.device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 on CUDA (no loss scaling needed, unlike fp16); None on the CPU, where
        autocast would slow the small models here down and change their numbers."""
        return torch.bfloat16 if self.cuda else None

    def autocast(self) -> AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def copy_kwargs(self) -> dict:
        """Arguments of ``Tensor.to`` for a host-to-device copy."""
        return {"device": self.device, "non_blocking": self.cuda}

    def host(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in pinned host memory when it will be copied to a GPU (an async copy
        needs page-locked memory); unchanged on the CPU."""
        if self.cuda and t.device.type == "cpu" and not t.is_pinned():
            return t.pin_memory()
        return t

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(**self.copy_kwargs())

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model moved to the device (in place, as ``Module.to``)."""
        return model.to(self.device)


CPU = Placement(torch.device("cpu"))

# A split at most this large lives on the GPU for the whole run (one pinned,
# non-blocking copy); a larger one stays in pinned host memory and each batch is
# copied over as it is drawn.  A node's share is far below it.
RESIDENT_BUDGET_BYTES = 2 * 2**30


def split_nbytes(tensors: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for group in tensors.values() for t in group.values())


def keeps_resident(nbytes: int, budget_bytes: int = RESIDENT_BUDGET_BYTES) -> bool:
    """Whether a split of ``nbytes`` lives on the GPU (else: pinned host, streamed)."""
    return nbytes <= budget_bytes


def place_tensors(
    groups: dict[str, dict[str, torch.Tensor]],
    place: Placement,
    budget_bytes: int = RESIDENT_BUDGET_BYTES,
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.device | None]:
    """A split's tensor groups (``x``, ``mask``, ``y``) for ``place``, and where batches
    must still be copied to (None: the tensors are already where the model is).

    CPU: unchanged.  CUDA, within ``budget_bytes``: resident on the GPU.  Beyond it:
    pinned on the host, batches streamed (:func:`stream_batch`)."""
    if not place.cuda:
        return groups, None
    pinned = {g: {k: place.host(t) for k, t in v.items()} for g, v in groups.items()}
    if keeps_resident(split_nbytes(groups), budget_bytes):
        return {g: {k: place.to_device(t) for k, t in v.items()} for g, v in pinned.items()}, None
    return pinned, place.device


def stream_batch(parts: tuple[dict[str, torch.Tensor], ...], device: torch.device):
    """Rows gathered on the host, staged in pinned memory, copied without blocking."""
    place = Placement(device)
    return tuple({k: place.to_device(place.host(t)) for k, t in part.items()} for part in parts)


def placement_of(model: torch.nn.Module) -> Placement:
    """The placement a model lives on (its first parameter's device; CPU if none)."""
    param = next(model.parameters(), None)
    return Placement(param.device) if param is not None else CPU


# MMBind's node training (fed_iotlm/binding/training.py) draws its augmentations and
# partner picks with CPU generators and hands embeddings over as numpy: CPU only so far.
CPU_ONLY_METHODS = ("mmbind", "centralized_mmbind")


def train_placement(cfg: dict) -> Placement:
    """``cfg['train']['device']`` resolved in this process (default ``auto``); methods
    in :data:`CPU_ONLY_METHODS` resolve ``auto`` to the CPU and refuse ``cuda``."""
    setting = block(cfg, "train")["device"]
    method = config_setting(cfg, "method")
    if method in CPU_ONLY_METHODS:
        asked = resolve_device(setting, "train.device", gpu=True)  # checks the spelling
        if asked.type == "cuda" and str(setting).strip().lower() != "auto":
            raise DeviceError(
                f"train.device={setting}: method={method} trains on the CPU only so far "
                "(fed_iotlm/binding/training.py); set train.device=auto or cpu"
            )
        return CPU
    return Placement(resolve_device(setting, "train.device"))


def binding_device(cfg: dict) -> str:
    """``cfg['binding']['device']`` resolved in this process: ``"cpu"`` or ``"cuda[:N]"``."""
    return str(resolve_device(block(cfg, "binding")["device"], "binding.device"))


def check_devices(cfg: dict) -> None:
    """Start-up check of every device key, so a bad one fails before any work starts.

    In a simulation, ``train.device=cuda`` also needs ``simulation.gpus_per_node`` > 0:
    a node holding no GPU share would otherwise fail in its first round."""
    place = train_placement(cfg)
    binding_device(cfg)
    sim = block(cfg, "simulation")
    explicit = str(block(cfg, "train")["device"]).strip().lower() != "auto"
    federated = config_setting(cfg, "method") in GRID_METHODS
    if place.cuda and explicit and federated and not float(sim["gpus_per_node"]) > 0:
        raise DeviceError(
            "train.device=cuda: simulated nodes hold no GPU share (simulation.gpus_per_node=0); "
            "set simulation.gpus_per_node (e.g. 0.25 = four nodes per GPU) or train.device=auto"
        )
