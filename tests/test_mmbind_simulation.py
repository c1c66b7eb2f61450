"""MMBind in a real Flower simulation: binding runs, partners arrive, no raw data leaves."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest

from fed_iotlm.data.federation import build_layout
from simulations.run import run_experiment
from tests.raw_leak import RawLeakChecker, numeric_values

PLAN = "partition.plan=[[imu,audio],[imu,depth],[imu,thermal]]"


def make_recorder(directory: Path):
    """A Flower client mod that stores every reply a node sends (type, arrays, metrics,
    config records)."""

    def record_replies(msg, context, call_next):
        reply = call_next(msg, context)
        arrays = {
            f"{name}/{key}": arr.numpy()
            for name, rec in reply.content.array_records.items()
            for key, arr in rec.items()
        }
        metrics = {
            f"{name}/{key}": value
            for name, rec in reply.content.metric_records.items()
            for key, value in rec.items()
        }
        configs = {name: dict(rec) for name, rec in reply.content.config_records.items()}
        entry = {
            "type": msg.metadata.message_type,
            "partition": int(context.node_config["partition-id"]),
            "arrays": arrays,
            "metrics": metrics,
            "configs": configs,
        }
        (directory / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(entry))
        return reply

    return record_replies


@pytest.mark.integration
def test_binding_runs_partners_arrive_and_no_raw_sample_leaves(quick_cfg, tmp_path):
    capture = tmp_path / "capture"
    capture.mkdir()
    cfg = quick_cfg(
        "method=mmbind", "partition.shared=imu", PLAN, "mlflow.enabled=false",
        "binding.pretrain_rounds=1", "binding.rebind_every=1", "binding.quantize=true",
    )  # fmt: skip
    res = json.loads(run_experiment(cfg, tmp_path / "run", [make_recorder(capture)]).read_text())
    entries = [pickle.loads(p.read_bytes()) for p in capture.iterdir()]
    types = {e["type"] for e in entries}
    assert {"train.pretrain", "query.embed", "train.bind", "train", "evaluate"} <= types

    # binding ran before each of the 2 multimodal rounds, and every node got partners
    rounds = {r: b for r, b in res["binding"].items() if r.isdigit()}
    assert set(rounds) == {"1", "2"} and all(b["pairs"] > 0 for b in rounds.values())
    # simulation: the server knows the truth, so each binding's pair accuracy is logged
    by_binding = res["binding"]["pair_accuracy_by_binding"]
    assert set(by_binding) == {"1", "2"}
    assert all(0.0 <= a <= 1.0 for b in by_binding.values() for a in b.values())
    assert set(by_binding["1"]) == {"activity", "location"}
    binds = [e for e in entries if e["type"] == "train.bind"]
    assert len(binds) == 2 * 3
    expected = {0: {"depth", "thermal"}, 1: {"audio", "thermal"}, 2: {"audio", "depth"}}
    for e in binds:
        got = {k.split(".", 1)[1] for k in e["metrics"] if k.startswith("metrics/partners.")}
        assert got == expected[e["partition"]]
        assert all(v > 0 for k, v in e["metrics"].items() if "/partners." in k)

    # embeddings went up int8-quantised
    embeds = [e for e in entries if e["type"] == "query.embed"]
    assert embeds and all(
        a.dtype == np.int8 for e in embeds for k, a in e["arrays"].items() if k.endswith(".q")
    )

    # no reply of any kind carries a raw (or preprocessed) sample of the node: every
    # array, the metrics and every config record, against every window of its raw and
    # standardised samples (any flattening, slice, scale: tests/raw_leak.py)
    assert_no_raw_sample_left(entries, build_layout(cfg))


def assert_no_raw_sample_left(entries: list[dict], layout) -> None:
    """Every recorded reply of every node against that node's own raw windows."""
    for node in range(layout.num_nodes):
        own = layout.dataset.train.subset(layout.train_parts[node])
        feats, _ = layout.node_data(node)
        held = layout.plan[node]
        checker = RawLeakChecker(
            {
                **{f"raw {m}": own.x[m][own.mask[m]] for m in held},
                **{f"standardised {m}": feats.x[m][feats.mask[m]] for m in held},
            }
        )
        for e in (e for e in entries if e["partition"] == node):
            sent = {f"{e['type']} {k}": v for k, v in e["arrays"].items()}
            sent[f"{e['type']} metrics"] = numeric_values(e["metrics"])
            for name, record in e["configs"].items():
                sent[f"{e['type']} config {name}"] = numeric_values(record)
            checker.assert_clean(sent, f"node {node}'s {e['type']} reply")
