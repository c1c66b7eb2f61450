"""Progress a user can watch: the round and tuning-step lines parsed back out of a log,
a follower that reads a child run's log as it grows, and a rich bar for a terminal.

Why parse the log lines rather than have children report progress some other way: the
studies run each (point, method, seed) as a subprocess whose console goes to its
``run.log``, and that log is already the record of the run (round lines with their ETA,
the LM stage's step lines); following it needs no change to the children and keeps the
log complete.  The same :class:`Bars` draws the in-run bars (rounds, tuning steps) and
the study's bars, so there is one place that decides terminal versus plain output.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

# "round   3/20  accuracy 0.500  loss 1.234 ... (12s, ETA 51s)" (fed_iotlm.tracking)
_ROUND = re.compile(r"\bround\s+(\d+)/(\d+|\?)\s.*\(\d+s(?:, ETA (\d+)s)?\)")
# "  prefix step 10: loss 1.234 (ETA 317s)" (fed_iotlm.llm.stage); no total on the line
_STEP = re.compile(r"\b(\w+) step (\d+): loss \S+ \(ETA (\d+)s\)")


@dataclass(frozen=True)
class Mark:
    """One progress line read back: ``kind`` is ``round`` or ``<conditioning> step``;
    ``total`` is None where the line does not say it (step lines, ``rounds`` unset)."""

    kind: str
    done: int
    total: int | None
    eta_s: float | None
    line: str  # from "round"/"<kind> step" on (the logger's prefix dropped)


def parse_line(line: str) -> Mark | None:
    """The progress a log line reports, or None for any other line."""
    text = line.strip()
    if m := _ROUND.search(text):
        total = int(m[2]) if m[2] != "?" else None
        eta = float(m[3]) if m[3] else None
        return Mark("round", int(m[1]), total, eta, text[m.start() :])
    if m := _STEP.search(text):
        return Mark(f"{m[1]} step", int(m[2]), None, float(m[3]), text[m.start() :])
    return None


class LogFollower:
    """Reads the lines appended to ``path`` since the last :meth:`poll` and hands each
    progress line to ``on_mark``; a line still being written (no newline yet) waits for
    the next poll.  The file may not exist yet (the child has not started writing)."""

    def __init__(self, path: Path, on_mark: Callable[[Mark], None]) -> None:
        self.path = Path(path)
        self.on_mark = on_mark
        self._offset = 0
        self._partial = b""

    def poll(self) -> int:
        """Handle what was appended; returns how many progress lines it found."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return 0
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        found = 0
        for raw in lines:
            if mark := parse_line(raw.decode("utf-8", errors="replace")):
                found += 1
                self.on_mark(mark)
        return found


def fmt_eta(eta_s: float | None) -> str:
    """``ETA 51s`` / ``ETA 3m05s``, or empty when unknown."""
    if eta_s is None:
        return ""
    minutes, seconds = divmod(int(round(eta_s)), 60)
    return f"ETA {minutes}m{seconds:02d}s" if minutes else f"ETA {seconds}s"


class Bars:
    """Rich progress bars when ``console`` is a terminal (and ``enabled``: one rank of
    several draws), nothing otherwise (the caller's plain lines are the record then: no
    carriage returns in a pipe, CI log or file).

    Drawn without a refresh thread (``auto_refresh=False``: redrawn at each update, so
    nothing runs after the caller stops updating) and transient (the bars vanish when
    closed; the log lines printed meanwhile stay)."""

    def __init__(self, console: Console | None = None, *, enabled: bool = True) -> None:
        self.console = console or Console(highlight=False)
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._swapped: list[tuple[logging.StreamHandler, object]] = []
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                console=self.console,
                transient=True,
                auto_refresh=False,
                # stderr sent to a file (2> log) stays there; on the screen it prints above
                redirect_stderr=_isatty(sys.stderr),
            )
            out, err = sys.stdout, sys.stderr
            self._progress.start()  # redirects sys.stdout and sys.stderr above the bars
            moved = {id(old): new for old, new in ((out, sys.stdout), (err, sys.stderr))}
            self._swapped = _follow_redirect(
                {k: v for k, v in moved.items() if k != id(v)}  # only what was redirected
            )
            atexit.register(self.close)  # a run that dies gets its cursor and streams back

    def add(self, label: str, total: int | None) -> TaskID | None:
        """A new bar (``total`` None: an indeterminate one); None when not live."""
        if self._progress is None:
            return None
        return self._progress.add_task(label, total=total, note="")

    def update(self, task: TaskID | None, done: int, *, total: int | None = None,
               eta_s: float | None = None, note: str = "") -> None:  # fmt: skip
        """Move ``task`` to ``done`` (of ``total`` when given) with ``note`` and the ETA."""
        if self._progress is None or task is None:
            return
        text = "  ".join(x for x in (note, fmt_eta(eta_s)) if x)
        fields = {"total": total} if total is not None else {}
        self._progress.update(task, completed=done, note=text, **fields)
        self._progress.refresh()

    def replace(self, task: TaskID | None, label: str, total: int | None) -> TaskID | None:
        """``task`` (if any) taken off and a new bar put in its place."""
        if self._progress is None:
            return None
        if task is not None:
            self._progress.remove_task(task)
        return self.add(label, total)

    def close(self) -> None:
        """Take the bars off the screen (idempotent)."""
        if self._progress is not None:
            atexit.unregister(self.close)
            for handler, stream in self._swapped:
                handler.setStream(stream)
            self._swapped = []
            self._progress.stop()
            self._progress = None


def _isatty(stream: object) -> bool:
    """Whether ``stream`` is a terminal (False for one without ``isatty``)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _follow_redirect(moved: dict[int, object]) -> list[tuple[logging.StreamHandler, object]]:
    """Point every console log handler that wrote to the old stdout/stderr (ids in
    ``moved``) at the redirected stream; returns (handler, old stream) to restore.

    Why: a handler keeps the stream it was made with, so without this its lines (ours,
    and Flower's own console handler) would be written into the bar's line and leave a
    torn copy of the bar behind; through the redirect they print above the bars.  A
    handler whose stream is a property already follows ``sys.stderr`` (logging's own
    last-resort handler) and is left alone."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    swapped = []
    for lg in loggers:
        for handler in getattr(lg, "handlers", []):
            follows = isinstance(getattr(type(handler), "stream", None), property)
            if (
                isinstance(handler, logging.StreamHandler)
                and not follows
                and id(handler.stream) in moved
            ):
                swapped.append((handler, handler.setStream(moved[id(handler.stream)])))
    return swapped
