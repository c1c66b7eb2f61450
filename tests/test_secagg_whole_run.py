"""Under SecAgg+ the server learns what docs/deploy.md says, over a WHOLE run.

A Grid wrapper sees every message the ServerApp sends and every reply it receives,
from the roll call to the final evaluation, and finds in no reply a modality list, a
sample count or a plaintext update; every node is sent the same whole model; groups
held by a single node are never released (their weights stay as initialised), and
results.json says so per round.  The statistics round (``normalization=federated``,
the default) runs through SecAgg+ too: no plaintext ``query.stats`` reply, no node's
per-channel sums anywhere in what the server received, modalities with a single holder
get no pooled statistics, and the released ones equal the plain round's.  For the plain
federation and for MMBind, whose embedding uploads (``query.embed``) are the one
documented exception: individual by design, noised and int8-quantised.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fed_iotlm.federation.secure import PUBLIC_WEIGHT

MODALITIES = ("imu", "audio", "depth", "thermal")
COUNT_KEY = re.compile(r"count|num[-_ ]?(examples|train|present|samples)|partners\.|refused\.")


class RecordingGrid:
    """The ServerApp's Grid, keeping every (message sent, reply received) of the run."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.sent: list = []
        self.replies: list = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies


def _names_a_modality(text: str) -> bool:
    return any(re.search(rf"(^|[^a-z]){m}($|[^a-z])", text) for m in MODALITIES)


def what_the_server_learns(reply) -> list[str]:
    """Everything in one reply that the SecAgg+ promise rules out."""
    found = []
    kind = reply.metadata.message_type
    content = reply.content
    for name, record in content.array_records.items():
        for key, arr in record.items():
            found.append(f"{kind}: array {name}/{key} {arr.shape} (a plaintext array)")
    records = [*content.metric_records.items(), *content.config_records.items()]
    for name, record in records:
        for key, value in record.items():
            if _names_a_modality(str(key)):
                found.append(f"{kind}: {name}/{key} names a modality")
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, str) and _names_a_modality(v) for v in values):
                found.append(f"{kind}: {name}/{key} = {value!r} lists modalities")
            if COUNT_KEY.search(str(key)) and not (
                str(key).endswith("num_examples") and value == PUBLIC_WEIGHT
            ):
                found.append(f"{kind}: {name}/{key} = {value!r} is a count")
    return found


def _down_arrays(msg) -> list[np.ndarray]:
    """The model arrays a message carries down, in either form."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

    records = msg.content.array_records
    if "fitins.parameters" in records:
        return parameters_to_ndarrays(arrayrecord_to_parameters(records["fitins.parameters"], True))
    if "arrays" in records:
        return [a.numpy() for a in records["arrays"].values()]
    return []


def _assert_every_node_gets_the_whole_model(grid: RecordingGrid, model_size: int) -> None:
    by_round: dict[tuple, list[list[np.ndarray]]] = {}
    for msg in grid.sent:
        arrays = _down_arrays(msg)
        if not arrays:  # roll call, census, partners: no model goes down
            continue
        records = msg.content.config_records
        if records.get("fitins.config", {}).get("phase") == "stats":  # channel-shape templates
            assert all(not np.any(a) for a in arrays), "the statistics round sent data down"
            continue
        assert len(arrays) == model_size, (
            f"{msg.metadata.message_type} carried {len(arrays)} of {model_size} arrays"
        )
        config = records.get("config", records.get("fitins.config", {}))
        step = (  # one step of the run: MMBind's SSL and training rounds share round numbers
            msg.metadata.message_type,
            msg.metadata.group_id,
            config.get("server-round"),
            config.get("phase"),
        )
        by_round.setdefault(step, []).append(arrays)
    for (kind, *_), sent in by_round.items():
        for other in sent[1:]:  # nodes of one step receive the very same model
            assert all(np.array_equal(a, b) for a, b in zip(sent[0], other, strict=True)), kind


def _run(quick_cfg, tmp_path: Path, *overrides: str):
    from fed_iotlm.federation.bundle import load_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from simulations.run import run_experiment

    grids: list[RecordingGrid] = []

    def hook(grid):
        grids.append(RecordingGrid(grid))
        return grids[-1]

    cfg = quick_cfg("secagg.enabled=true", "mlflow.enabled=false", "train.epochs=1", *overrides)
    res = json.loads(run_experiment(cfg, tmp_path / "run", None, hook).read_text())
    model, meta = load_bundle(tmp_path / "run" / "bundle")
    _assert_statistics_round_was_secure(grids[0], cfg, meta)
    return grids[0], res, state_to_numpy(model)


def _reply_numbers(reply) -> np.ndarray:
    """Every number a reply carries in the clear (arrays, metric and config values)."""
    from tests.raw_leak import numeric_values

    content = reply.content
    parts = [a.numpy().ravel() for rec in content.array_records.values() for a in rec.values()]
    for rec in [*content.metric_records.values(), *content.config_records.values()]:
        parts.append(numeric_values(rec))
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts] or [np.zeros(0)])


def _assert_statistics_round_was_secure(grid: RecordingGrid, cfg: dict, meta: dict) -> None:
    """No plaintext statistics reply, no node's sums anywhere in the clear; the released
    pooled statistics equal the plain round's; single-holder modalities got none."""
    from fed_iotlm.data.federation import build_layout
    from fed_iotlm.data.preprocess import ChannelSums
    from fed_iotlm.federation.bundle import bundle_standardizer

    assert not [r for r in grid.replies if r.metadata.message_type == "query.stats"]
    phases = {
        msg.content.config_records["fitins.config"].get("phase")
        for msg in grid.sent
        if "fitins.config" in msg.content.config_records
    }
    assert "stats" in phases, "the statistics round did not go through SecAgg+"
    layout = build_layout(cfg)
    per_node = [ChannelSums.of(layout.node_raw(n).train) for n in range(layout.num_nodes)]
    secrets = np.concatenate(
        [np.asarray(v, np.float64).ravel() for s in per_node for v in s.to_arrays().values()]
    )
    secrets = secrets[np.abs(secrets) > 1.0]  # sums, sums of squares, counts (all large)
    for reply in grid.replies:
        sent = _reply_numbers(reply)
        hits = np.isclose(sent[:, None], secrets[None, :], rtol=1e-6, atol=0).any(axis=0)
        assert not hits.any(), (
            f"{reply.metadata.message_type} reply carries {int(hits.sum())} per-node sums"
        )
    holders: dict[str, list[int]] = {}
    for n in range(layout.num_nodes):
        for m in per_node[n].count:
            holders.setdefault(m, []).append(n)
    pooled = bundle_standardizer(meta)
    for m, nodes in holders.items():
        if len(nodes) < 2:
            assert m not in pooled.mean, f"{m} (one holder) was released"
            continue
        plain = sum((per_node[n] for n in nodes), ChannelSums({}, {}, {})).standardizer()
        scale = plain.std[m]
        np.testing.assert_allclose(pooled.mean[m] / scale, plain.mean[m] / scale, atol=1e-5)
        np.testing.assert_allclose(pooled.std[m] / scale, 1.0, atol=1e-5)


@pytest.mark.integration
def test_whole_plain_run_shows_the_server_no_modality_count_or_update(quick_cfg, tmp_path):
    grid, res, final = _run(quick_cfg, tmp_path, "rounds=2")
    assert {r.metadata.message_type for r in grid.replies} >= {
        "query.identify",
        "train",
        "evaluate",
    }
    leaks = [f for r in grid.replies if not r.has_error() for f in what_the_server_learns(r)]
    assert not leaks, "\n".join(leaks[:20])
    _assert_every_node_gets_the_whole_model(grid, len(final))

    # quick plan [[imu, audio], [imu, depth], [thermal]]: audio, depth and thermal have
    # one holder each, so their encoders are never released; the rest trains
    withheld = res["secagg"]["withheld_by_round"]
    assert withheld == {r: ["enc.audio", "enc.depth", "enc.thermal"] for r in ("1", "2")}
    assert res["secagg"]["statistics_withheld"] == ["audio", "depth", "thermal"]
    assert all(h["secagg.withheld_groups"] == 3 for h in res["history"])
    assert res["plan"] == {"0": [], "1": [], "2": []}  # the roll call carried no modalities
    initial = _initial_state(quick_cfg)
    for key, value in final.items():
        untouched = np.array_equal(value, initial[key])
        assert untouched == key.startswith(("enc.audio.", "enc.depth.", "enc.thermal.")), key


def _initial_state(quick_cfg) -> dict[str, np.ndarray]:
    """The model a run starts from (seeded as the ServerApp seeds it)."""
    from fed_iotlm.data.federation import build_layout
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.federation.run_model import sync_model
    from server.federated_run import seed_everything

    cfg = quick_cfg()
    seed_everything(int(cfg["seed"]))
    build_layout(cfg)  # the ServerApp builds the layout before the model
    return state_to_numpy(sync_model(cfg, model_spec(cfg)))


@pytest.mark.integration
def test_whole_mmbind_run_hides_all_but_the_noised_embedding_uploads(quick_cfg, tmp_path):
    grid, res, final = _run(
        quick_cfg, tmp_path,
        "method=mmbind", "partition.shared=imu", "rounds=1",
        "partition.plan=[[imu,audio],[imu,depth],[imu,thermal]]",
        "binding.pretrain_rounds=1", "binding.pretrain_epochs=1", "binding.rebind_every=1",
        "binding.quantize=true", "binding.noise_sigma=0.05",
    )  # fmt: skip
    kinds = {r.metadata.message_type for r in grid.replies}
    assert kinds >= {"query.identify", "query.embed", "train.bind", "train", "evaluate"}
    assert "train.pretrain" not in kinds  # the shared-modality round went through SecAgg+
    leaks = [
        f
        for r in grid.replies
        if not r.has_error() and r.metadata.message_type != "query.embed"
        for f in what_the_server_learns(r)
    ]
    assert not leaks, "\n".join(leaks[:20])
    _assert_every_node_gets_the_whole_model(grid, len(final))
    # the documented exception: embeddings and tokens leave noised and int8-quantised
    for r in (r for r in grid.replies if r.metadata.message_type == "query.embed"):
        arrays = r.content["embeddings"]
        floats = [k for k, a in arrays.items() if a.dtype == "float32" and ".scale" not in k]
        assert not floats, f"unquantised embedding arrays {floats}"
        assert any(k.endswith(".q") and arrays[k].dtype == "int8" for k in arrays)
    assert res["secagg"]["withheld_by_round"]["1"] == ["enc.audio", "enc.depth", "enc.thermal"]
    assert res["secagg"]["statistics_withheld"] == ["audio", "depth", "thermal"]
