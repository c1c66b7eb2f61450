"""A strategy's state across rounds, as checkpoint sections and JSON.

flwr's strategies are plain objects: FedAdam/FedYogi/FedAdagrad keep the server
optimiser's moments in ``m_t``/``v_t`` between rounds.  Resuming from round k must give
the strategy exactly what it had after round k, or round k+1 would aggregate
differently (Adam with zeroed moments is a different optimiser).  That optimiser state
is all a strategy carries across rounds: what each round did is in the run's round
records (:mod:`.round_record`), which the checkpoint saves on its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# server-optimiser state: dicts of arrays keyed like the model (FedOpt family) or lists
# of arrays (FedAvgM); None before the first round
OPTIMISER_ATTRS = ("m_t", "v_t", "momentum_vector")
PREFIX = "optimizer."


def capture_strategy(strategy: object) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """(JSON bookkeeping, array sections ``optimizer.<attr>``) of ``strategy``."""
    sections: dict[str, dict[str, np.ndarray]] = {}
    meta: dict[str, Any] = {"optimizer_lists": []}
    for attr in OPTIMISER_ATTRS:
        value = getattr(strategy, attr, None)
        if isinstance(value, dict):
            sections[PREFIX + attr] = {k: np.asarray(v) for k, v in value.items()}
        elif isinstance(value, list | tuple):
            sections[PREFIX + attr] = {f"{i:06d}": np.asarray(v) for i, v in enumerate(value)}
            meta["optimizer_lists"].append(attr)
        elif value is not None:
            raise TypeError(f"{type(strategy).__name__}.{attr}: cannot checkpoint {type(value)}")
    return meta, sections


def restore_strategy(
    strategy: object, meta: dict[str, Any], sections: dict[str, dict[str, np.ndarray]]
) -> None:
    """Put captured state back into a freshly built strategy of the same kind."""
    lists = set(meta.get("optimizer_lists", []))
    for attr in OPTIMISER_ATTRS:
        if hasattr(strategy, attr):
            arrays = sections.get(PREFIX + attr)
            if arrays is None:
                setattr(strategy, attr, None)
            elif attr in lists:
                setattr(strategy, attr, [arrays[k] for k in sorted(arrays)])
            else:
                setattr(strategy, attr, dict(arrays))
