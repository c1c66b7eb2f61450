"""Domain-shift diagnostics of a federated run: accuracy per site and per modality, and
how far apart the sites' embeddings are, before and after federation.

What a "site" is follows the layout's ``shift_unit`` (a node by default, or the
dataset's own ``split.site``), so the groups here are exactly the groups the shift was
applied to.

* ``accuracy_by_site``: the model on the global test split grouped by site, each group
  standardised with its own statistics (an evaluation set is a new site), all
  modalities and each modality alone (:func:`fed_iotlm.evaluation.test_report`).
* ``accuracy_by_node``: the model on each node's own test view (its modalities, its
  training statistics): the figure ``test.accuracy_by_node`` reports for a node, here
  always for the shared global model, also when nodes personalise it.
* ``embedding_shift``: one probe set of RAW test samples is shifted as every site in
  turn (the same transform that site's data got), featurised, standardised and
  encoded; paired rows make linear CKA meaningful, and the shared content removes
  label skew from MMD, so the figures measure input shift only as each encoder sees
  it.  ``before`` is the initial model (random encoders: the raw shift as a random
  projection sees it), ``after`` the final global model; an encoder that became
  site-invariant shows CKA rising towards 1 and MMD falling towards 0 from before to
  after.  With no shift every site's probe is identical: CKA 1, MMD 0 exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from fed_iotlm.config_schema import block
from fed_iotlm.data.dataset import Split
from fed_iotlm.data.federation import FederationLayout, load_raw_dataset
from fed_iotlm.data.modalities import ModalitySpec
from fed_iotlm.data.preprocess import Standardizer, featurize_split, standardize_own
from fed_iotlm.data.shift import apply_shifts, parse_shift_config
from fed_iotlm.evaluation import test_report
from fed_iotlm.federation.records import load_into
from fed_iotlm.models.multisensory import ModelSpec, MultisensoryModel
from fed_iotlm.models.training import SplitTensors, evaluate, mean_accuracy

from .similarity import linear_cka, rbf_mmd2


@dataclass(frozen=True)
class DiagnosticsConfig:
    """``cfg['diagnostics']``."""

    enabled: bool = False
    probe_samples: int = 256


def diagnostics_config(cfg: Mapping) -> DiagnosticsConfig:
    d = block(cfg, "diagnostics")  # absent: the schema's (off)
    out = DiagnosticsConfig(bool(d["enabled"]), int(d["probe_samples"]))
    if out.probe_samples < 2:
        raise ValueError(f"diagnostics.probe_samples must be >= 2, got {out.probe_samples}")
    return out


def run_diagnostics(
    cfg: Mapping,
    layout: FederationLayout,
    spec: ModelSpec,
    *,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    scaler: Standardizer | None = None,
) -> dict:
    """``results.json["diagnostics"]`` for a run that started at ``before`` (the initial
    global state) and ended at ``after`` (the final global state).  Accuracies use the
    federation's pooled training statistics ``scaler``; with None (``normalization=
    per_site``) every site and node standardises with its own, as that run did."""
    dcfg = diagnostics_config(cfg)
    models = {}
    for stage, state in (("before", before), ("after", after)):
        models[stage] = MultisensoryModel(spec)
        load_into(models[stage], state)
    sites = (
        sorted(int(s) for s in np.unique(layout.test_sites))
        if layout.test_sites is not None
        else []
    )
    probe = probe_split(cfg, layout, dcfg.probe_samples)
    specs = layout.dataset.meta.modalities
    out: dict = {
        "unit": layout.shift_unit,
        "sites": sites,
        "shifted_sites": shifted_sites(layout.shift, sites),
        "probe_samples": len(probe),
    }
    if layout.test_sites is not None:
        out["accuracy_by_site"] = accuracy_by_site(
            models["after"], layout.dataset.test, layout.test_sites, scaler
        )
    out["accuracy_by_node"] = node_view_accuracy(models["after"], layout, scaler)
    out["embedding_shift"] = {
        stage: embedding_shift(model, probe, specs, sites, layout.shift, layout.seed)
        for stage, model in models.items()
    }
    return out


def shifted_sites(entries: list, sites: list[int]) -> list[int]:
    """The sites at least one shift entry touches with a non-zero severity."""
    touched: set[int] = set()
    for e in parse_shift_config(entries):
        for s in sites if e.sites is None else e.sites:
            if e.site_severity.get(s, e.severity) > 0 or e.params:
                touched.add(int(s))
    return sorted(touched & set(sites))


# ---------------------------------------------------------------------------- accuracy


def accuracy_by_site(
    model: MultisensoryModel,
    test: Split,
    sites: np.ndarray,
    scaler: Standardizer | None = None,
) -> dict:
    """Per site: all-modality and per-modality accuracy on that site's test samples,
    standardised with ``scaler`` (pooled training statistics) or, if None, the site's own."""
    out = {}
    for s in np.unique(sites):
        part = test.subset(np.flatnonzero(sites == s))
        part = scaler.transform(part) if scaler is not None else standardize_own(part)
        report = test_report(model, SplitTensors.from_split(part))
        out[str(int(s))] = {
            "accuracy": report["accuracy"],
            "accuracy_by_modality": report["accuracy_by_modality"],
            "num_samples": len(part),
        }
    return out


def node_view_accuracy(
    model: MultisensoryModel, layout: FederationLayout, scaler: Standardizer | None = None
) -> dict[str, float]:
    """The model on each node's own test view (the node's modalities; the pooled
    statistics, or the node's own training statistics when ``scaler`` is None)."""
    return {
        str(k): mean_accuracy(
            evaluate(model, SplitTensors.from_split(layout.node_data(k, scaler)[1]))
        )
        for k in range(layout.num_nodes)
    }


# ----------------------------------------------------------------------------- embeddings


def probe_split(cfg: Mapping, layout: FederationLayout, n: int) -> Split:
    """A seeded subset of ``n`` RAW (unshifted, unfeaturised) test samples."""
    raw = load_raw_dataset(cfg["data"], layout.seed).test
    total = len(raw)
    rng = np.random.default_rng(layout.seed + 7)
    idx = np.sort(rng.choice(total, size=min(n, total), replace=False))
    return raw.subset(idx)


@torch.no_grad()
def encode(model: MultisensoryModel, split: Split, batch: int = 512) -> dict[str, np.ndarray]:
    """Encoder outputs (modality tokens) [N, D] per modality of a featurised split."""
    model.eval()
    data = SplitTensors.from_split(split)
    out: dict[str, list[torch.Tensor]] = {m: [] for m in data.x}
    for start in range(0, len(data), batch):
        idx = torch.arange(start, min(start + batch, len(data)))
        x, _, _ = data.batch(idx)
        for m, tok in model.encode(x).items():
            out[m].append(tok)
    return {m: torch.cat(v).numpy() for m, v in out.items() if v}


def _site_views(
    probe: Split, specs: Mapping[str, ModalitySpec], sites: list[int], entries: list, seed: int
) -> dict[str, Split]:
    """The probe as the clean reference and as each site would have recorded it."""
    views = {"reference": probe}
    for s in sites:
        views[str(s)] = apply_shifts(probe, s, entries, seed, specs=specs)
    return {k: standardize_own(featurize_split(v, dict(specs))) for k, v in views.items()}


def embedding_shift(
    model: MultisensoryModel,
    probe: Split,
    specs: Mapping[str, ModalitySpec],
    sites: list[int],
    entries: list,
    seed: int,
) -> dict:
    """Per modality: CKA and MMD of each site against the clean probe, the pairwise
    site-by-site matrices, and their means over site pairs."""
    views = _site_views(probe, specs, sites, entries, seed)
    emb = {k: encode(model, v) for k, v in views.items()}
    masks = {k: v.mask for k, v in views.items()}
    out: dict = {}
    for m in probe.x:

        def pair(a: str, b: str, m: str = m) -> tuple[float, float]:
            both = masks[a][m] & masks[b][m]
            if both.sum() < 2:
                return float("nan"), float("nan")
            x, y = emb[a][m][both], emb[b][m][both]
            return linear_cka(x, y), rbf_mmd2(x, y)

        to_ref = {
            str(s): dict(zip(("cka", "mmd"), pair("reference", str(s)), strict=True)) for s in sites
        }
        n = len(sites)
        cka, mmd = np.eye(n), np.zeros((n, n))
        for i, j in combinations(range(n), 2):
            c, d = pair(str(sites[i]), str(sites[j]))
            cka[i, j] = cka[j, i] = c
            mmd[i, j] = mmd[j, i] = d
        off = ~np.eye(n, dtype=bool)
        out[m] = {
            "to_reference": to_ref,
            "pairwise": {"cka": _rounded(cka), "mmd": _rounded(mmd)},
            "mean_pairwise": {
                "cka": float(np.nanmean(cka[off])) if n > 1 else float("nan"),
                "mmd": float(np.nanmean(mmd[off])) if n > 1 else float("nan"),
            },
        }
    return out


def _rounded(a: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in a]
