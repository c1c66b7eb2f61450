"""Federated LoRA payload bytes per site per round, computed from layer shapes (no download).

Compares the former wire format (FedEx residual as a dense fp32 [out, in] per layer; FFA
sending A both ways) with the current one (FedEx residual as stacked factors; FFA B only),
for the default set-up (SmolLM2-135M, q/v, r=8, 3 sites, 3 rounds) and an 8B-shaped
all-linear one (Llama-3-8B shapes, r=16).  For the default set-up the formula is checked
against :func:`fed_iotlm.llm.lora_wire.pack` on real tensors.  Prints JSON.

    PYTHONPATH=$PWD python benchmarks/fedlora_bytes.py
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

F32 = 4


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    kv: int  # num_key_value_heads × head_dim

    def linear(self, targets: tuple[str, ...]) -> list[tuple[int, int]]:
        """(out, in) of every adapted linear layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        per = {
            "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }  # fmt: skip
        return [per[t] for _ in range(self.layers) for t in targets]


def per_round(shapes, r: int, sites: int, rounds: int, method: str, new: bool) -> list[dict]:
    """[{round, down, up}] payload bytes of LoRA factors and residual (projector excluded)."""
    ab = sum(r * (o + i) for o, i in shapes) * F32
    b_only = sum(r * o for o, _ in shapes) * F32
    dense = sum(o * i for o, i in shapes) * F32
    rows = []
    for t in range(1, rounds + 1):
        down = up = ab
        if method == "ffa" and new:
            down = up = b_only
        if method == "fedex" and t > 1:  # C_{t-1} holds t-1 rounds
            down += (t - 1) * (sites + 1) * ab if new else dense
        rows.append({"round": t, "down": down, "up": up})
    return rows


def _check_against_pack(shapes, r: int, sites: int) -> None:
    """The formula equals what pack() puts on the wire (round 2 of FedEx, and FFA)."""
    from fed_iotlm.llm.fedlora import LoraFactors, aggregate_lora
    from fed_iotlm.llm.lora_wire import pack

    site = {f"l{k}": LoraFactors(torch.randn(r, i), torch.randn(o, r), 2.0)
            for k, (o, i) in enumerate(shapes)}  # fmt: skip
    agg = aggregate_lora([site] * sites, [1.0] * sites, "fedex")
    wire = sum(a.nbytes for a in pack(agg.per_site[0], residual=agg.residual).values())
    want = per_round(shapes, r, sites, 2, "fedex", new=True)[1]["down"]
    assert wire == want, (wire, want)
    ffa = sum(a.nbytes for a in pack(site, b_only=True).values())
    assert ffa == per_round(shapes, r, sites, 1, "ffa", new=True)[0]["up"]


def report(shape: Shape, targets, r: int, sites: int, rounds: int) -> dict:
    shapes = shape.linear(targets)
    out = {"model": shape.name, "targets": list(targets), "r": r, "sites": sites,
           "rounds": rounds, "methods": {}}  # fmt: skip
    for method in ("fedit", "ffa", "fedex"):
        old = per_round(shapes, r, sites, rounds, method, new=False)
        new = per_round(shapes, r, sites, rounds, method, new=True)
        mean = lambda rows, k: sum(x[k] for x in rows) / len(rows)  # noqa: E731
        out["methods"][method] = {
            "before_down_mean": mean(old, "down"), "before_up_mean": mean(old, "up"),
            "after_down_mean": mean(new, "down"), "after_up_mean": mean(new, "up"),
            "before_down_max": max(x["down"] for x in old),
            "after_down_max": max(x["down"] for x in new),
        }  # fmt: skip
    return out


def main() -> None:
    smol = Shape("SmolLM2-135M", 30, 576, 1536, 192)
    llama8b = Shape("Llama-3-8B (shapes)", 32, 4096, 14336, 1024)
    _check_against_pack(smol.linear(("q_proj", "v_proj")), 8, 3)
    all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    print(json.dumps({
        "default": report(smol, ("q_proj", "v_proj"), 8, 3, 3),
        "8b_all_linear": report(llama8b, all_linear, 16, 3, 3),
        "8b_all_linear_10_rounds": report(llama8b, all_linear, 16, 3, 10),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
