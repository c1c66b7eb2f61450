"""First-binding pair accuracy of MMBind's SSL rounds, fast and in one process:
``python -m simulations.mmbind_pairs [override ...]``.

Emulates the federated shared-modality rounds of ``method=mmbind`` on the study
federation (50 % incompleteness, 10 % labels by default): each node trains the encoder
and SSL head from the global weights, the server averages them weighted by the
node's shared-modality count, and after the last round every node's embeddings are
matched exactly as the server does (:func:`match_nodes`).  Prints the same-class pair
accuracy of that first binding (training pairs only: no test label is read), for
matching on the tokens (what MMBind uploads) and on the projection head's output.
Use it to choose SSL settings; a real run logs the same figure in results.json
(``binding.pair_accuracy_by_binding``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch

from fed_iotlm.binding.embeddings import node_embeddings
from fed_iotlm.binding.matching import match_nodes
from fed_iotlm.binding.ssl import pretrain_shared, ssl_head
from fed_iotlm.binding.stats import binding_stats
from fed_iotlm.data.federation import build_layout
from fed_iotlm.experiment import (
    match_config,
    model_spec,
    shared_modality,
    ssl_config,
    ssl_train_config,
)
from fed_iotlm.federation.groups import group_of
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors
from fed_iotlm.settings import compose
from simulations.mmbind_study import incompleteness_plan, plan_override


def main(overrides: list[str]) -> dict:
    torch.set_num_threads(1)
    cfg = compose(
        ["experiment=mmbind_study", "method=mmbind", plan_override(incompleteness_plan(0.5)),
         "partition.label_fraction=0.1", *overrides]
    )  # fmt: skip
    t0 = time.time()
    layout = build_layout(cfg)
    torch.manual_seed(int(cfg["seed"]))
    model = MultisensoryModel(model_spec(cfg))
    shared, ssl = shared_modality(cfg), ssl_config(cfg)
    tcfg = ssl_train_config(cfg)
    trains = [SplitTensors.from_split(layout.node_data(i)[0]) for i in range(layout.num_nodes)]
    groups = {f"enc.{shared}", ssl_head(shared, ssl.method)}
    for rnd in range(1, int(cfg["binding"]["pretrain_rounds"]) + 1):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        sums: dict[str, torch.Tensor] = {}
        total = 0.0
        for i, data in enumerate(trains):
            model.load_state_dict(start)
            n = pretrain_shared(model, data, shared, tcfg, seed=rnd * 7919 + i, ssl=ssl)[
                "num_present"
            ]
            for k, v in model.state_dict().items():
                if group_of(k) in groups:
                    sums[k] = sums.get(k, 0) + n * v
            total += n
        model.load_state_dict({**start, **{k: v / total for k, v in sums.items()}})
    uploads = [node_embeddings(model, d, shared, str(i)) for i, d in enumerate(trains)]
    out = {}
    for space in ("token", "projection"):
        if space == "projection" and shared in model.proj:
            with torch.no_grad():
                uploads = [
                    replace(u, shared=model.proj[shared](torch.from_numpy(u.shared)).numpy())
                    for u in uploads
                ]
        elif space == "projection":
            continue
        stats = binding_stats(
            match_nodes(uploads, match_config(cfg)), [u.node for u in uploads], layout
        )
        out[space] = stats["pair_accuracy"]
    out["seconds"] = round(time.time() - t0)
    print(json.dumps({"overrides": overrides, **out}), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
