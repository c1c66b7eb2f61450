"""Which task a question asks about, read from its words.

The gated adapter keeps one set of learned queries per task; a question has to reach the
set of the task it is about.  The first version used the example's *first* task for a
whole dialog (so a follow-up about another task got the wrong set) and a "general" slot,
never trained by classification, for ``fed-iotlm ask``.  Now every sequence is routed by
its last question, the one being answered, the same way in training, evaluation and
``ask``: the task whose name (or title, meta.json ``tasks.<t>.title``: what the stage's
questions call it) is in the question wins, else the task with the most class
names in it; ties go to the earlier task.  A question naming nothing goes to the
example's own task if it has one, else to the first task, with a logged notice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fed_iotlm.data.modalities import find_name, name_key  # as class names are matched

log = logging.getLogger(__name__)


def _mentions(text: str, name: str) -> bool:
    return find_name(text, name) is not None


class TaskRouter:
    """Keyword routing over ``tasks`` (names, in the adapter's slot order), their
    ``classes`` (from the dataset's meta; a task without an entry is matched by name) and
    their ``titles`` (a task without one: its name only)."""

    def __init__(
        self,
        tasks: Sequence[str],
        classes: Mapping[str, Sequence[str]] | None = None,
        titles: Mapping[str, str] | None = None,
    ):
        if not tasks:
            raise ValueError("task routing needs at least one task")
        self.tasks = list(tasks)
        self.classes = {t: list((classes or {}).get(t, ())) for t in self.tasks}
        self.names = {t: [t, *([titles[t]] if titles and titles.get(t) else [])] for t in tasks}
        self.unrouted = 0  # questions that named no task (sent to the first task)

    def scores(self, question: str) -> list[tuple[int, int]]:
        """Per task: (its name or title mentioned, number of its class names mentioned)."""
        text = name_key(question)
        return [
            (
                int(any(_mentions(text, n) for n in self.names[t])),
                sum(_mentions(text, c) for c in self.classes[t]),
            )
            for t in self.tasks
        ]

    def route(self, question: str, default: str | None = None) -> int:
        """The slot of the task ``question`` asks about (see the module docstring)."""
        scores = self.scores(question)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        if scores[best] != (0, 0):
            return best
        if default in self.tasks:
            return self.tasks.index(default)
        # one notice per router: a held-out task's questions (llm.fewshot.task) name
        # none of the tuned tasks by design, and a line per question buried the log
        self.unrouted += 1
        if self.unrouted == 1:
            log.warning(
                "task routing: %r names none of the tasks %s or their classes; "
                "using the first task's adapter queries (%s); further such questions "
                "are routed the same way without a notice (counted in .unrouted)",
                question, self.tasks, self.tasks[0],
            )  # fmt: skip
        return 0
