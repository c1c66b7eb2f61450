"""Secure aggregation composed with modality-aware FedAvg (SecAgg+, Σ-ready vectors).

The arithmetic first (exact, no protocol): summing every node's Σ-ready vector and
decoding gives group-wise FedAvg.  Then a real Flower simulation with Flower's
SecAggPlusWorkflow and secaggplus_mod: the aggregate equals the plaintext group-wise
FedAvg of the very updates the nodes computed (within the quantisation tolerance),
while everything the server code received is masked noise without counts.
"""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest

from fed_iotlm.federation.aggregation import NodeUpdate, aggregate_groups
from fed_iotlm.federation.groups import group_of
from fed_iotlm.federation.secure import (
    SecureRangeError,
    SecureSettings,
    SumLayout,
    check_composable,
)

SETTINGS = SecureSettings(enabled=True, max_count=1000.0, clipping_range=2.0)


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "enc.imu.w": rng.normal(size=(4, 3)).astype(np.float32),
        "enc.audio.w": rng.normal(size=(5,)).astype(np.float32),
        "enc.depth.w": rng.normal(size=(2, 2)).astype(np.float32),
        "fusion.w": rng.normal(size=(3,)).astype(np.float32),
        "head.activity.w": rng.normal(size=(2, 3)).astype(np.float32),
    }


def test_sum_of_vectors_decodes_to_groupwise_fedavg():
    rng = np.random.default_rng(0)
    current = _state(rng)
    layout = SumLayout.of(current)
    holdings = [  # node -> groups held and their counts; nobody holds enc.depth
        {"enc.imu": 120, "fusion": 120, "head.activity": 120},
        {"enc.imu": 80, "enc.audio": 80, "fusion": 80},
        {"enc.audio": 300, "fusion": 300, "head.activity": 30},
    ]
    updates, vectors = [], []
    for i, counts in enumerate(holdings):
        trained = {
            k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32)
            for k, v in current.items()
            if group_of(k) in counts
        }
        updates.append(NodeUpdate(str(i), trained, counts))
        vectors.append(layout.encode(trained, current, counts, SETTINGS, f"node {i}"))
    sums = [np.sum(parts, axis=0) for parts in zip(*vectors, strict=True)]
    state, counts = layout.decode(sums, current, SETTINGS.max_count)
    expected = aggregate_groups(current, updates).state
    for key in current:
        np.testing.assert_allclose(state[key], expected[key], rtol=1e-5, atol=1e-6)
    assert np.array_equal(state["enc.depth.w"], current["enc.depth.w"])  # nobody held it
    assert counts["enc.audio"] == pytest.approx(380) and "enc.depth" not in counts


def test_a_value_the_protocol_would_clip_is_refused_with_its_key():
    current = _state(np.random.default_rng(1))
    trained = {k: v + 100.0 for k, v in current.items()}
    with pytest.raises(SecureRangeError, match="enc.imu.w.*clipping_range"):
        SumLayout.of(current).encode(trained, current, {"enc.imu": 999}, SETTINGS, "node 3")
    with pytest.raises(SecureRangeError, match="exceed secagg.max_count"):
        SumLayout.of(current).encode(current, current, {"fusion": 5000}, SETTINGS, "node 3")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"strategy": {"aggregation": "median"}}, "aggregation=mean"),
        ({"strategy": {"checks": {"max_update_norm": 1.0}}}, "max_update_norm"),
        ({"strategy": {"name": "fedadam"}}, "server optimiser"),
        ({"secagg": {"enabled": True, "clipping_range": 0}}, "clipping_range"),
        ({"secagg": {"enabled": True, "modulus_range": 3000}}, "power of two"),
        ({"secagg": {"enabled": True, "shares": 3}}, "unknown key"),
        ({"dp": {"enabled": True}}, "not composed"),
    ],
)
def test_what_cannot_compose_with_secure_aggregation_is_refused(override, message):
    cfg = {"secagg": {"enabled": True}, "strategy": {"name": "fedavg", "aggregation": "mean"}}
    for block, values in override.items():
        cfg[block] = {**cfg.get(block, {}), **values}
    with pytest.raises(ValueError, match=message):
        check_composable(cfg)


def _plaintext_recorder(directory: Path):
    """Inside secaggplus_mod: what the node computed before masking, and what it got."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

    def record(msg, context, call_next):
        reply = call_next(msg, context)
        if "fitres.parameters" in reply.content.array_records:
            got = parameters_to_ndarrays(
                arrayrecord_to_parameters(msg.content.array_records["fitins.parameters"], True)
            )
            sent = parameters_to_ndarrays(
                arrayrecord_to_parameters(reply.content.array_records["fitres.parameters"], True)
            )
            entry = {
                "partition": int(context.node_config["partition-id"]),
                "got": got,
                "sent": sent,
            }
            (directory / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(entry))
        return reply

    return record


class _ObservedGrid:
    """The ServerApp's Grid, keeping every reply the server code receives."""

    def __init__(self, grid) -> None:
        self._grid, self.replies = grid, []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


@pytest.mark.integration
def test_secure_aggregate_equals_plaintext_and_server_sees_no_update(quick_cfg, tmp_path):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fed_iotlm.federation.bundle import load_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from simulations.run import run_experiment

    capture = tmp_path / "plain"
    capture.mkdir()
    observed: list[_ObservedGrid] = []

    def hook(grid):
        observed.append(_ObservedGrid(grid))
        return observed[0]

    cfg = quick_cfg(
        "secagg.enabled=true", "normalization=per_site", "rounds=1", "mlflow.enabled=false"
    )
    res_path = run_experiment(cfg, tmp_path / "run", [_plaintext_recorder(capture)], hook)
    entries = [pickle.loads(p.read_bytes()) for p in capture.iterdir()]
    assert sorted(e["partition"] for e in entries) == [0, 1, 2]

    # the plaintext reference: group-wise FedAvg of the updates the nodes computed
    model, _ = load_bundle(tmp_path / "run" / "bundle")
    final = state_to_numpy(model)
    layout = SumLayout.of(final)
    current = layout.arrays_in_order(entries[0]["got"], "round 1 model")
    settings = SecureSettings.from_config(cfg)
    updates = []
    for e in entries:
        share = dict(zip(layout.groups, e["sent"][-1], strict=True))
        counts = {g: s * settings.max_count for g, s in share.items() if s > 0}
        trained = {  # the node's trained weights, recovered from its own plaintext vector
            key: current[key] + vec / share[group_of(key)]
            for key, vec in zip(layout.keys, e["sent"][:-1], strict=True)
            if group_of(key) in counts
        }
        updates.append(NodeUpdate(str(e["partition"]), trained, counts))
    expected = aggregate_groups(current, updates)
    for key in layout.keys:
        weight = expected.weights.get(group_of(key), 0.0)  # samples behind the group
        # quantisation: up to one step per node, in units of the count share
        tol = (
            1e-6
            if weight == 0
            else 2 * len(entries) * settings.step() * settings.max_count / weight
        )
        np.testing.assert_allclose(final[key], expected.state[key], atol=tol, rtol=0, err_msg=key)
    moved = [k for k in layout.keys if not np.allclose(final[k], current[k])]
    assert moved, "the secure round changed nothing"

    # the server received masked vectors only: no float update, no count, no sample size
    train_replies = [r for r in observed[0].replies if r.metadata.message_type == "train"]
    configs = [r.content.config_records.get(RECORD_KEY_CONFIGS, {}) for r in train_replies]
    masked = [c[Key.MASKED_PARAMETERS] for c in configs if Key.MASKED_PARAMETERS in c]
    assert len(masked) == 3
    for r in train_replies:
        assert not any(len(rec) for rec in r.content.array_records.values())
        for rec in [*r.content.metric_records.values(), *r.content.config_records.values()]:
            assert not any(str(k).startswith("count.") for k in rec), "a count reached the server"
            assert rec.get("num_examples", 1) == 1  # the public weight, not a sample size
    plains = [np.concatenate([v.ravel() for v in e["sent"]]) for e in entries]
    for blob in masked:
        flat = np.concatenate([bytes_to_ndarray(b).ravel() for b in blob]).astype(np.float64)
        # uniform on [0, 2**32): mean about 2**31 and uncorrelated with every plain vector
        assert abs(flat.mean() / 2**32 - 0.5) < 0.02
        for plain in plains:  # flat[0] is the protocol's weight factor
            assert abs(np.corrcoef(flat[1 : plain.size + 1], plain)[0, 1]) < 0.05
    assert res_path.is_file()
