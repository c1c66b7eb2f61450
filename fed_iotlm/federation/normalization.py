"""How the federation's input statistics cross the wire.

``normalization=federated`` (the default): before the first round the server asks every
node for per-channel sums, sums of squares and counts of its training data
(``query.stats``; :class:`~fed_iotlm.data.preprocess.ChannelSums`), adds them up over
the nodes that hold each modality, and from then on attaches the pooled mean/std to
every message it sends (the ``norm`` ArrayRecord, a few hundred floats).  Nodes
standardise with those; the server standardises its validation/test reference sets
with the same, so no evaluation set is standardised with its own statistics.

``normalization=per_site``: each node uses its own training statistics and each site of
a reference set its own statistics: a named, transductive test-time adaptation, off by
default, reported as such.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ArrayRecord, Message

from fed_iotlm.config_schema import setting
from fed_iotlm.data.preprocess import (
    ChannelSums,
    Standardizer,
    standardizer_from_arrays,
    standardizer_to_arrays,
)

from .records import numpy_to_record, record_to_numpy

MODES = ("federated", "per_site")
NORM_KEY = "norm"  # the RecordDict entry a message's pooled statistics travel in
STATS_MESSAGE = "query.stats"


def normalization_mode(cfg: dict) -> str:
    """``normalization`` from the config, checked (absent: the schema's ``federated``)."""
    mode = str(setting(cfg, "normalization"))
    if mode not in MODES:
        raise ValueError(f"normalization={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def sums_record(sums: ChannelSums) -> ArrayRecord:
    """A node's statistics reply."""
    return numpy_to_record(sums.to_arrays())


def sums_from_record(record: ArrayRecord) -> ChannelSums:
    return ChannelSums.from_arrays(record_to_numpy(record))


def norm_record(scaler: Standardizer) -> ArrayRecord:
    """The pooled statistics as they travel with every message."""
    return numpy_to_record(standardizer_to_arrays(scaler))


def norm_from_message(msg: Message) -> tuple[Standardizer, str] | None:
    """The statistics a message carries and a digest naming them (None if it carries none)."""
    if NORM_KEY not in msg.content.array_records:
        return None
    arrays = record_to_numpy(msg.content.array_records[NORM_KEY])
    return standardizer_from_arrays(arrays), statistics_digest(arrays)


def statistics_digest(arrays: dict[str, np.ndarray]) -> str:
    """A short content hash: a node caches one standardised view per distinct statistics."""
    h = hashlib.sha1()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]
