"""The global reference sets a run reports on: validation (for choices) and test.

Both are standardised with statistics of TRAINING data (the federation's pooled
statistics, :mod:`fed_iotlm.federation.normalization`), never with their own, unless the
run asks for the named test-time adaptation ``normalization=per_site`` (each site of a
reference set standardised with that site's own statistics; transductive).
"""

from __future__ import annotations

from dataclasses import dataclass

from .dataset import Split
from .federation import FederationLayout
from .preprocess import Standardizer, standardize_per_site


@dataclass(frozen=True)
class ReferenceSets:
    """Standardised global validation and test splits, every modality present."""

    val: Split
    test: Split


def reference_sets(
    layout: FederationLayout, scaler: Standardizer | None, mode: str
) -> ReferenceSets:
    """``val``/``test`` standardised with ``scaler`` (``federated``) or per site (``per_site``)."""
    val, test = layout.val_split(), layout.dataset.test
    if mode == "per_site":
        return ReferenceSets(
            standardize_per_site(val, layout.val_split_sites()),
            standardize_per_site(test, layout.test_sites),
        )
    if scaler is None:
        raise ValueError("normalization=federated needs the pooled training statistics")
    return ReferenceSets(scaler.transform(val), scaler.transform(test))
