"""(c) The seed's multisensory multitask adapter, y = W x + A_τ(E1(x1) ⊕ … ⊕ Em(xm)).

How we read IoT-LM (arXiv 2407.09801; the summary in /work/shared/seeds) and where we had
to choose, since the text gives the formula and a few words, not the code:

* **E_m** are the modality encoders.  Here they are the frozen federated encoders of the
  bundle (their outputs e_m ∈ R^D, plus the fused embedding ``fused`` treated as one more
  modality); the seed's "small feed-forward network that applies linear transformations
  and nonlinear activations to the features of each modality, followed by fusion" is
  φ_m(e) = GELU(W_m e + b_m) ∈ R^D, one per modality, shared by every layer and task.
* **⊕, fusion** (``llm.seed_adapter.fusion``): ``add`` is z = Σ_{m present} φ_m(e_m) ∈ R^D;
  ``concat`` is z = [φ_1(e_1); …; φ_M(e_M); p_1 … p_M] ∈ R^{M·D + M}, where an absent
  modality's block is exactly zero (``torch.where``, so its stored features are never
  read, not even as 0·NaN) **and** its presence bit p_m is 0: absence is stated by the
  bit, never posed as an observed reading of zeros.  Under ``add`` an absent modality is
  simply left out of the sum.  z is then RMS-normalised (no weight), so both fusions and
  any number of present modalities reach A at one scale (an all-absent z stays 0).
* **A, multitask**: one low-rank adapter per task τ and per adapted layer l,
  A_{l,τ}(z) = V_{l,τ} U_{l,τ} z with U ∈ R^{r×|z|} (scaled normal) and V ∈ R^{H×r}
  **zero-initialised**, so the model starts as the plain LM, bit for bit.  τ is the task
  the question asks about (routing.py), as for the gated adapter.
* **"y = W + A(…)", where**: W is read as the frozen decoder layer's feed-forward block
  (whose last operation is the linear W_down), so A's output, one vector per sequence,
  is added to that block's output at every position, i.e. into the residual stream after
  the layer (a per-sample bias, the literal reading of the formula: the adapter term
  does not depend on the text x).  ``llm.seed_adapter.layers`` = the last N decoder
  layers (the depth knob, as ``llm.adapter.layers``).
* A question about several recordings (comparison, count) adds the recordings' A
  outputs: a set, like the gated adapter's one prompt of every recording's tokens.
* **Centring** (``llm.seed_adapter.center``, on by default; off is the literal reading): z minus its mean over
  recordings (the batch's in training, a running mean, momentum 0.1, in evaluation, as a
  batch norm without scaling).  Why: the φ_m are GELUs, so z has a large component
  common to every recording, and A(z) = V U z is then mostly one vector per task, the same
  for every sample (``fed_iotlm/llm/seed_probe.py`` measured its spread over samples at
  0.06–0.18 of its mean after 80 steps): a bias that learns the answer's format, not the
  class.  Centred, only what differs between recordings reaches the LM.  The running mean
  starts at 0 and V at 0, so the model still starts as the plain LM.

The LLaMA-Adapter-style gated adapter (conditioning.py, ``adapter``) is the other reading:
the sensors there enter attention as keys/values; here they only shift hidden states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("add", "concat")
CENTER_MOMENTUM = 0.1  # the running mean of z (llm.seed_adapter.center), as batch norm's


class SeedAdapter(nn.Module):
    """The seed's adapter as forward hooks on the feed-forward blocks of the last
    ``num_layers`` decoder layers (see the module docstring for the formulation)."""

    def __init__(
        self,
        names: list[str],
        dim: int,
        hidden: int,
        num_tasks: int,
        num_layers: int,
        fusion: str = "add",
        rank: int = 8,
        center: bool = False,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"llm.seed_adapter.fusion={fusion!r}: choose one of {FUSIONS}")
        if rank < 1 or num_layers < 1 or num_tasks < 1:
            raise ValueError(
                f"seed adapter: rank={rank}, layers={num_layers}, tasks={num_tasks}; each must be >= 1"
            )
        self.names, self.fusion, self.num_layers = list(names), fusion, num_layers
        self.phi = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for m in self.names}
        )
        m = len(self.names)
        self.fused_dim = dim if fusion == "add" else m * dim + m
        # U: like LoRA's A (small random), V: like LoRA's B (zero): A_{l,τ} starts at 0
        self.down = nn.Parameter(
            torch.randn(num_layers, num_tasks, rank, self.fused_dim) / self.fused_dim**0.5
        )
        self.up = nn.Parameter(torch.zeros(num_layers, num_tasks, hidden, rank))
        self.center = center
        if center:  # evaluation's mean of z over recordings (module docstring, "Centring")
            self.register_buffer("z_mean", torch.zeros(self.fused_dim))
        self.layer_indices: list[int] = []
        self._delta: torch.Tensor | None = None  # [L, B, H] for the next passes
        self._handles: list = []
        self._ratio_sum = [0.0] * num_layers
        self._ratio_n = [0] * num_layers

    def fuse(self, feats: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """z [N, fused_dim] from per-modality features ([N, D] each, ``names`` order) and
        ``present`` [N, M] bool; absent modalities contribute nothing (module docstring)."""
        phi = torch.stack([self.phi[m](feats[m].float()) for m in self.names], 1)  # [N, M, D]
        keep = present.bool()[..., None]
        phi = torch.where(keep, phi, torch.zeros((), dtype=phi.dtype, device=phi.device))
        if self.fusion == "add":
            z = phi.sum(1)
        else:
            z = torch.cat([phi.flatten(1), present.to(phi.dtype)], 1)
        z = F.rms_norm(z, (z.shape[-1],))
        return self._centred(z, present.bool().any(1)) if self.center else z

    def _centred(self, z: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """z minus the mean over the rows that hold a recording (``held``; padding rows
        stay 0): the batch's in training (the running mean follows it), else the running
        mean."""
        if self.training and held.any():
            mean = z[held].mean(0)
            with torch.no_grad():
                self.z_mean.lerp_(mean.detach().to(self.z_mean.dtype), CENTER_MOMENTUM)
        else:
            mean = self.z_mean.to(z.dtype)
        return torch.where(held[:, None], z - mean, torch.zeros((), dtype=z.dtype, device=z.device))

    def install(self, causal_lm: nn.Module, active: Callable[[], bool] = lambda: True) -> None:
        """Hook the feed-forward block (``mlp``) of the last ``num_layers`` decoder layers.
        ``active``: whether the owner's LoRA adapter is in use (a shared base runs other
        conditionings' passes too, which must not pick up this context)."""
        from .conditioning import _decoder_layers

        self._active = active
        inner = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        model = type(inner).__name__
        layers = _decoder_layers(causal_lm)
        if not 1 <= self.num_layers <= len(layers):
            raise ValueError(
                f"llm.seed_adapter.layers={self.num_layers}: {model} has {len(layers)} decoder layers"
            )
        if self.up.shape[2] != int(causal_lm.get_input_embeddings().weight.shape[1]):
            raise ValueError(f"seed adapter: hidden size {self.up.shape[2]} is not {model}'s")
        first = len(layers) - self.num_layers
        for li, layer in enumerate(layers[first:]):
            mlp = getattr(layer, "mlp", None)
            if mlp is None:
                raise ValueError(
                    f"{model} decoder layer {first + li} ({type(layer).__name__}) has no "
                    "feed-forward block 'mlp' for the seed adapter; use llm.conditioning=[prefix]"
                )
            self.layer_indices.append(first + li)
            self._handles.append(mlp.register_forward_hook(self._hook(li)))

    def set_context(
        self,
        feats: dict[str, torch.Tensor],
        present: torch.Tensor,
        task_ids: torch.Tensor,
        routing: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        """Each sequence's adapter outputs for the next passes.  ``present`` [B, M], or
        [B, S, M] for S recordings per sequence (``feats`` rows [B·S, D] in that order; a
        padded recording is all-absent and adds 0); ``task_ids`` [B], the routed tasks.
        ``routing`` (per-token tasks, as the gated adapter takes) is not used: A(z) is one
        output per sequence, added at every position, from the last question's task (a
        training dialog's earlier answers too), so in-context examples stay refused."""
        del routing
        b, m = task_ids.shape[0], len(self.names)
        z = self.fuse(feats, present.reshape(-1, m)).view(b, -1, self.fused_dim)
        down, up = self.down[:, task_ids], self.up[:, task_ids]  # [L, B, r, F], [L, B, H, r]
        low = torch.einsum("lbrf,bsf->lbr", down, z)  # Σ over recordings (A is linear in z)
        self._delta = torch.einsum("lbhr,lbr->lbh", up, low)

    def repeat_context(self, repeats: int) -> None:
        """Each sequence's outputs ``repeats`` times in a row (options of one prompt)."""
        if self._delta is not None:
            self._delta = self._delta.repeat_interleave(repeats, 1)

    def clear_context(self) -> None:
        self._delta = None

    def take_output_ratios(self) -> list[float | None]:
        """Per adapted layer, the mean ‖A(z)‖ / ‖feed-forward output‖ (Frobenius over the
        batch and positions) over the training passes since the last call, then reset;
        None for a layer with no pass: is the adapter heard at all?"""
        out = [s / n if n else None for s, n in zip(self._ratio_sum, self._ratio_n, strict=True)]
        self._ratio_sum = [0.0] * self.num_layers
        self._ratio_n = [0] * self.num_layers
        return out

    def _hook(self, li: int):
        def hook(mlp, args, output):
            if self._delta is None or not self._active():  # no sensors / not our pass
                return output
            extra = self._delta[li][:, None, :].to(output.dtype)
            if self.training:
                with torch.no_grad():
                    full = extra.float().norm() * output.shape[1] ** 0.5
                    self._ratio_sum[li] += float(full / output.float().norm().clamp_min(1e-12))
                self._ratio_n[li] += 1
            return output + extra

        return hook
