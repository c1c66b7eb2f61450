"""Domain-shift diagnostics: per-site/per-modality accuracy and embedding shift
(linear CKA, RBF-MMD) before and after federation; ``diagnostics.enabled=true``."""

from .report import (
    DiagnosticsConfig,
    accuracy_by_site,
    diagnostics_config,
    embedding_shift,
    node_view_accuracy,
    run_diagnostics,
)
from .similarity import linear_cka, median_bandwidth, rbf_mmd2

__all__ = [
    "DiagnosticsConfig",
    "accuracy_by_site",
    "diagnostics_config",
    "embedding_shift",
    "linear_cka",
    "median_bandwidth",
    "node_view_accuracy",
    "rbf_mmd2",
    "run_diagnostics",
]
