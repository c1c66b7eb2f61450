"""An experiment's runs arranged for the report: what varies, and groups of seeds.

Groups are ordered best first (mean final accuracy), so every table built from them is
sorted the way a reader scans it: the strongest configuration on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from .page import mean_or_none
from .params import Namer, group_keys, group_label, varying_params
from .runs import Run


@dataclass
class Study:
    experiment: str
    tracking_uri: str
    runs: list[Run]
    skipped: list[str]
    varying: list[str]  # params that differ between runs (method first, seed last)
    keys: list[str]  # the ones that define a group (no seed, no redundant key)
    namer: Namer
    groups: dict[str, list[Run]]  # label -> runs, best mean accuracy first

    @classmethod
    def of(cls, experiment: str, tracking_uri: str, runs: list[Run], skipped: list[str]) -> Study:
        params = [r.params for r in runs]
        varying = varying_params(params)
        keys = group_keys(params, varying)
        namer = Namer.for_runs(params, varying)
        groups: dict[str, list[Run]] = {}
        for run in runs:
            groups.setdefault(group_label(run.params, keys, namer), []).append(run)
        for members in groups.values():
            members.sort(key=lambda r: (r.params.get("seed", ""), r.name))
        order = sorted(groups, key=lambda g: -(mean_or_none([r.accuracy for r in groups[g]]) or -1))
        return cls(experiment, tracking_uri, runs, skipped, varying, keys, namer,
                   {g: groups[g] for g in order})  # fmt: skip

    def group_of(self, run: Run) -> str:
        return group_label(run.params, self.keys, self.namer)

    def method(self, run: Run) -> str:
        return run.params.get("method", "?")

    def results(self) -> list[Run]:
        """Runs whose results.json was read."""
        return [r for r in self.runs if r.results is not None]
