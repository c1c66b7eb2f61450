"""Build 1 of issue 13: with ``llm.data`` at its default the central LM stage receives
frozen-encoder tokens and the nodes' own labels, never a raw window.

The leak check compares every value of every upload against every node's windows, both
as the node holds them (standardised with its own statistics) and as the dataset has
them (featurised and raw), flattened row-major and column-major: any contiguous run of
``PROBE`` values of a window that reappears contiguously in an upload, at any scale or
offset (correlation), is a leak.  The injection tests show the check catches one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array

from fed_iotlm.data.federation import build_layout, load_raw_dataset
from fed_iotlm.experiment import model_spec
from fed_iotlm.llm.recipe import stage_data, stage_questions
from fed_iotlm.llm.uploads import TOKEN, unpack_upload
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.settings import compose

PROBE = 16  # values per probe: a chance |r| > 0.999 over 16 values does not happen (p < 1e-17)
DATA = ["data.num_train=48", "data.num_test=16"]  # the default experiment's 8 nodes


def _windows(cfg: dict) -> list[np.ndarray]:
    """Every window any node holds, in every form it exists on the node side."""
    layout = build_layout(cfg)
    out = []
    splits = [s for n in range(layout.num_nodes) for s in layout.node_data(n)]
    raw = load_raw_dataset(cfg["data"], int(cfg["seed"]))
    splits += [layout.dataset.train, layout.dataset.test, raw.train, raw.test]
    for split in splits:
        for m, arr in split.x.items():
            for i in np.nonzero(np.asarray(split.mask[m]))[0]:
                w = np.asarray(arr[i], np.float64)
                out.append(w.reshape(-1))
                if w.ndim >= 2:
                    out.append(w.reshape(w.shape[0], -1).T.reshape(-1))
    return out


def _unit_runs(x: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous runs of PROBE values (every ``step``), centred and scaled to unit norm;
    runs that are (nearly) constant carry no pattern and are dropped."""
    x = np.asarray(x, np.float32).reshape(-1)
    if len(x) < PROBE:
        return np.zeros((0, PROBE), np.float32), np.zeros(0, np.int64)
    runs = np.lib.stride_tricks.sliding_window_view(x, PROBE)[::step]
    runs = runs - runs.mean(1, keepdims=True)
    norm = np.linalg.norm(runs, axis=1)
    keep = norm > 1e-6 * max(1.0, float(np.abs(x).max()))
    return runs[keep] / norm[keep, None], np.nonzero(keep)[0] * step


def probes_of(windows: list[np.ndarray]) -> np.ndarray:
    """Every window cut into non-overlapping runs of PROBE values, unit-normalised."""
    return np.concatenate([_unit_runs(w, PROBE)[0] for w in windows])


def raw_leaks(records, probes: np.ndarray, threshold: float = 0.999) -> list[str]:
    """Where a window's run reappears in an upload (empty: no leak).  Every array of
    every record is searched at every offset, flattened (so a window split across rows
    is found too)."""
    found = []
    for n, record in enumerate(records):
        for key in record:
            runs, starts = _unit_runs(record[key].numpy(), 1)
            for i in range(0, len(runs), 4096):
                corr = np.abs(runs[i : i + 4096] @ probes.T)
                hits = np.nonzero(corr.max(1) > threshold)[0]
                found += [f"upload {n} {key!r} at value {starts[i + h]}" for h in hits[:3]]
    return found


@pytest.fixture(scope="module")
def setup():
    cfg = compose([*DATA, "partition.label_fraction=0.5", "llm.bundle=in-memory"])
    torch.manual_seed(0)
    encoder = MultisensoryModel(model_spec(cfg))
    windows = _windows(cfg)
    return cfg, encoder, windows, probes_of(windows)


def _with_value(records, n: int, key: str, values: np.ndarray, at: int):
    """Records with ``values`` written into upload ``n``'s array ``key`` at flat ``at``."""
    arr = records[n][key].numpy().copy()
    flat = arr.reshape(-1)
    flat[at : at + len(values)] = values.astype(arr.dtype)
    out = list(records)
    rec = type(records[n])({k: records[n][k] for k in records[n]})
    rec[key] = Array(np.ascontiguousarray(arr))
    out[n] = rec
    return out


@pytest.mark.parametrize("quantize", [False, True])
def test_default_uploads_carry_no_raw_window_and_the_check_catches_one(setup, quantize):
    cfg, encoder, windows, probes = setup
    cfg = {**cfg, "llm": {**cfg["llm"], "upload": {"noise_sigma": 0.0, "quantize": quantize}}}
    assert cfg["llm"]["data"] == "nodes"  # the default
    data = stage_data(cfg, encoder)
    assert data.source["raw_samples_at_centre"] == 0
    assert len(data.uploads) == 2 * build_layout(cfg).num_nodes  # train and test per node
    assert raw_leaks(data.uploads, probes) == []
    # a raw window injected into an upload (scaled and shifted, or int8 like the tokens)
    key = next(k for k in data.uploads[1] if k.startswith(TOKEN))
    window = windows[len(windows) // 2]
    injected = window[5 : 5 + 40]
    if quantize:
        injected = np.clip(np.rint(injected / np.abs(injected).max() * 127), -127, 127)
    else:
        injected = 3.5 * injected - 2.0
    leaked = _with_value(data.uploads, 1, key, injected, at=70)  # crosses a row boundary
    assert raw_leaks(leaked[1:2], probes), "the check missed an injected raw window"


def test_centre_rows_are_the_nodes_rows_with_the_labels_they_hold(setup):
    cfg, encoder, _, _ = setup
    layout = build_layout(cfg)
    data = stage_data(cfg, encoder)
    node_train = [layout.node_data(n)[0] for n in range(layout.num_nodes)]
    node_test = [layout.node_data(n)[1] for n in range(layout.num_nodes)]
    assert len(data.train) == sum(len(s) for s in node_train)
    assert len(data.test) == sum(len(s) for s in node_test)
    held = sum(int((s.y["activity"] >= 0).sum()) for s in node_train)
    assert int((data.train.y["activity"] >= 0).sum()) == held < len(data.train)  # fraction 0.5
    # node n's modalities only: what its plan does not hold is absent at the centre
    rows = unpack_upload(data.uploads[0])
    assert set(rows.tokens) == set(layout.plan[0])
    assert data.source["plan"] == layout.plan and data.source["label_fraction"] == 0.5
    # validation rows come from labelled training rows only, disjoint from the fit rows
    lc = {**cfg["llm"], "train_samples": 10**6, "eval_samples": 8, "val_samples": 10**6}
    qs = stage_questions(data, lc, int(cfg["seed"]), list(data.meta.tasks))
    val_rows = {ex.index for t in qs.val for ex in qs.val[t]}
    assert val_rows and not val_rows & set(qs.fit_rows.tolist())
    assert all(data.train.y["activity"][i] >= 0 for i in val_rows)
    assert all(ex.index >= data.test_offset for t in qs.test for ex in qs.test[t])


def test_pooled_raw_and_central_are_named_alternatives(setup, tmp_path):
    from fed_iotlm.data.exchange import save_dataset
    from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic

    cfg, encoder, _, _ = setup
    pooled = stage_data({**cfg, "llm": {**cfg["llm"], "data": "pooled_raw"}}, encoder)
    assert pooled.source["data"] == "pooled_raw" and pooled.source["raw_samples_at_centre"] > 0
    with pytest.raises(ValueError, match="llm.central_data"):
        stage_data({**cfg, "llm": {**cfg["llm"], "data": "central"}}, encoder)
    save_dataset(make_synthetic(SyntheticConfig(num_train=30, num_test=10, seed=3)), tmp_path)
    central = stage_data(
        {**cfg, "llm": {**cfg["llm"], "data": "central", "central_data": str(tmp_path)}}, encoder
    )
    assert central.source["data"] == "central" and len(central.train) == 30
    with pytest.raises(ValueError, match="llm.data='everything'"):
        stage_data({**cfg, "llm": {**cfg["llm"], "data": "everything"}}, encoder)
