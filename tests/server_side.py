"""What a test that drives the ClientApp in-process must send as the server would."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fed_iotlm.data.federation import build_layout
from fed_iotlm.federation.normalization import norm_record


def pooled_norm(cfg: dict) -> ArrayRecord:
    """The pooled training statistics the statistics round would attach to every message
    (``normalization=federated``)."""
    return norm_record(build_layout(cfg).training_sums().standardizer())
