"""Under SecAgg+ the server learns what docs/deploy.md says, over a WHOLE run.

A Grid wrapper sees every message the ServerApp sends and every reply it receives,
from the roll call to the final evaluation, and finds in no reply a modality list, a
sample count or a plaintext update; every node is sent the same whole model; groups
held by a single node are never released (their weights stay as initialised), and
results.json says so per round.  For the plain federation and for MMBind, whose
embedding uploads (``query.embed``) are the one documented exception: individual by
design, noised and int8-quantised.
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
        assert len(arrays) == model_size, (
            f"{msg.metadata.message_type} carried {len(arrays)} of {model_size} arrays"
        )
        records = msg.content.config_records
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

    cfg = quick_cfg(
        "secagg.enabled=true", "normalization=per_site", "mlflow.enabled=false", "train.epochs=1",
        *overrides,
    )  # fmt: skip
    res = json.loads(run_experiment(cfg, tmp_path / "run", None, hook).read_text())
    model, _ = load_bundle(tmp_path / "run" / "bundle")
    return grids[0], res, state_to_numpy(model)


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
