"""Issue 13 build 1: federated-LoRA sites are the federation's nodes (fed_iotlm/llm/sites.py).

A random-weight bundle over a 3-node plan (each node its own modalities) with label
fraction 0.5: the nodes upload tokens and the labels they hold, and site k must train only
on instructions about node k's rows, only labelled ones, with node k's modalities.  The
node rows and labels are read from the federation layout itself (what each node holds),
not from the split's own bookkeeping.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fed_iotlm.data.federation import build_layout
from fed_iotlm.federation.round_record import TRAIN
from fed_iotlm.llm.federated import FederatedSettings, LoraServerState
from fed_iotlm.llm.instructions import Example, Turn
from fed_iotlm.llm.loading import TINY_MODEL
from fed_iotlm.llm.lora_task import LoraTask, load_task_data, site_examples, task_sites
from fed_iotlm.llm.sites import split_sites
from fed_iotlm.settings import compose

PLAN = [["imu", "audio"], ["depth", "thermal"], ["imu", "thermal"]]
DATA = [
    "data.num_train=90", "data.num_test=30",
    "partition.plan=[" + ",".join("[" + ",".join(n) + "]" for n in PLAN) + "]",
    "partition.label_fraction=0.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, task): the task on the rows the 3 nodes upload through a random bundle."""
    from fed_iotlm.experiment import model_spec
    from fed_iotlm.federation.bundle import save_bundle
    from fed_iotlm.federation.records import state_to_numpy
    from fed_iotlm.models.multisensory import MultisensoryModel

    bundle = tmp_path_factory.mktemp("bundle")
    spec = model_spec(compose(DATA))
    torch.manual_seed(0)
    save_bundle(bundle, state_to_numpy(MultisensoryModel(spec)), spec, {})
    cfg = compose([*DATA, f"llm.bundle={bundle}", f"llm.model={TINY_MODEL}"])
    return cfg, LoraTask.from_cfg(cfg)


def _node_rows(cfg: dict) -> tuple[list[range], list[dict[str, np.ndarray]]]:
    """Each node's training rows at the centre (uploads are concatenated in node order)
    and its own labels, from the federation layout."""
    layout = build_layout(cfg)
    splits = [layout.node_data(n)[0] for n in range(layout.num_nodes)]
    starts = np.cumsum([0] + [len(s) for s in splits])
    return [range(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)], [
        {t: np.asarray(v) for t, v in s.y.items()} for s in splits
    ]


def test_each_site_trains_only_on_its_nodes_labelled_rows(setup):
    cfg, task = setup
    assert task.site_split == "nodes"  # the default when the nodes upload the rows
    rows, labels = _node_rows(cfg)
    data = load_task_data(task)
    split = task_sites(task, "auto")
    assert split.split == "nodes" and split.nodes == (0, 1, 2)
    used = set()
    for k in range(3):
        examples = site_examples(task, k, "auto")
        assert examples, f"site {k} got no example"
        for ex in examples:
            assert all(r in rows[k] for r in ex.rows), (k, ex.rows)  # node k's rows only
            assert set(ex.present) <= set(PLAN[k])  # its plan's modalities only
            for r in ex.rows:
                local = r - rows[k].start
                assert any(y[local] >= 0 for y in labels[k].values())  # labelled only
                if ex.task is not None and ex.label is not None:
                    assert labels[k][ex.task][local] == ex.label >= 0
            used.update(ex.rows)
        unlabelled = {
            rows[k].start + i
            for i in range(len(rows[k]))
            if all(y[i] < 0 for y in labels[k].values())
        }
        assert unlabelled and not unlabelled & used  # fraction 0.5: some, never asked about
        report = split.report()["per_site"][k]
        assert report == {
            "site": k, "node": k, "rows": len(rows[k]),
            "labelled_rows": len(rows[k]) - len(unlabelled), "examples": len(examples),
        }  # fmt: skip
    assert sum(len(e) for e in split.examples) == len(data.train)  # every instruction held


def test_site_count_follows_the_plan_and_a_contradicting_one_is_refused(setup):
    _, task = setup
    assert task_sites(task, "auto").num_sites == len(PLAN)
    assert task_sites(task, 3).num_sites == 3  # restating the plan is fine
    for wrong in (2, 8):
        with pytest.raises(ValueError, match=f"sites={wrong} but the federation's plan has 3"):
            task_sites(task, wrong)
    with pytest.raises(ValueError, match="give auto or a number"):
        task_sites(task, "many")
    # the IID baseline only when named: any number of sites, shares mixing the nodes
    iid = replace(task, site_split="iid")
    assert iid.site_split == "iid" and task_sites(iid, 5).num_sites == 5
    assert task_sites(iid, "auto").num_sites == 3
    owner = load_task_data(task).train_nodes
    mixed = [len({int(owner[ex.index]) for ex in share}) for share in task_sites(iid, 3).examples]
    assert max(mixed) > 1
    assert task_sites(iid, 3).report()["split"] == "iid"


def test_the_site_split_is_chosen_by_name_in_the_config(setup):
    cfg, task = setup
    fed = cfg["llm"]["federated"]
    assert fed["sites"] == "auto" and fed["site_split"] == "auto"
    iid = {**cfg, "llm": {**cfg["llm"], "federated": {**fed, "site_split": "iid"}}}
    assert LoraTask.from_cfg(iid).site_split == "iid"
    pooled = {**cfg, "llm": {**cfg["llm"], "data": "pooled_raw"}}
    assert LoraTask.from_cfg(pooled).site_split == "iid"  # no nodes behind pooled rows
    with pytest.raises(ValueError, match="site_split=nodes needs rows uploaded by"):
        LoraTask.from_cfg(
            {**pooled, "llm": {**pooled["llm"], "federated": {**fed, "site_split": "nodes"}}}
        )
    with pytest.raises(ValueError, match="site_split='random'"):
        replace(task, site_split="random")
    with pytest.raises(ValueError, match="site_split=nodes needs"):
        LoraTask(site_split="nodes")  # the toy data has no nodes
    assert LoraTask().site_split == "iid"


def _example(row: int) -> Example:
    return Example(
        row, ("imu",), (Turn("What is the state?", "calm"),), "task", "state", 0, "train"
    )


def test_an_empty_node_is_an_error_naming_it():
    owner = np.array([0, 0, 2, 2])  # node 1 holds nothing
    with pytest.raises(ValueError, match="node 1 holds no training rows"):
        split_sites([_example(0), _example(2)], "nodes", "auto", 0, owner, None, 3)


def test_an_idle_site_is_sent_no_round_and_named_in_every_record(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from server.engine import RoundEngine
    from server.lora_step import LoraStep, lora_rounds
    from server.roster import LiveRoster, Roster
    from tests.test_lora_resume import _SitesGrid, _template

    # node 1 holds two rows, neither labelled: no instruction example, an idle site
    owner, labelled = np.array([0, 0, 1, 1]), np.array([True, True, False, False])
    split = split_sites([_example(0), _example(1)], "nodes", "auto", 0, owner, labelled, 2)
    assert [len(e) for e in split.examples] == [2, 0]
    idle = split.idle()
    assert list(idle) == [1] and "node 1" in idle[1] and "0 labelled" in idle[1]
    assert split.report()["idle"] == {"1": idle[1]}

    for name in ("_run_id", "_node_id", "_task_id"):  # a ServerApp's, outside Flower
        monkeypatch.setattr(TaskIdentity, name, 1)
    grid = _SitesGrid({10: 0, 11: 1})
    roster = LiveRoster(
        Roster({0: 10, 1: 11}, {0: [], 1: []}, {0: "partition", 1: "partition"}), 2,
        identify_timeout_s=1.0, wait_s=0.0,
    )  # fmt: skip
    state = LoraServerState.start("fedit", _template(), {"w": torch.ones(2)}, {0: 4, 1: 4}, 8.0)
    step = LoraStep(grid, state, roster, FederatedSettings("fedit", 2, 1), 8.0, idle=idle)
    engine = RoundEngine(TRAIN, step, roster=roster)
    records = [engine.run_round(rnd, ArrayRecord()) for rnd in (1, 2)]
    assert grid.sent == [("train", 10), ("train", 10)]  # partition 1 never sent a round
    for rec in records:
        p = rec.participation
        assert (p.sent, p.answered, p.skipped) == (1, 1, False)  # "every site": site 0
        assert rec.stats["sites_idle"] == 1.0 and rec.stats["idle.1"] == 1.0
    assert [r["idle"] for r in lora_rounds(records)] == [["1"], ["1"]]
    assert [set(r["sites"]) for r in lora_rounds(records)] == [{"0"}, {"0"}]


def test_a_node_without_samples_uploads_an_empty_record(setup):
    """An empty node must reach the site check above (which names it), not crash the
    upload with numpy's "need at least one array to concatenate"."""
    from fed_iotlm.binding.messages import PrivacyConfig
    from fed_iotlm.data.dataset import Split
    from fed_iotlm.federation.bundle import load_bundle
    from fed_iotlm.llm.uploads import encode_split, pack_upload, unpack_upload

    cfg, _ = setup
    encoder, _ = load_bundle(cfg["llm"]["bundle"])
    full = build_layout(cfg).node_data(0)[0]
    empty = Split(
        {m: v[:0] for m, v in full.x.items()}, {m: v[:0] for m, v in full.mask.items()},
        {t: v[:0] for t, v in full.y.items()},
    )  # fmt: skip
    rows = unpack_upload(pack_upload(encode_split(encoder, empty), PrivacyConfig(0.0, True), 0))
    assert len(rows) == 0 and all(t.shape == (0, encoder.spec.dim) for t in rows.tokens.values())
