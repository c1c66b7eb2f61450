"""What a study shows while its child runs go: which run (k of n), the child's latest
round or tuning-step line with its ETA, and how many runs are done.

Why: each child's console goes to its ``run.log`` (the record of the run), so without
this a study is silent for the ten minutes or more a run takes.  The child is not
changed: its log is followed as it grows (:class:`fed_iotlm.progress.LogFollower`).
On a terminal the view is two rich bars; anywhere else (CI, a pipe, ``> file``) it is
plain lines, one per new progress line of the child, with no carriage returns.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from fed_iotlm.progress import Bars, LogFollower, Mark, fmt_eta

# how often a running child's log is read (seconds); only the display waits on it
POLL_S = 0.5


class StudyProgress:
    """The runs of one study: ``total`` of them when the study knows (None: counted as
    they come).  :meth:`begin` / :meth:`mark` / :meth:`end` per run."""

    def __init__(self, total: int | None, console: Console | None = None) -> None:
        self.total = total
        self.console = console or Console(highlight=False)
        self.bars = Bars(self.console)
        self.started = self.done = 0
        self.name = ""
        self._overall = self.bars.add("runs done", total)
        self._run = None
        self._kind = ""

    def _which(self) -> str:
        return f"run {self.started}/{self.total}" if self.total else f"run {self.started}"

    def begin(self, name: str) -> None:
        """Run ``name`` starts (a child is about to be launched)."""
        self.started += 1
        self.name, self._kind = name, ""
        self._run = self.bars.replace(self._run, f"{self._which()} {name}", None)

    def mark(self, mark: Mark) -> None:
        """The running child wrote a progress line."""
        if not self.bars.live:
            eta = fmt_eta(mark.eta_s)
            tail = f"  [{eta}]" if eta and "ETA" not in mark.line else ""
            self.console.print(f"  {self._which()} {self.name}: {mark.line}{tail}", soft_wrap=True)
            return
        if mark.kind != self._kind:  # rounds, then (LM stage) steps: a bar of its own
            self._kind = mark.kind
            label = f"{self._which()} {self.name} {mark.kind}s"
            self._run = self.bars.replace(self._run, label, mark.total)
        # the child's latest line, its ETA included (cut: a step line lists every layer)
        line = mark.line if len(mark.line) <= 90 else mark.line[:87] + "..."
        self.bars.update(self._run, mark.done, total=mark.total, note=line)

    def end(self, *, cached: bool = False) -> None:
        """A run is done (``cached``: its results were already there; it is not begun)."""
        if cached:
            self.started += 1
        self.done += 1
        self.bars.update(self._overall, self.done, total=self.total)

    def close(self) -> None:
        self.bars.close()


_active: list[StudyProgress] = []


@contextmanager
def study_progress(total: int | None) -> Iterator[StudyProgress]:
    """While the block runs, :func:`simulations.study_runner.run_one` reports its runs
    as ``k of total`` with a ``runs done`` bar."""
    view = StudyProgress(total)
    _active.append(view)
    try:
        yield view
    finally:
        _active.remove(view)
        view.close()


@contextmanager
def current() -> Iterator[StudyProgress]:
    """The open study's view, or one for this run alone (a study that set no total)."""
    if _active:
        yield _active[-1]
        return
    with study_progress(None) as view:
        yield view


def follow_child(cmd: list[str], log: Path, on_mark: Callable[[Mark], None], *,
                 cwd: Path | None = None, poll_s: float = POLL_S) -> int:  # fmt: skip
    """Run ``cmd`` with its stdout and stderr written to ``log`` (whole, as before),
    handing each progress line to ``on_mark`` while it runs; returns its exit code.
    Interrupted (Ctrl-C), the child is killed rather than left running."""
    follower = LogFollower(log, on_mark)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    code = proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    follower.poll()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    follower.poll()  # what it wrote last
    return code
