"""What a binding produced: pair counts, similarity and, in simulation, pair accuracy.

Only a simulation knows every node's true labels, so only there can the share of
pseudo-pairs whose two samples share a class be checked (MMBind logs it the same way).
It is the measure of the shared-modality embedding that matters: a binding can only
teach what its pairs get right.
"""

from __future__ import annotations

import numpy as np

from fed_iotlm.data.federation import FederationLayout

from .matching import Partners


def true_train_labels(layout: FederationLayout, node: int) -> dict[str, np.ndarray]:
    """Every training label of node ``node``, hidden or not, in the row order of its
    training split (:meth:`FederationLayout.node_data`: samples holding one of its
    modalities)."""
    own = layout.dataset.train.subset(layout.train_parts[node]).keep_modalities(layout.plan[node])
    keep = own.present_any()
    return {t: y[keep] for t, y in own.y.items()}


def binding_stats(
    partners: dict[str, dict[str, Partners]],
    order: list[str],
    layout: FederationLayout | None,
) -> dict:
    """Counts, mean similarity and (``layout`` given) per-task pair accuracy: the share
    of the pseudo-pairs whose two samples share the task's class.  ``order``: the node
    names in the order ``Partners.partner_node`` indexes them."""
    sims, pairs, refused = [], 0, 0
    same: dict[str, list[np.ndarray]] = {}
    labels = {} if layout is None else {n: true_train_labels(layout, int(n)) for n in order}
    for pid, per_mod in partners.items():
        for p in per_mod.values():
            ok = p.partner_ids >= 0
            pairs += int(ok.sum())
            refused += p.refused
            sims.append(p.similarity[ok])
            if layout is None:
                continue
            for t, y in labels[pid].items():
                y_own = np.repeat(y[p.query_ids][:, None], p.partner_ids.shape[1], 1)
                y_partner = np.full_like(y_own, -2)
                for j in np.unique(p.partner_node[ok]):
                    sel = ok & (p.partner_node == j)
                    y_partner[sel] = labels[order[j]][t][p.partner_ids[sel]]
                same.setdefault(t, []).append(labelled_agreement(y_own, y_partner, ok))
    # a binding that made no pair has no similarity and no pair accuracy to report: None
    # (valid JSON in results.json), never a NaN mean over nothing
    out = {
        "pairs": pairs,
        "refused": refused,
        "mean_similarity": float(np.concatenate(sims).mean()) if pairs else None,
    }
    agree = {t: np.concatenate(v) for t, v in same.items()}
    if pairs and any(a.size for a in agree.values()):
        out["pair_accuracy"] = {t: float(a.mean()) for t, a in agree.items() if a.size}
        out["labelled_pairs"] = {t: int(a.size) for t, a in agree.items()}
    return out


def labelled_agreement(y_own: np.ndarray, y_partner: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Whether each made pair's two samples share the class, over the pairs whose two
    samples both carry a label for the task.  A real dataset leaves samples unlabelled
    (-1) for a task (ExtraSensory: most minutes for some tasks); counting two unlabelled
    samples as "the same class" and a labelled one against an unlabelled one as
    "different" would measure label coverage, not the embedding."""
    both = ok & (y_own >= 0) & (y_partner >= 0)
    return (y_own == y_partner)[both]
