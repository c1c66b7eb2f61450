"""How ``train.class_weighting=balanced`` crosses the wire in a federation.

The class counts ride on the statistics round (:mod:`.normalization`): when the server
asks for them (``class-counts`` in the ``query.stats`` config, only under ``balanced``,
so nothing more leaves a node otherwise), a node adds its per-task class counts of its
labelled training samples to its reply (``class_counts``); the server sums them over
every node (the global counts), computes the balanced weights
(:func:`fed_iotlm.models.class_weights.balanced_weights`) and attaches them, like the
pooled input statistics, to every message it sends afterwards (``class_weights``), so
every node optimises the same objective and a site that restarts gets them again with
its next message.  What the server learns: in the plain round each node's class counts
(as it learns each node's per-channel sums); under SecAgg+ only their sum
(:mod:`.secure_statistics`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message

from .records import numpy_to_record, record_to_numpy

COUNTS_KEY = "class_counts"  # a statistics reply's per-task class counts
WEIGHTS_KEY = "class_weights"  # every later message's per-task class weights
ASK_COUNTS = "class-counts"  # query.stats config flag: the server wants class counts


def counts_record(counts: Mapping[str, np.ndarray]) -> ArrayRecord:
    return numpy_to_record({t: np.asarray(c, dtype=np.int64) for t, c in counts.items()})


def counts_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {t: np.asarray(c, dtype=np.int64) for t, c in record_to_numpy(record).items()}


def weights_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    return numpy_to_record({t: np.asarray(w, dtype=np.float64) for t, w in weights.items()})


def weights_from_message(msg: Message) -> dict[str, tuple[float, ...]] | None:
    """The class weights a message carries, as TrainConfig takes them (None: none)."""
    if WEIGHTS_KEY not in msg.content.array_records:
        return None
    arrays = record_to_numpy(msg.content.array_records[WEIGHTS_KEY])
    return {t: tuple(float(v) for v in np.asarray(w).ravel()) for t, w in arrays.items()}
