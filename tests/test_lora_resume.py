"""The federated-LoRA ServerApp's checkpoint and ``resume=true``.

Without Flower: every part of the server state survives a checkpoint bit for bit, and a
checkpoint written under other settings is refused; on a stand-in Grid, a site restarted
under a new node id is sent the next round through the live roster.  In a real Flower
simulation (the
tiny offline test model, 2 sites): a run of FFA (2 rounds) then FedEx (3 rounds) is
interrupted right after FedEx's round 1 has been checkpointed (the ``on_record`` hook
raises, as a crash after the save would), then resumed; a client mod marks each
(method, round, site) that ran, so the test sees that no round ran twice, and the resumed
run must end with the uninterrupted run's FedEx adapter, residual, projector and exact
update bit for bit (sites seed local training from (round, partition id) and load what
the server sends; the server aggregates in partition order) and with its results.json.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fed_iotlm.federation.checkpoint import CheckpointError, checkpoint_dir, load_checkpoint
from fed_iotlm.federation.round_record import TRAIN, Participation, RoundRecord
from fed_iotlm.llm.federated import FederatedSettings, LoraServerState, SiteUpdate
from fed_iotlm.llm.fedlora import LoraFactors
from fed_iotlm.llm.loading import TINY_MODEL
from fed_iotlm.llm.lora_task import LoraTask
from fed_iotlm.llm.tuning import TuneSettings
from server.lora_resume import LoraCheckpointer

TASK = LoraTask(
    model=TINY_MODEL,
    lora_r=4,
    lora_alpha=8,
    target_modules=("q_proj", "v_proj"),
    tune=TuneSettings(batch_size=8, lr=3e-3, sensor_lr=3e-3, warmup=0),
    toy_train=32,
    toy_eval=8,
    max_new_tokens=3,
)
NODES = 2
PLANS = [FederatedSettings("ffa", 2, 2), FederatedSettings("fedex", 3, 2)]
CRASH = ("fedex", 1)  # the hook raises after this round's checkpoint


# ------------------------------------------------------------------ without Flower


def _template() -> dict[str, LoraFactors]:
    return {
        "q": LoraFactors(torch.zeros(4, 16), torch.zeros(16, 4), 2.0),
        "v": LoraFactors(torch.zeros(4, 16), torch.zeros(8, 4), 2.0),
    }


def _aggregated(method: str, ranks: dict[int, int]) -> LoraServerState:
    """A state after one round of random replies (FedEx: a residual, version 1)."""
    g = torch.Generator().manual_seed(7)
    sensor = {"proj.w": torch.randn(3, 5, generator=g), "gate": torch.ones(2, dtype=torch.bfloat16)}
    state = LoraServerState.start(method, _template(), sensor, ranks, 8.0, seed=3)
    updates = {
        pid: SiteUpdate(
            {
                n: LoraFactors(
                    torch.randn(r, f.A.shape[1], generator=g),
                    torch.randn(f.B.shape[0], r, generator=g),
                    8.0 / r,
                )
                if method != "ffa"
                else LoraFactors(f.A, torch.randn(f.B.shape, generator=g), f.scaling)
                for n, f in state.factors[pid].items()
                for r in [ranks[pid]]
            },
            {k: v + pid for k, v in sensor.items()},
            10 + pid,
            1.0,
        )
        for pid in ranks
    }
    state.aggregate(1, updates)
    return state


def _same_factors(a: dict[str, LoraFactors], b: dict[str, LoraFactors]) -> bool:
    return set(a) == set(b) and all(
        torch.equal(a[n].A, b[n].A)
        and a[n].A.dtype == b[n].A.dtype
        and torch.equal(a[n].B, b[n].B)
        and a[n].scaling == b[n].scaling
        for n in a
    )


def _same_state(a: LoraServerState, b: LoraServerState) -> None:
    assert (a.method, a.version, a.a_seed, a.dense_diagnostics) == (
        b.method, b.version, b.a_seed, b.dense_diagnostics,
    )  # fmt: skip
    assert set(a.factors) == set(b.factors)
    assert all(_same_factors(a.factors[k], b.factors[k]) for k in a.factors)
    assert _same_factors(a.residual, b.residual) and _same_factors(a.exact, b.exact)
    assert a.sensor.keys() == b.sensor.keys()
    for k in a.sensor:
        assert a.sensor[k].dtype == b.sensor[k].dtype and torch.equal(a.sensor[k], b.sensor[k])


def _record(rnd: int) -> RoundRecord:
    return RoundRecord(
        TRAIN, rnd, ArrayRecord(), Participation(2, 2), stats={"lora_bytes_down": 1.0},
        metrics={"loss": 0.5, "site.0.loss": 0.4},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("method", "ranks"),
    [("fedex", {0: 4, 1: 4}), ("ffa", {0: 4, 1: 4}), ("flexlora", {0: 2, 1: 4})],
)
def test_the_server_state_survives_a_checkpoint_bit_for_bit(tmp_path, method, ranks):
    state = _aggregated(method, ranks)
    if method == "fedex":
        assert state.version == 1 and state.residual
    plans = [FederatedSettings(method, 3, 2, tuple(ranks.values()))]
    done = {"fedit": {"accuracy": 0.25}}
    torch.manual_seed(99)
    LoraCheckpointer(tmp_path, TASK, plans, 2).save(state, [_record(1), _record(2)], done)
    after = torch.rand(3)  # what the server would draw next
    assert LoraCheckpointer(tmp_path, TASK, plans, 2).restore() is None  # resume=false
    point = LoraCheckpointer(tmp_path, TASK, plans, 2, resume=True).restore()
    assert (point.method, point.round, point.done) == (method, 2, done)
    _same_state(state, point.state)
    if method != "flexlora":  # every site loads one shared adapter, saved once
        assert point.state.factors[0] is point.state.factors[1]
        assert "site.1" not in load_checkpoint(checkpoint_dir(tmp_path)).sections
    assert [r.round for r in point.records] == [1, 2]
    assert point.records[0] == _record(1)
    torch.manual_seed(5)
    point.restore_rng()
    assert torch.equal(torch.rand(3), after)


def test_resume_refuses_other_settings_and_starts_afresh_without_a_checkpoint(tmp_path):
    plans = [FederatedSettings("fedex", 3, 2)]
    assert LoraCheckpointer(tmp_path, TASK, plans, 2, resume=True).restore() is None
    LoraCheckpointer(tmp_path, TASK, plans, 2).save(_aggregated("fedex", {0: 4, 1: 4}),
                                                     [_record(1)], {})  # fmt: skip
    # rounds may not grow: every site's lr schedule spans rounds × local_steps
    for other, what in [
        ([FederatedSettings("fedex", 4, 2)], "plans"),
        ([FederatedSettings("fedex", 3, 2)], "num_sites"),
        ([FederatedSettings("fedit", 3, 2)], "plans"),
    ]:
        sites = 3 if what == "num_sites" else 2
        with pytest.raises(CheckpointError, match=what):
            LoraCheckpointer(tmp_path, TASK, other, sites, resume=True).restore()
    with pytest.raises(CheckpointError, match="task.lora_r"):
        LoraCheckpointer(tmp_path, replace(TASK, lora_r=8), plans, 2, resume=True).restore()
    # the site split: a run on node sites does not resume on an IID deal (or back)
    nodes = replace(TASK, data="bundle", cfg_json=json.dumps({"llm": {"data": "nodes"}}),
                    site_split="auto")  # fmt: skip
    assert nodes.site_split == "nodes"
    out = tmp_path / "node-sites"
    LoraCheckpointer(out, nodes, plans, 2).save(_aggregated("fedex", {0: 4, 1: 4}),
                                                [_record(1)], {})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"\(task.site_split differ\)"):
        LoraCheckpointer(out, replace(nodes, site_split="iid"), plans, 2, True).restore()
    assert LoraCheckpointer(out, nodes, plans, 2, resume=True).restore().round == 1
    # a longer deadline is no reason to refuse
    later = [replace(plans[0], round_timeout_s=10.0)]
    assert LoraCheckpointer(tmp_path, TASK, later, 2, resume=True).restore().round == 1


def test_a_federation_checkpoint_is_not_a_lora_one(tmp_path):
    from fed_iotlm.federation.checkpoint import Checkpoint, save_checkpoint

    save_checkpoint(checkpoint_dir(tmp_path), Checkpoint(1, TRAIN, {"arrays": {}}, {"records": []}))
    with pytest.raises(CheckpointError, match="not a federated-LoRA checkpoint"):
        LoraCheckpointer(tmp_path, TASK, PLANS, 2, resume=True).restore()


# ------------------------------------------------------------------ the live roster


class _SitesGrid:
    """A Grid whose sites answer at once: ``query.identify`` with their partition id and
    ``train`` with the adapter they were sent; ``nodes`` maps node id -> partition id and
    can change between rounds (a restarted site under a new node id).  Sent messages keep
    flwr's empty message id outside a SuperLink, so one newcomer is identified at a time."""

    def __init__(self, nodes: dict[int, int]) -> None:
        self.nodes = dict(nodes)
        self.sent: list[tuple[str, int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

        replies = []
        for m in messages:
            kind, node = m.metadata.message_type, m.metadata.dst_node_id
            self.sent.append((kind, node))
            if kind == "query.identify":
                identity = {"partition-id": self.nodes[node], "source": "partition"}
                content = RecordDict({"identity": ConfigRecord(identity)})
            else:
                metrics = MetricRecord({"num-examples": 4.0, "loss": 1.0})
                content = RecordDict({"arrays": m.content["arrays"], "metrics": metrics})
            metadata = Metadata(
                run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                reply_to_message_id=m.metadata.message_id, group_id="", created_at=0.0,
                ttl=60.0, message_type=kind,
            )  # fmt: skip
            replies.append(Message(metadata=metadata, content=content))
        return replies


def test_a_restarted_site_is_sent_the_next_round_and_its_rejoin_recorded(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from server.engine import RoundEngine
    from server.lora_step import LoraStep
    from server.roster import LiveRoster, Roster

    for name in ("_run_id", "_node_id", "_task_id"):  # a ServerApp's, outside Flower
        monkeypatch.setattr(TaskIdentity, name, 1)
    grid = _SitesGrid({10: 0, 11: 1})
    roster = LiveRoster(
        Roster({0: 10, 1: 11}, {0: [], 1: []}, {0: "partition", 1: "partition"}), 2,
        identify_timeout_s=1.0, wait_s=0.0,
    )  # fmt: skip
    sensor = {"proj.w": torch.ones(2, 3)}
    state = LoraServerState.start("fedit", _template(), sensor, {0: 4, 1: 4}, 8.0)
    step = LoraStep(grid, state, roster, FederatedSettings("fedit", 2, 1), 8.0)
    engine = RoundEngine(TRAIN, step, roster=roster)
    first = engine.run_round(1, ArrayRecord())
    assert grid.sent == [("train", 10), ("train", 11)] and first.rejoins == ()
    del grid.nodes[11]  # site 1 restarted: a new node id, the old one gone
    grid.nodes[21] = 1
    grid.sent.clear()
    second = engine.run_round(2, ArrayRecord())
    assert grid.sent == [("query.identify", 21), ("train", 10), ("train", 21)]
    assert second.rejoins == ({"round": 2, "partition": 1, "node": 21, "was": 11},)
    assert (second.participation.sent, second.participation.answered) == (2, 2)
    assert sorted(k for k in second.metrics if k.startswith("site.")) == [
        "site.0.loss", "site.0.n", "site.0.rank", "site.1.loss", "site.1.n", "site.1.rank",
    ]  # fmt: skip


# --------------------------------------------------------------- Flower simulation


class Crash(RuntimeError):
    """The server dying right after a round was checkpointed."""


def _run(out: Path, markers: Path, resume: bool = False, crash=None):
    """(results.json or None, {method: last observed state}, {kind: [(round, site)]})."""
    from simulations.fedlora_study import run_lora_simulation
    from tests.client_mods import round_marker, rounds_run

    final: dict[str, LoraServerState] = {}

    def observe(method, rnd, updates, state):
        final[method] = copy.deepcopy(state)

    def on_record(method, record):
        if (method, record.round) == crash:
            raise Crash(f"{method} round {record.round}")

    markers.mkdir()
    try:
        doc = run_lora_simulation(
            TASK, PLANS, NODES, out, observe, client_mods=[round_marker(markers, by_method=True)],
            on_record=on_record, resume=resume,
        )  # fmt: skip
    except Crash:
        doc = None
    return doc, final, rounds_run(markers)


def _each_site(rounds) -> list[tuple[int, int]]:
    return sorted((r, p) for r in rounds for p in range(NODES))


def _without_times(doc: dict) -> dict:
    out = json.loads(json.dumps(doc))
    out.pop("wall_s")
    for block in out["methods"].values():
        block.pop("train_s"), block.pop("eval_s")
    return out


@pytest.mark.integration
def test_a_resumed_lora_run_ends_like_an_uninterrupted_one(tmp_path):
    full_doc, full, ran = _run(tmp_path / "full", tmp_path / "ran-full")
    assert ran == {"train.ffa": _each_site([1, 2]), "train.fedex": _each_site([1, 2, 3])}

    parted = tmp_path / "parted"
    doc, _, ran = _run(parted, tmp_path / "ran-1", crash=CRASH)
    assert doc is None, "the injected crash did not stop the run"
    assert ran == {"train.ffa": _each_site([1, 2]), "train.fedex": _each_site([1])}
    ckpt = load_checkpoint(checkpoint_dir(parted))
    assert (ckpt.phase, ckpt.round, ckpt.meta["lora"]["method"]) == (TRAIN, 1, "fedex")
    assert ckpt.meta["lora"]["version"] == 1 and ckpt.sections["residual"]
    assert ckpt.meta["schedule"] == {"rounds": 3, "local_steps": 2, "next_global_step": 2}
    assert set(ckpt.meta["done"]) == {"ffa"}
    assert sorted(p.name for p in checkpoint_dir(parted).iterdir()) == [
        "round-train-00001.safetensors",
        "state.json",
    ]

    doc, resumed, ran = _run(parted, tmp_path / "ran-2", resume=True)
    assert ran == {"train.fedex": _each_site([2, 3])}, "a round ran again (or none ran)"
    assert set(resumed) == {"fedex"}
    _same_state(full["fedex"], resumed["fedex"])  # bit for bit
    assert resumed["fedex"].version == 3
    assert _without_times(doc) == _without_times(full_doc)
    assert [r["round"] for r in doc["methods"]["fedex"]["rounds"]] == [1, 2, 3]
    assert len({r["loss"] for r in doc["methods"]["fedex"]["rounds"]}) == 3  # it trained
    last = load_checkpoint(checkpoint_dir(parted))
    assert (last.round, last.meta["lora"]["method"]) == (3, "fedex")
    a, b = load_checkpoint(checkpoint_dir(tmp_path / "full")), last
    for name in ("site.0", "residual", "exact", "sensor"):
        assert a.sections[name].keys() == b.sections[name].keys()
        assert all(
            np.array_equal(a.sections[name][k], b.sections[name][k]) for k in a.sections[name]
        )
