"""Which params tell an experiment's runs apart, and how to name groups of runs.

A study varies a few knobs (method, seed, a severity, a label fraction) among ~100
logged params; the report shows only those.  Runs that differ only in seed form a
group (one line of a table, mean ± std).  A key the run's method overrides shows the value
the method used (:func:`effective_params`).  Params that are absent from some runs and
constant in the rest are config keys added after those runs were made, not a sweep.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fed_iotlm.config_schema import METHOD_FORCES

# Params that differ between runs without being a knob of the experiment.
EXCLUDED = {"output_dir", "plan", "resume", "llm.bundle"}  # plan: drawn from partition.*
EXCLUDED_PREFIXES = ("mlflow.", "hydra.", "simulation.")
LONG = 40  # values longer than this are shown by an alias (#1, #2 ...) with a legend
MISSING = "–"
GENERIC = {"enabled", "name", "kind", "scheme", "rule"}  # say nothing without their parent


def expand_params(params: Mapping[str, str]) -> dict[str, str]:
    """Params as logged, with lists of dicts (MLflow logs ``shift`` as one string)
    expanded to indexed keys, so ``shift.0.severity`` is a param a sweep can be over."""
    out: dict[str, str] = {}
    for key, value in params.items():
        parsed = _literal(value)
        if isinstance(parsed, list) and any(isinstance(v, dict) for v in parsed):
            out.update(_flatten(parsed, key))
        else:
            out[key] = value
    return out


def effective_params(params: Mapping[str, str]) -> dict[str, str]:
    """``params`` with each key the run's method overrides set to what the method built
    (``model.fusion=late`` for ``method=harmony``, whatever was configured), so a group is
    labelled by the model that ran, not by a config key the method ignored.  A key the
    run did not log stays absent (runs made before the key existed)."""
    out = dict(params)
    for key, value in METHOD_FORCES.get(params.get("method", ""), {}).items():
        if key in out:
            out[key] = value
    return out


def _literal(value: str) -> Any:
    if not value or value[0] not in "[{":
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):  # truncated at 500 characters, or not Python
        return None


def _flatten(value: Any, prefix: str) -> dict[str, str]:
    if isinstance(value, dict):
        pairs: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        pairs = enumerate(value)
    else:
        return {prefix: str(value)}
    out: dict[str, str] = {}
    for k, v in pairs:
        out.update(_flatten(v, f"{prefix}.{k}"))
    return out


def excluded(key: str) -> bool:
    return key in EXCLUDED or key.startswith(EXCLUDED_PREFIXES + tuple(f"{k}." for k in EXCLUDED))


def varying_params(params: Sequence[Mapping[str, str]]) -> list[str]:
    """Keys with two or more distinct logged values: ``method`` first, ``seed`` last."""
    keys = sorted({k for p in params for k in p if not excluded(k)})
    out = [k for k in keys if len({p[k] for p in params if k in p}) > 1]
    head = [k for k in ("method",) if k in out]
    tail = [k for k in ("seed",) if k in out]
    return head + [k for k in out if k not in ("method", "seed")] + tail


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last dotted part where that is unique among ``keys`` and says something
    alone (``site_shift`` for ``data.site_shift``; ``personal.enabled`` stays), else the
    full key; legends stay readable."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {
        k: s if last.count(s) == 1 and s not in GENERIC else k
        for k, s in zip(keys, last, strict=True)
    }


@dataclass
class Namer:
    """Display strings for param values: long values (a partition plan) become ``#1``..."""

    aliases: dict[tuple[str, str], str]

    @classmethod
    def for_runs(cls, params: Sequence[Mapping[str, str]], keys: Sequence[str]) -> Namer:
        aliases: dict[tuple[str, str], str] = {}
        for key in keys:
            values = sorted({p[key] for p in params if len(p.get(key, "")) > LONG})
            for i, value in enumerate(values, 1):
                aliases[(key, value)] = f"#{i}"
        return cls(aliases)

    def show(self, key: str, value: str | None) -> str:
        if value is None:
            return MISSING
        return self.aliases.get((key, value), value)

    def legend(self) -> list[str]:
        """``partition.plan #1 = [[...]]`` lines for the page, one per alias."""
        return [f"{k} {a} = {v}" for (k, v), a in self.aliases.items()]


def partition_of(params: Sequence[Mapping[str, str]], key: str) -> tuple[frozenset[int], ...]:
    """How ``key``'s values split the runs (indices), whatever the values are."""
    by_value: dict[str | None, set[int]] = {}
    for i, p in enumerate(params):
        by_value.setdefault(p.get(key), set()).add(i)
    return tuple(sorted((frozenset(s) for s in by_value.values()), key=min))


def group_keys(params: Sequence[Mapping[str, str]], varying: Sequence[str]) -> list[str]:
    """The varying keys that define a group (all but ``seed``), dropping a key that splits
    the runs exactly as an earlier one does (``model.fusion`` when it follows ``method``)."""
    out: list[str] = []
    seen: set[tuple[frozenset[int], ...]] = set()
    for key in varying:
        if key == "seed":
            continue
        partition = partition_of(params, key)
        if partition not in seen:
            seen.add(partition)
            out.append(key)
    return out


def distinguishing(keys: Sequence[str], params: Sequence[Mapping[str, str]]) -> list[str]:
    """The fewest of ``keys`` (greedy, in order) that tell apart everything all ``keys``
    tell apart among ``params``: a plot's legend names only those (``mmbind``, not
    ``mmbind · fusion=late`` when fusion follows the method in that plot)."""

    def count(ks: list[str]) -> int:
        return len({tuple(p.get(k) for k in ks) for p in params})

    chosen: list[str] = []
    for key in keys:
        if count([*chosen, key]) > count(chosen):
            chosen.append(key)
    return chosen


def group_label(
    params: Mapping[str, str], keys: Sequence[str], namer: Namer, *, skip: Iterable[str] = ()
) -> str:
    """``mmbind · site_shift=0.3 · plan=#1``: the method bare, other keys as key=value."""
    short = short_keys(list(keys))
    skip = set(skip)
    parts = []
    for key in keys:
        if key in skip:
            continue
        value = namer.show(key, params.get(key))
        parts.append(value if key == "method" else f"{short[key]}={value}")
    return " · ".join(parts) or "all runs"
