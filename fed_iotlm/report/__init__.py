"""``fed-iotlm report``: one readable page (Markdown and/or HTML, with PNG plots) from the
runs of one MLflow experiment.

``runs`` reads the experiment through MLflow's client API; ``params`` works out which
params distinguish the runs and how to name groups of them; ``sections`` turns runs into
tables and figure specs, one builder per section; ``plots`` draws the figures with
matplotlib; ``render`` writes the page with jinja2.  ``build`` ties them together.
``study_table`` is the one renderer of the studies' tables (``simulations/*_study.py``
pages and ``fed-iotlm report --study``): mean ± std [95 % interval] over seeds, one code
version per table.
"""

from __future__ import annotations

from .build import build_report
from .runs import ReportError

__all__ = ["ReportError", "build_report"]
