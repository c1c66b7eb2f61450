"""``select_round=best_val``: the federation reports the round with the best validation
macro-F1 (fed_iotlm/selection.py), chosen on validation only; ``last`` stays as it was.

The whole ServerApp runs in-process on a Grid that hands every message to the real
ClientApp of its node (:mod:`tests.inprocess_grid`: no Ray).  The run is small and
skewed (Dirichlet alpha=0.1) so that its best validation round
is not its last one, which is what makes these tests able to fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fed_iotlm.config_schema import ConfigError
from fed_iotlm.selection import BestRound, select_round_mode
from tests.inprocess_grid import AppGrid, Crash

ROUNDS = 2
# seen here: val_f1_macro 0.357 after round 1, 0.286 after round 2 (0.466 after a third)
SKEW = ("mlflow.enabled=false", "train.steps=5", "partition=dirichlet", "partition.alpha=0.1")
SKEWED = (*SKEW, f"rounds={ROUNDS}")
BEST = (*SKEWED, "select_round=best_val")


class RecordingGrid(AppGrid):
    """An :class:`AppGrid` that keeps the global model each training round was sent:
    round r's train messages carry the model after round r - 1."""

    def __init__(self, app, crash_at: int | None = None):
        super().__init__(app, crash_at)
        self.sent_models: dict[int, dict[str, np.ndarray]] = {}

    def send_and_receive(self, messages, *, timeout=None):
        from fed_iotlm.federation.records import record_to_numpy

        for m in messages:
            if m.metadata.message_type == "train" and "config" in m.content:
                rnd = int(m.content["config"].get("server-round", 0))
                self.sent_models.setdefault(rnd, record_to_numpy(m.content["arrays"]))
        return super().send_and_receive(messages, timeout=timeout)


def _serve(cfg: dict, out: Path, crash_at: int | None = None) -> RecordingGrid:
    from flwr.app import Context, RecordDict

    from clients.app import make_client_app
    from server.app import make_server_app

    grid = RecordingGrid(make_client_app(cfg), crash_at)
    make_server_app(cfg, out)(grid, Context(1, 0, {}, RecordDict(), {}))
    return grid


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _bundle(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "bundle" / "model.safetensors"))


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _expected_round(history: list[dict]) -> int:
    """The first round with the highest val_f1_macro (the documented tie rule)."""
    scores = [h["val_f1_macro"] for h in history]
    return history[int(np.argmax(scores))]["round"]


@pytest.fixture(scope="module")
def identity():
    """Flower's Message() needs a run id outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as mp:
        for name in ("_run_id", "_node_id", "_task_id"):
            mp.setattr(TaskIdentity, name, 1)
        yield


@pytest.fixture(scope="module")
def compose_quick():
    from fed_iotlm.settings import compose

    return lambda *overrides: compose(["experiment=quick", *overrides])


@pytest.fixture(scope="module")
def best_run(identity, compose_quick, tmp_path_factory):
    """One uninterrupted best_val run: (out dir, the models each round was sent)."""
    out = tmp_path_factory.mktemp("best") / "out"
    grid = _serve(compose_quick(*BEST), out)
    return out, grid.sent_models


# ------------------------------------------------------------------------ the rule


def test_the_best_round_keeps_the_earliest_of_equal_scores_and_skips_nan():
    best: BestRound[str] = BestRound()
    assert best.offer(1, 0.5, lambda: "m1")
    assert not best.offer(2, 0.5, lambda: "m2")  # a tie: the earlier round stays
    assert not best.offer(3, math.nan, lambda: "m3")  # nobody answered: never chosen
    assert best.offer(4, 0.6, lambda: "m4")
    assert best.chosen() == (4, "m4")
    with pytest.raises(RuntimeError, match="no round had a validation val_f1_macro"):
        BestRound().chosen()


def test_a_bad_select_round_is_refused_naming_the_key_and_the_choices(compose_quick):
    with pytest.raises(ConfigError, match=r"select_round='best'.*last, best_val"):
        compose_quick("select_round=best")
    with pytest.raises(ConfigError, match=r"select_round='max'.*last, best_val"):
        select_round_mode({"select_round": "max"})  # a caller's dict, never composed
    assert select_round_mode({}) == "last"


# ------------------------------------------------------------------ the federation


def test_best_val_reports_the_round_with_the_best_validation_macro_f1(best_run):
    from fed_iotlm.federation.checkpoint import checkpoint_dir, load_checkpoint

    out, sent = best_run
    res = _results(out)
    history = res["history"]
    assert all("val_f1_macro" in h for h in history)
    chosen = _expected_round(history)
    assert chosen < ROUNDS, "the run must select an earlier round to test anything"
    assert res["protocol"]["select_round"] == "best_val"
    assert res["protocol"]["selected_round"] == chosen
    assert "best validation macro-F1" in res["protocol"]["choices"]["model"]
    # the bundle is that round's model: the one round chosen + 1 was sent
    assert _same_arrays(_bundle(out), sent[chosen + 1])
    last = load_checkpoint(checkpoint_dir(out)).sections["arrays"]  # after the last round
    assert not _same_arrays(_bundle(out), last)
    meta = json.loads((out / "bundle" / "model.json").read_text())
    assert meta["selected_round"] == chosen
    # the final reports re-evaluate that model: the round's own figures, to the bit
    row = history[chosen - 1]
    assert res["test"]["accuracy"] == row["accuracy"]
    assert res["val"]["accuracy"] == row["val_accuracy"]
    assert res["val"]["f1_macro"] == row["val_f1_macro"]


def test_a_resumed_run_selects_what_the_uninterrupted_one_selected(
    best_run, identity, compose_quick, tmp_path
):
    """Crash after round 1 (the best round), resume to 2: only the checkpoint knows round
    1's model by then; without it the resumed run would report round 2."""
    full, _ = best_run
    out = tmp_path / "parted"
    with pytest.raises(Crash):
        _serve(compose_quick(*BEST), out, crash_at=ROUNDS)
    _serve(compose_quick(*BEST, "resume=true"), out)
    a, b = _results(full), _results(out)
    assert b["protocol"]["selected_round"] == a["protocol"]["selected_round"] < ROUNDS
    assert b["history"] == a["history"]
    assert b["test"]["accuracy"] == a["test"]["accuracy"]
    assert b["val"] == a["val"]
    assert _same_arrays(_bundle(out), _bundle(full))


def test_resuming_under_another_rule_is_refused(best_run, identity, compose_quick, tmp_path):
    import shutil

    from fed_iotlm.federation.checkpoint import CheckpointError

    full, _ = best_run
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    with pytest.raises(CheckpointError, match="select_round"):
        _serve(compose_quick(*SKEW, f"rounds={ROUNDS + 1}", "resume=true"), out)


def test_last_reports_the_last_round_as_before(identity, compose_quick, tmp_path):
    from fed_iotlm.federation.checkpoint import checkpoint_dir, load_checkpoint

    out = tmp_path / "last"
    grid = _serve(compose_quick(*SKEWED), out)
    res = _results(out)
    assert res["protocol"]["select_round"] == "last"
    assert res["protocol"]["selected_round"] == ROUNDS
    assert res["protocol"]["choices"] == {"model": "last round (fixed budget, no selection)"}
    assert all("val_f1_macro" not in h for h in res["history"])  # the history as it was
    assert res["test"]["accuracy"] == res["history"][-1]["accuracy"]
    final = load_checkpoint(checkpoint_dir(out)).sections["arrays"]
    assert _same_arrays(_bundle(out), final)
    assert not _same_arrays(_bundle(out), grid.sent_models[ROUNDS])
    assert "best" not in load_checkpoint(checkpoint_dir(out)).meta
    assert "selected_round" not in json.loads((out / "bundle" / "model.json").read_text())


# ------------------------------------------------------ test labels change no choice


def test_permuting_test_labels_changes_no_selection(identity, compose_quick, tmp_path):
    """Four rounds: seen here, the best test accuracy is round 3's on the data and round
    4's with the labels permuted, while validation picks round 3 in both: a selection
    that read test figures would differ between the two runs."""
    from fed_iotlm.data.exchange import save_dataset
    from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic

    ds = make_synthetic(SyntheticConfig(num_train=600, num_test=300, num_sites=3, seed=0))
    save_dataset(ds, tmp_path / "data")
    rng = np.random.default_rng(1)
    y = {t: v[rng.permutation(len(v))] for t, v in ds.test.y.items()}
    save_dataset(replace(ds, test=replace(ds.test, y=y)), tmp_path / "permuted")
    runs = []
    for name in ("data", "permuted"):
        out = tmp_path / f"run-{name}"
        cfg = compose_quick(*SKEW, "rounds=4", "select_round=best_val", "data=npz",
                            f"data.path={tmp_path / name}")  # fmt: skip
        _serve(cfg, out)
        runs.append((_results(out), _bundle(out)))
    (a, wa), (b, wb) = runs
    assert a["protocol"]["selected_round"] == b["protocol"]["selected_round"]
    assert [h["val_f1_macro"] for h in a["history"]] == [h["val_f1_macro"] for h in b["history"]]
    assert a["val"] == b["val"]
    assert _same_arrays(wa, wb)
    assert a["test"]["accuracy"] != b["test"]["accuracy"]  # only the test figures moved


# ------------------------------------------------------------- evaluation on the nodes


def test_the_nodes_val_macro_f1_is_weighted_by_their_validation_counts():
    from server.node_evaluation import NodeScores

    scores = NodeScores(
        {
            0: {"accuracy": 0.9, "val_f1_macro": 0.8, "val_examples": 30.0},
            1: {"accuracy": 0.3, "val_f1_macro": 0.2, "val_examples": 10.0},
            2: {"accuracy": 0.5},  # no validation share: not part of the figure
        }
    )
    assert scores.weighted_val_metric("val_f1_macro") == pytest.approx((0.8 * 30 + 0.2 * 10) / 40)
    # SecAgg+ hides every count: each node that reports the figure weighs the same
    hidden = NodeScores({0: {"val_f1_macro": 0.8}, 1: {"val_f1_macro": 0.2}})
    assert hidden.weighted_val_metric("val_f1_macro") == pytest.approx(0.5)
    assert math.isnan(NodeScores().weighted_val_metric("val_f1_macro"))  # nobody answered


def test_nodes_that_report_no_val_macro_f1_refuse_best_val():
    """Sites whose ClientApp predates val_f1_macro answer with accuracy only."""
    from server.node_evaluation import NodeScores

    old = NodeScores({0: {"accuracy": 0.9, "val_accuracy": 0.8}, 1: {"accuracy": 0.3}})
    with pytest.raises(RuntimeError, match="none of the 2 node.*val_f1_macro.*select_round=last"):
        old.weighted_val_metric("val_f1_macro")


def _val_f1_mod(score_of_round):
    """A client mod that replaces (None: removes) the ``val_f1_macro`` a node's evaluate
    reply carries, by the round it scores: the server's choice must follow it."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "evaluate" and not reply.has_error():
            metrics = reply.content["metrics"]
            rnd = int(msg.content["config"]["server-round"])
            score = score_of_round(rnd)
            if score is None:
                del metrics["val_f1_macro"]
            else:
                metrics["val_f1_macro"] = score
        return reply

    return mod


def _serve_with(cfg: dict, out: Path, mod) -> RecordingGrid:
    from flwr.app import Context, RecordDict

    from clients.app import make_client_app
    from server.app import make_server_app

    grid = RecordingGrid(make_client_app(cfg, mods=[mod]))
    make_server_app(cfg, out)(grid, Context(1, 0, {}, RecordDict(), {}))
    return grid


def test_best_val_with_evaluation_on_the_nodes_follows_their_val_macro_f1(
    identity, compose_quick, tmp_path
):
    """The nodes report round 1 as their best (0.9, then 0.1): the server reports round
    1's model, and its final per-node evaluation re-scores that model."""
    out = tmp_path / "nodes"
    cfg = compose_quick(*BEST, "evaluation=nodes")
    grid = _serve_with(cfg, out, _val_f1_mod(lambda rnd: 0.9 if rnd == 1 else 0.1))
    res = _results(out)
    assert res["evaluation"] == "nodes"
    assert [h["val_f1_macro"] for h in res["history"]] == pytest.approx([0.9, 0.1])
    assert res["protocol"]["selected_round"] == 1
    assert _same_arrays(_bundle(out), grid.sent_models[2])
    assert res["test"]["accuracy"] == pytest.approx(res["history"][0]["accuracy"])
    assert res["test"]["accuracy"] != pytest.approx(res["history"][1]["accuracy"])


def test_best_val_on_nodes_that_report_no_val_macro_f1_is_refused(
    identity, compose_quick, tmp_path
):
    cfg = compose_quick(*BEST, "evaluation=nodes")
    with pytest.raises(RuntimeError, match="none of the 3 node.*val_f1_macro"):
        _serve_with(cfg, tmp_path / "old", _val_f1_mod(lambda rnd: None))


# ------------------------------------------------------- checkpoints from before the key


def test_a_checkpoint_written_before_the_key_resumes_under_last_only(compose_quick):
    from fed_iotlm.federation.checkpoint import config_differences, resumable_config

    cfg = compose_quick(*SKEWED)
    older = {k: v for k, v in resumable_config(cfg).items() if k != "select_round"}
    assert config_differences(older, cfg) == []
    assert config_differences(older, compose_quick(*BEST)) == ["select_round"]


def test_mlflow_holds_the_reported_figures_at_the_selected_round(identity, compose_quick, tmp_path):
    """The final figures in MLflow are those of the round reported: logged at its step,
    where that round's own val_accuracy already is, not at the last round's."""
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlflow.db"
    on = [o for o in BEST if not o.startswith("mlflow.")]
    out = tmp_path / "out"
    _serve(compose_quick(*on, f"mlflow.tracking_uri=sqlite:///{store}"), out)
    res = _results(out)
    chosen = res["protocol"]["selected_round"]
    assert chosen == _expected_round(res["history"]) and chosen != ROUNDS, res["history"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])

    def steps(key: str) -> dict[int, float]:
        return {int(m.step): m.value for m in client.get_metric_history(run.info.run_id, key)}

    assert steps("test_accuracy") == {chosen: pytest.approx(res["test"]["accuracy"])}
    assert steps("val_accuracy")[chosen] == pytest.approx(res["val"]["accuracy"])
    assert sorted(steps("val_accuracy")) == list(range(1, ROUNDS + 1))  # once a round
