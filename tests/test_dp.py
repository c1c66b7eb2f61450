"""Differential privacy: clipping at the node, per-group noise at the server, the RDP
accountant, and a real simulation that reports epsilon per round."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from opacus.accountants import RDPAccountant

from fed_iotlm.federation.privacy import (
    KEY_LOCAL_NOISE,
    CentralPrivacy,
    DPConfig,
    attach_privacy,
    check_dp_run,
    clip_update,
    epsilon_after,
    noise_std,
    privacy_report,
    update_clipping_mod,
)
from fed_iotlm.federation.records import (
    counts_to_metrics,
    node_reply,
    numpy_to_record,
    record_to_numpy,
)
from fed_iotlm.federation.round_record import RoundRecord, facts_of, releases_of
from fed_iotlm.federation.strategy import build_strategy
from fed_iotlm.federation.update_checks import update_norm
from server.engine import account_release

RNG = np.random.default_rng(0)
CURRENT = {
    "enc.imu.w": RNG.normal(size=(4, 5)).astype(np.float32),
    "enc.audio.w": RNG.normal(size=7).astype(np.float32),
    "enc.depth.w": RNG.normal(size=3).astype(np.float32),
    "fusion.q": RNG.normal(size=6).astype(np.float32),
}


def _run_cfg(**dp) -> dict:
    return {"method": "federated", "strategy": {"name": "fedavg"}, "dp": {"enabled": True, **dp}}


def _strategy(num_nodes: int, current: dict, **dp):
    strategy = build_strategy("federated", {"name": "fedavg"}, num_nodes=num_nodes)
    attach_privacy(strategy, _run_cfg(**dp), num_nodes)
    strategy._current = dict(current)
    return strategy


# -- clipping at the node -------------------------------------------------------------------


def test_clip_update_bounds_the_joint_norm_of_the_groups_sent():
    received = dict(CURRENT)
    delta = {
        k: RNG.normal(size=CURRENT[k].shape).astype(np.float32) for k in ("enc.imu.w", "fusion.q")
    }
    sent = {k: received[k] + 10 * d for k, d in delta.items()}  # depth/audio not sent
    before = update_norm(sent, received)
    assert before > 5.0
    out = clip_update(sent, received, 0.5)
    assert set(out) == set(sent) and all(out[k].dtype == np.float32 for k in out)
    assert update_norm(out, received) == pytest.approx(0.5, rel=1e-5)
    for k in out:  # scaled, not re-directed: one factor for every group sent
        np.testing.assert_allclose(
            out[k] - received[k], (sent[k] - received[k]) * 0.5 / before, atol=1e-6
        )
    small = {k: received[k] + 1e-3 * d for k, d in delta.items()}
    for k, v in clip_update(small, received, 0.5).items():
        np.testing.assert_allclose(v, small[k], atol=1e-7)  # inside the ball: unchanged
    with pytest.raises(KeyError, match="did not send"):
        clip_update({"enc.thermal.w": np.zeros(2, np.float32)}, received, 0.5)


def _train_message(arrays: dict, config: dict, norm=None) -> Message:
    content = RecordDict({"arrays": numpy_to_record(arrays), "config": ConfigRecord(config)})
    if norm is not None:  # the pooled statistics the server attaches to every message
        content["norm"] = norm
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(metadata=metadata, content=content)


def _context() -> Context:
    return Context(1, 1, {"partition-id": 0}, RecordDict(), {})


@pytest.mark.integration
def test_the_client_app_sends_an_update_clipped_relative_to_what_it_received(quick_cfg):
    """The real ClientApp (train handler + mod), node 0 of the quick plan ([imu, audio])."""
    from clients.app import make_client_app
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.models.multisensory import MultisensoryModel
    from tests.server_side import pooled_norm

    cfg = quick_cfg("train.epochs=1")
    received = state_to_numpy(MultisensoryModel(model_spec(cfg)))
    norm = pooled_norm(cfg)
    app = make_client_app(cfg)
    plain = record_to_numpy(
        app(_train_message(received, {"server-round": 1}, norm), _context()).content["arrays"]
    )
    reply = app(
        _train_message(received, {"server-round": 1, KEY_CLIPPING_NORM: 0.05}, norm), _context()
    )
    sent = record_to_numpy(reply.content["arrays"])
    assert set(sent) == set(plain) and set(sent) < set(received)  # only node 0's groups
    assert not any(k.startswith(("enc.depth", "enc.thermal")) for k in sent)
    assert update_norm(plain, received) > 0.5  # unclipped, the update is far larger ...
    assert update_norm(sent, received) <= 0.05 * (1 + 1e-4)  # ... clipped, it is within C
    assert update_norm(sent, received) == pytest.approx(0.05, rel=1e-3)


def test_local_mode_noises_the_update_at_the_node():
    sigma, clip = 1.5, 0.2
    received = {"fusion.q": np.zeros(40_000, np.float32), "enc.imu.w": np.ones(5, np.float32)}
    msg = _train_message(received, {KEY_CLIPPING_NORM: clip, KEY_LOCAL_NOISE: sigma})

    def train(m: Message, ctx: Context) -> Message:  # sends fusion only, unchanged
        arrays = {"fusion.q": record_to_numpy(m.content["arrays"])["fusion.q"]}
        metrics = counts_to_metrics({"fusion": 10}, {})
        return Message(
            RecordDict({"arrays": numpy_to_record(arrays), "metrics": metrics}), reply_to=m
        )

    sent = record_to_numpy(update_clipping_mod(msg, _context(), train).content["arrays"])
    assert set(sent) == {"fusion.q"} and sent["fusion.q"].dtype == np.float32
    assert np.std(sent["fusion.q"]) == pytest.approx(sigma * clip, rel=0.05)
    assert abs(np.mean(sent["fusion.q"])) < 0.05 * sigma * clip
    # without the server's clipping norm the mod passes the reply through untouched
    untouched = update_clipping_mod(_train_message(received, {}), _context(), train)
    np.testing.assert_array_equal(record_to_numpy(untouched.content["arrays"])["fusion.q"], 0.0)


# -- the server's aggregate -----------------------------------------------------------------


def _updates(current: dict, n: int, scale: float) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {
            k: current[k] + scale * rng.normal(size=current[k].shape).astype(np.float32)
            for k in current
        }
        for _ in range(n)
    ]


def test_noise_multiplier_zero_gives_the_plain_aggregate_with_equal_weights():
    ups = _updates(CURRENT, 3, 0.01)  # well inside C: clipping changes nothing
    counts = {"enc.imu": 20, "enc.audio": 20, "enc.depth": 20, "fusion": 20}
    plain = build_strategy("federated", {"name": "fedavg"}, num_nodes=3)
    plain._current = dict(CURRENT)
    dp = _strategy(3, CURRENT, noise_multiplier=0.0, clipping_norm=10.0)
    a, _ = plain.aggregate_train(1, [node_reply(i, u, counts) for i, u in enumerate(ups)])
    b, metrics = dp.aggregate_train(1, [node_reply(i, u, counts) for i, u in enumerate(ups)])
    for k, v in record_to_numpy(a).items():
        np.testing.assert_allclose(record_to_numpy(b)[k], v, rtol=1e-6, atol=1e-7)
    assert facts_of(metrics).released  # the engine accounts for it
    stats, release = account_release(dp.privacy, 1, 3, [])
    assert "dp.epsilon" not in stats  # sigma = 0: no finite epsilon to report
    assert release == {"sigma": 0.0, "q": 1.0}
    # unequal sample counts: DP averages each group with equal weights, not by count
    uneven = [{**counts, "fusion": n} for n in (1, 10, 100)]
    c, _ = dp.aggregate_train(2, [node_reply(i, u, uneven[i]) for i, u in enumerate(ups)])
    np.testing.assert_allclose(
        record_to_numpy(c)["fusion.q"], np.mean([u["fusion.q"] for u in ups], 0), atol=1e-6
    )


def test_central_noise_on_each_group_is_sigma_c_over_its_holders():
    sigma, clip = 2.0, 0.5
    current = {
        "fusion.q": np.zeros(20_000, np.float32),  # held by all 4
        "enc.imu.w": np.zeros(20_000, np.float32),  # held by 2
        "enc.audio.w": np.zeros(20_000, np.float32),  # held by 1
        "enc.depth.w": np.full(50, 3.0, np.float32),  # held by none: stays as it was
    }
    held = [["fusion", "enc.imu", "enc.audio"], ["fusion", "enc.imu"], ["fusion"], ["fusion"]]
    replies = [
        node_reply(
            i, {k: v for k, v in current.items() if k.rsplit(".", 1)[0] in g}, {x: 5 for x in g}
        )
        for i, g in enumerate(held)
    ]  # every node sends back what it received: the noise is all that moves
    strategy = _strategy(4, current, noise_multiplier=sigma, clipping_norm=clip, seed=7)
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = record_to_numpy(arrays)
    for key, holders in (("fusion.q", 4), ("enc.imu.w", 2), ("enc.audio.w", 1)):
        assert np.std(out[key]) == pytest.approx(sigma * clip / holders, rel=0.05), key
        assert abs(np.mean(out[key])) < 0.05 * sigma * clip / holders
        assert noise_std(sigma, clip, holders) == sigma * clip / holders
    np.testing.assert_array_equal(out["enc.depth.w"], current["enc.depth.w"])
    assert facts_of(metrics).released
    stats, _ = account_release(strategy.privacy, 1, 4, [])  # what the engine adds
    assert stats["dp.epsilon"] == pytest.approx(epsilon_after([(sigma, 1.0)], 1e-5))
    # seeded (tests only): the same round draws the same noise, another round other noise
    again = _strategy(4, current, noise_multiplier=sigma, clipping_norm=clip, seed=7)
    np.testing.assert_array_equal(
        record_to_numpy(again.aggregate_train(1, replies)[0])["fusion.q"], out["fusion.q"]
    )
    other = record_to_numpy(again.aggregate_train(2, replies)[0])["fusion.q"]
    assert not np.array_equal(other, out["fusion.q"])


# -- the accountant -------------------------------------------------------------------------


def test_epsilon_grows_with_rounds_shrinks_with_sigma_and_is_opacus_rdp():
    eps = [epsilon_after([(1.1, 0.5)] * r, 1e-5) for r in range(1, 6)]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert epsilon_after([(2.0, 0.5)] * 5, 1e-5) < eps[-1]
    assert epsilon_after([(1.1, 0.25)] * 5, 1e-5) < eps[-1]  # sampling amplifies privacy
    acc = RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.1, sample_rate=0.5)
    assert eps[-1] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert epsilon_after([(0.0, 1.0)], 1e-5) == float("inf")
    # the server's bookkeeping: q = sampled / nodes, epsilon composed over the releases
    privacy = CentralPrivacy(DPConfig(enabled=True, noise_multiplier=1.1), num_nodes=8)
    releases: dict = {}
    for rnd in (1, 2, 3):
        stats = privacy.account(rnd, sampled=4, releases=releases)
        assert stats["dp.sample_rate"] == 0.5
        assert stats["dp.epsilon"] == pytest.approx(eps[rnd - 1])
    report = privacy.report(releases)
    assert report["epsilon"] == pytest.approx(eps[2]) and report["level"].startswith("node-level")
    assert list(report["epsilon_by_round"]) == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (_run_cfg(mode="global"), "dp.mode"),
        (_run_cfg(clipping_norm=0), "dp.clipping_norm"),
        (_run_cfg(noise_multiplier=-1), "dp.noise_multiplier"),
        (_run_cfg(delta=1.0), "dp.delta"),
        (_run_cfg(noise=1.0), "unknown key"),
        (_run_cfg(clipping_norm="big"), "dp.clipping_norm='big': expected a number"),
        ({**_run_cfg(), "method": "fedavg"}, "method='fedavg'"),
        ({**_run_cfg(), "method": "mmbind"}, "embeddings"),
        ({**_run_cfg(), "strategy": {"name": "fedadam"}}, "strategy='fedadam'"),
        ({**_run_cfg(), "strategy": {"name": "fedavg", "aggregation": "krum"}}, "aggregation"),
    ],
)
def test_bad_dp_settings_are_refused_by_name(cfg, match):
    with pytest.raises(ValueError, match=match):
        check_dp_run(cfg)


def test_dp_off_leaves_the_strategy_alone():
    strategy = build_strategy("federated", {"name": "fedavg"}, num_nodes=2)
    attach_privacy(strategy, {"method": "fedavg", "dp": {"enabled": False}}, 2)
    assert strategy.privacy is None


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.integration
def test_simulation_reports_epsilon_per_round_in_results_and_mlflow(quick_cfg, tmp_path):
    import mlflow

    from simulations.run import run_experiment

    cfg = quick_cfg(
        f"output_dir={tmp_path}/run",
        "dp.enabled=true",
        "dp.clipping_norm=0.5",
        "dp.noise_multiplier=0.8",
        "train.epochs=1",
    )
    res = json.loads(run_experiment(cfg, tmp_path / "run").read_text())
    expected = {r: epsilon_after([(0.8, 1.0)] * r, 1e-5) for r in (1, 2)}
    privacy = res["privacy"]
    assert privacy["epsilon_by_round"] == pytest.approx({str(r): e for r, e in expected.items()})
    assert privacy["epsilon"] == pytest.approx(expected[2])
    assert (privacy["clipping_norm"], privacy["noise_multiplier"], privacy["delta"]) == (
        0.5,
        0.8,
        1e-5,
    )
    assert privacy["sample_rate_by_round"] == {"1": 1.0, "2": 1.0}
    assert privacy["level"].startswith("node-level") and privacy["mode"] == "central"
    for row in res["history"]:
        assert row["dp.epsilon"] == pytest.approx(expected[row["round"]])
        # the server measured every node's update (sent - what it was sent) within C
        assert row["update_norm_max"] <= 0.5 * (1 + 1e-4)
    client = mlflow.tracking.MlflowClient(tracking_uri=cfg["mlflow"]["tracking_uri"])
    run = client.search_runs(
        [client.get_experiment_by_name(cfg["mlflow"]["experiment"]).experiment_id]
    )[0]
    logged = client.get_metric_history(run.info.run_id, "dp.epsilon")
    assert {m.step: m.value for m in logged} == pytest.approx(expected)


def test_a_resumed_run_keeps_composing_where_it_stopped():
    """The accountant composes over the round records, which a checkpoint carries as
    JSON: a resumed run's next release counts the ones before the crash."""
    replies = [node_reply(i, dict(CURRENT), {"enc.imu": 5, "fusion": 5}) for i in range(2)]
    first = _strategy(4, CURRENT, noise_multiplier=1.0)
    _, metrics = first.aggregate_train(1, replies)
    assert facts_of(metrics).released
    stats, release = account_release(first.privacy, 1, 2, [])  # two of four nodes: q = 0.5
    saved = [RoundRecord("train", 1, stats=stats, dp_release=release).to_json()]
    records = [RoundRecord.from_json(d) for d in json.loads(json.dumps(saved))]
    resumed = _strategy(4, CURRENT, noise_multiplier=1.0)  # built afresh: it keeps nothing
    resumed.aggregate_train(2, replies)
    stats, release = account_release(resumed.privacy, 2, 2, records)
    assert stats["dp.epsilon"] == pytest.approx(epsilon_after([(1.0, 0.5)] * 2, 1e-5))
    records.append(RoundRecord("train", 2, stats=stats, dp_release=release))
    report = privacy_report(resumed, releases_of(records))
    assert list(report["epsilon_by_round"]) == ["1", "2"]
