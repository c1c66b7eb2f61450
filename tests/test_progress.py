"""Progress a user can watch: round and step lines read back from the real formatters,
a study following a child's log while the child still runs, plain output off a terminal."""

from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from fed_iotlm.llm.stage import step_line
from fed_iotlm.logs import FORMAT
from fed_iotlm.progress import Bars, LogFollower, parse_line
from fed_iotlm.tracking import round_line
from simulations.study_progress import StudyProgress, follow_child

REPO = Path(__file__).resolve().parents[1]


def _logged(message: str) -> str:
    """``message`` as the child's log handler writes it (level and logger prefix)."""
    return FORMAT % {"levelname": "INFO", "name": "fed_iotlm.tracking", "message": message}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((3, 20, 0.5, 1.2, 12.0, 51.4, {}), ("round", 3, 20, 51.0)),
        ((20, 20, 0.5, 1.2, 99.0, None, {}), ("round", 20, 20, None)),  # last round: no ETA
        # the optional parts between the loss and the time do not hide the figures
        (
            (
                4,
                10,
                0.1,
                2.0,
                8.0,
                7.0,
                {"rejected_updates": 2, "nodes_sent": 5, "nodes_answered": 3, "round_skipped": 1},
            ),
            ("round", 4, 10, 7.0),
        ),  # fmt: skip
        ((1, None, 0.1, 2.0, 1.0, None, {}), ("round", 1, None, None)),  # rounds unset
    ],
)
def test_round_lines_of_the_real_formatter_parse_back(args, expected):
    line = round_line(*args)
    mark = parse_line(_logged(line))
    assert mark is not None
    assert (mark.kind, mark.done, mark.total, mark.eta_s) == expected
    assert mark.line == line.strip()  # the logger's prefix dropped


def test_step_lines_of_the_real_formatter_parse_back():
    row = {"gates_tanh": [0.1, None], "adapter_attention_ratio": [0.2, None]}
    mark = parse_line(step_line("prefix", 10, 1.234, 317.2, row))
    assert mark is not None
    assert (mark.kind, mark.done, mark.total, mark.eta_s) == ("prefix step", 10, None, 317.0)


@pytest.mark.parametrize(
    "line", ["INFO    fed_iotlm.tracking: resumed at round 3", "test accuracy 0.5", ""]
)
def test_other_lines_are_not_progress(line):
    assert parse_line(line) is None


def test_the_follower_waits_for_a_line_to_end(tmp_path):
    log, seen = tmp_path / "run.log", []
    follower = LogFollower(log, seen.append)
    assert follower.poll() == 0  # no file yet
    line = _logged(round_line(1, 2, 0.5, 1.0, 3.0, 3.0, {}))
    log.write_text(line[:20])
    assert follower.poll() == 0 and seen == []
    with log.open("a") as fh:
        fh.write(line[20:] + "\nsomething else\n")
    assert follower.poll() == 1
    assert [m.done for m in seen] == [1]
    assert follower.poll() == 0  # nothing read twice


# a child that writes round 1, waits until the study has shown it (a file the study's
# callback creates), then writes round 2: it exits 3 if the study never showed round 1
_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fed_iotlm.logs import FORMAT
    from fed_iotlm.tracking import round_line
    seen = Path(sys.argv[1])
    def say(r, eta):
        msg = round_line(r, 2, 0.5, 1.0, float(r), eta, {})
        print(FORMAT % {"levelname": "INFO", "name": "fed_iotlm.tracking", "message": msg},
              file=sys.stderr, flush=True)
    say(1, 4.0)
    deadline = time.monotonic() + 60
    while not seen.exists():
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.02)
    say(2, None)
    """
)


def test_a_study_shows_a_childs_rounds_while_it_runs(tmp_path):
    out = io.StringIO()
    view = StudyProgress(4, Console(file=out, force_terminal=False, width=200))
    shown = tmp_path / "shown"
    marks = []

    def on_mark(mark):
        marks.append(mark)
        view.mark(mark)
        if mark.done == 1:
            shown.touch()  # lets the child go on only once round 1 was shown

    view.begin("fedavg-seed0")
    log = tmp_path / "run.log"
    code = follow_child(
        [sys.executable, "-c", _CHILD, str(shown)], log, on_mark, cwd=REPO, poll_s=0.05
    )
    view.end()
    view.close()
    assert code == 0  # the child saw round 1 shown before it wrote round 2 and ended
    assert [(m.done, m.total) for m in marks] == [(1, 2), (2, 2)]
    text = out.getvalue()
    assert "run 1/4 fedavg-seed0: round   1/2" in text and "ETA 4s" in text
    assert "run 1/4 fedavg-seed0: round   2/2" in text
    assert "\r" not in text  # not a terminal: plain lines only
    assert log.read_text().count("round ") == 2  # the run's log stays complete


def test_a_failing_child_returns_its_code_and_keeps_its_log(tmp_path):
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(5)"]
    assert follow_child(cmd, log, lambda m: None, poll_s=0.05) == 5
    assert "boom" in log.read_text()


def test_bars_off_a_terminal_draw_nothing():
    out = io.StringIO()
    bars = Bars(Console(file=out, force_terminal=False))
    task = bars.add("rounds", 5)
    bars.update(task, 2, eta_s=10.0, note="accuracy 0.500")
    bars.close()
    assert not bars.live and out.getvalue() == ""


def test_bars_on_a_terminal_show_progress_and_eta():
    out = io.StringIO()
    bars = Bars(Console(file=out, force_terminal=True, width=120))
    task = bars.add("rounds", 5)
    bars.update(task, 2, eta_s=65.0, note="accuracy 0.500")
    text = out.getvalue()
    bars.close()
    assert bars.live and "rounds" in text and "2/5" in text and "ETA 1m05s" in text
    assert "\r" in text  # redrawn in place: what plain output must never do


def test_a_study_on_a_terminal_draws_the_run_and_the_runs_done():
    out = io.StringIO()
    view = StudyProgress(3, Console(file=out, force_terminal=True, width=160, highlight=False))
    view.end(cached=True)  # a run whose results were there already
    view.begin("fedavg-seed1")
    view.mark(parse_line(round_line(2, 5, 0.5, 1.0, 9.0, 30.0, {})))
    text = out.getvalue()
    view.close()
    assert "run 2/3 fedavg-seed1 rounds" in text and "2/5" in text
    assert "round   2/5  accuracy 0.500  loss 1.000  (9s, ETA 30s)" in text  # its latest line
    assert "runs done" in text and "1/3" in text


def _terminal(monkeypatch, module) -> io.StringIO:
    """``module.console`` replaced by a terminal console writing to the returned buffer."""
    out = io.StringIO()
    monkeypatch.setattr(
        module, "console", Console(file=out, force_terminal=True, width=160, highlight=False)
    )
    return out


def test_a_run_on_a_terminal_draws_a_rounds_bar_and_still_logs_each_round(
    tmp_path, monkeypatch, caplog
):
    from fed_iotlm import tracking

    out = _terminal(monkeypatch, tracking)
    cfg = {"method": "local", "seed": 0, "rounds": 4, "mlflow": {"enabled": False}}
    rec = tracking.RunRecorder(cfg, tmp_path / "run", dataset="toy", plan={"0": ["imu"]})
    with caplog.at_level("INFO", logger="fed_iotlm.tracking"):
        rec.log_round(1, 0.25, 1.0)
        rec.log_round(2, 0.5, 0.9)
    text = out.getvalue()
    rec.fail()  # closes the bar
    assert "rounds" in text and "2/4" in text and "accuracy 0.500" in text
    assert [r.getMessage()[:11] for r in caplog.records] == ["round   1/4", "round   2/4"]
    assert rec._bars is None


def test_tuning_on_a_terminal_draws_a_steps_bar_beside_the_step_lines(monkeypatch):
    from fed_iotlm.llm import stage

    out = _terminal(monkeypatch, stage)
    bars = Bars(stage.console)
    log = stage._step_logger("prefix", 40, bars)
    log(10, 1.5, 90.0, {})
    text = out.getvalue()
    bars.close()
    assert "prefix step 10: loss 1.500 (ETA 90s)" in text  # the line, as before
    assert "prefix steps" in text and "10/40" in text and "ETA 1m30s" in text


def test_log_lines_print_above_a_live_bar_and_their_stream_comes_back(monkeypatch):
    """A console handler made before the bar (ours, Flower's) writes through the bar's
    redirect while it is live, so its lines print above the bar, not into its line."""
    import logging

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, before = io.StringIO(), Tty()
    monkeypatch.setattr(sys, "stderr", before)
    handler = logging.StreamHandler()  # bound to `before`, as at import time
    logger = logging.getLogger("flwr-like-test-logger")
    logger.addHandler(handler)
    try:
        bars = Bars(Console(file=term, force_terminal=True, width=100))
        assert handler.stream is sys.stderr is not before  # the redirect
        logger.warning("configure_train: Sampled 3 nodes")
        bars.close()
        assert handler.stream is before  # restored
    finally:
        logger.removeHandler(handler)
    assert "configure_train: Sampled 3 nodes" in term.getvalue() and before.getvalue() == ""


def test_stderr_sent_elsewhere_is_left_there_under_a_live_bar(monkeypatch):
    """``2> file`` with stdout on a terminal: the bars draw, stderr is not pulled onto them."""
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    bars = Bars(Console(file=io.StringIO(), force_terminal=True, width=100))
    try:
        assert bars.live and sys.stderr is err
    finally:
        bars.close()


def test_the_budget_studys_run_count_is_the_runs_it_asks_for(monkeypatch, tmp_path):
    """n in "run k/n" is what the study will ask run_one for (grid at seed 0, then the
    chosen point at each seed, seed 0 read back from its cache)."""
    from simulations import budget_study, study_progress

    calls, totals = [], set()

    def fake_run_one(out, overrides, **_):
        calls.append(out)
        totals.add(study_progress._active[-1].total)
        return {"test": {"accuracy": 0.9}, "val": {"accuracy": 0.9},
                "code_version": {"commit": "abc", "dirty": False}}  # fmt: skip

    monkeypatch.setattr(budget_study, "run_one", fake_run_one)
    # the page is read back from MLflow, which these fake runs never reach: counts only
    monkeypatch.setattr(budget_study, "logged_runs", lambda *a, **k: [])
    monkeypatch.setattr(budget_study, "write_doc", lambda *a, **k: None)
    argv = ["--labels", "0.3,0.1", "--grid", "20,40", "--methods", "harmony", "--seeds", "3",
            "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "budget.md")]  # fmt: skip
    budget_study.main(argv)
    assert totals == {len(calls)} and len(calls) == 2 * (2 + 3)
    assert study_progress._active == []  # closed with the study


@pytest.mark.parametrize(
    "argv",
    [
        ["--sweeps", "headline,labels", "--seeds", "2"],
        ["--seeds", "2", "--ablations", "mmbind_no_pseudo", "--ablation-seeds", "3"],
        ["--seeds", "3", "--ablations", "mmbind_no_pseudo", "--ablation-seeds", "1"],
    ],
)
def test_the_mmbind_studys_run_count_is_the_runs_it_asks_for(argv, monkeypatch, tmp_path):
    from simulations import mmbind_study, study_progress

    runs, totals = [], set()

    def fake_run_point(args, extra, sweep, label, overrides, rows, seeds, table, on_run=None):
        runs.extend((sweep, label, row, seed) for seed in seeds for row in rows)
        totals.add(study_progress._active[-1].total)

    monkeypatch.setattr(mmbind_study, "run_point", fake_run_point)
    mmbind_study.main([*argv, "--out", str(tmp_path), "--doc", str(tmp_path / "r.md")])
    assert totals == {len(runs)} and len(set(runs)) == len(runs) > 0
