"""The LM stage's uploads travel over Flower (``llm.upload.collect``): after the last
round the server asks every node for its tokens (``query.llm_upload``) under Flower's
simulation engine, writes them to ``<run>/uploads``, and the stage reads them there
(``llm.upload.dir``).

What is held: the records the nodes sent are exactly the in-process uploads of the same
bundle (every array, bit for bit, noise and int8 included), so the two paths cannot
drift; they carry no raw window (the leak check of ``test_llm_uploads``); the stage's
rows from the directory equal the in-process rows; and a damaged directory is refused
naming the file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fed_iotlm.binding.messages import PrivacyConfig
from fed_iotlm.data.federation import build_layout
from fed_iotlm.federation.bundle import bundle_standardizer, load_bundle
from fed_iotlm.llm.loading import TINY_MODEL
from fed_iotlm.llm.recipe import stage_data
from fed_iotlm.llm.upload_store import load_uploads
from fed_iotlm.llm.uploads import node_uploads
from simulations.pipeline import run_pipeline
from tests.test_llm_uploads import _windows, probes_of, raw_leaks

KNOBS = ["llm.upload.noise_sigma=0.05", "llm.upload.quantize=true"]
TINY_STAGE = [
    f"llm.model={TINY_MODEL}", "llm.steps=2", "llm.train_samples=40", "llm.eval_samples=8",
    "llm.val_samples=8", "llm.conditioning=[prefix]", "llm.controls=[majority,head]",
]  # fmt: skip


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """``make demo``'s pipeline (simulations/pipeline.py) on a small federation and the
    tiny test LM: it turns collection on for the federation and points the stage at the
    directory."""
    from fed_iotlm.settings import compose

    tmp = tmp_path_factory.mktemp("collect")
    cfg = compose(
        [
            "experiment=quick",
            "rounds=1",
            "data.num_train=60",  # small: the leak check compares every window with every value
            "data.num_test=24",
            f"output_dir={tmp}/run",
            "mlflow.enabled=false",
            *KNOBS,
            *TINY_STAGE,
        ]
    )
    assert cfg["llm"]["upload"]["collect"] is False  # the pipeline turns it on
    stage = json.loads(run_pipeline(cfg, tmp / "run").read_text())
    fed = json.loads((tmp / "run" / "federation" / "results.json").read_text())
    return cfg, tmp / "run" / "federation", fed, stage


@pytest.mark.integration
def test_nodes_send_over_flower_exactly_the_in_process_uploads(collected):
    cfg, run, res, _ = collected
    layout = build_layout(cfg)
    block = res["llm_uploads"]
    assert block["partitions"] == list(range(layout.num_nodes)) and not block["missing_partitions"]
    assert block["raw_samples_at_centre"] == 0
    assert {n["quantize"] for n in block["nodes"].values()} == {True}
    assert [block["nodes"][str(n)]["modalities"] for n in range(layout.num_nodes)] == layout.plan
    stored = load_uploads(run / "uploads")
    assert stored.meta == layout.dataset.meta
    encoder, meta = load_bundle(run / "bundle")
    scaler = bundle_standardizer(meta)
    privacy = PrivacyConfig(0.05, True)
    for part in ("train", "test"):
        expected = node_uploads(layout, encoder, privacy, part, scaler)
        got = stored.records[part]
        assert len(got) == len(expected) == layout.num_nodes
        for n, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert set(a) == set(b), f"node {n} {part}: keys differ"
            for key in b:
                x, y = a[key].numpy(), b[key].numpy()
                assert x.dtype == y.dtype and x.shape == y.shape, f"node {n} {part} {key}"
                assert np.array_equal(x, y), f"node {n} {part} {key}: values differ"
    # no raw window in what travelled (every form the nodes hold their windows in)
    probes = probes_of(_windows(cfg))
    assert raw_leaks([*stored.records["train"], *stored.records["test"]], probes) == []


@pytest.mark.integration
def test_the_stage_reads_the_collected_uploads(collected, tmp_path):
    cfg, run, _, stage = collected
    # the pipeline's stage ran on the collected directory
    assert stage["data"]["collected"].startswith("over Flower")
    assert stage["data"]["upload_dir"] == str(run / "uploads")
    assert stage["data"]["nodes_uploaded"] == stage["data"]["nodes"] == 3
    encoder, meta = load_bundle(run / "bundle")
    scaler = bundle_standardizer(meta)
    lc = {**cfg["llm"], "upload": {**cfg["llm"]["upload"], "collect": False}}
    in_process = stage_data({**cfg, "llm": lc}, encoder, scaler)
    lc_dir = {**lc, "upload": {**lc["upload"], "dir": str(run / "uploads")}}
    lc_dir["bundle"] = str(run / "bundle")  # the run's own bundle: its digest matches
    from_dir = stage_data({**cfg, "llm": lc_dir}, encoder, scaler)
    assert from_dir.source["collected"].startswith("over Flower")
    assert from_dir.source["raw_samples_at_centre"] == 0
    assert from_dir.source["nodes"] == in_process.source["nodes"]
    for name in in_process.feats.names:
        assert np.array_equal(
            from_dir.feats.feats[name].numpy(), in_process.feats.feats[name].numpy()
        )
    for t in in_process.train.y:
        assert np.array_equal(from_dir.train.y[t], in_process.train.y[t])
        assert np.array_equal(from_dir.test.y[t], in_process.test.y[t])
    assert np.array_equal(from_dir.train_nodes, in_process.train_nodes)
    assert from_dir.source["upload_bytes"] == in_process.source["upload_bytes"]

    # tokens of one run read with another run's bundle are refused (digest of the weights)
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import save_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.models.multisensory import MultisensoryModel

    spec = model_spec(cfg)
    save_bundle(tmp_path / "other", state_to_numpy(MultisensoryModel(spec)), spec, {})
    with pytest.raises(ValueError, match="sha256"):
        stage_data({**cfg, "llm": {**lc_dir, "bundle": str(tmp_path / "other")}}, encoder)
    # the uploads are the nodes' rows: another llm.data with them set is a contradiction
    with pytest.raises(ValueError, match="llm.upload.dir is set but llm.data=pooled_raw"):
        stage_data({**cfg, "llm": {**lc_dir, "data": "pooled_raw"}}, encoder)

    # a damaged directory is refused, naming the file
    import shutil

    bad = tmp_path / "uploads"
    shutil.copytree(run / "uploads", bad)
    victim = sorted(bad.glob("node1.train.*"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="node1.train"):
        load_uploads(bad)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_uploads(tmp_path)
