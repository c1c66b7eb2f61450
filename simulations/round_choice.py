"""What choosing the round on validation would have reported, read from finished runs.

Why: runs made before ``select_round=best_val`` existed report their last round's model,
and under strong label skew (HAPT at Dirichlet alpha=0.1) that figure swings 10+ points
between neighbouring rounds.  Their results.json history already holds every round's
test and validation accuracy (per round, the global model on the server's reference
sets), so the round validation would pick can be read back without re-running: the
first round with the best validation score (``val_f1_macro`` where the run recorded it,
else ``val_accuracy``: older runs recorded accuracy only), and the test accuracy of that
round beside the last round's.  The choice reads validation only; the test column is
looked up at the chosen round, never compared across rounds.

    python -m simulations.round_choice RUN_DIR [RUN_DIR ...]

prints one JSON line per group of runs (method, as the report labels it, and partition
point), with the mean and standard deviation over its seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from fed_iotlm.selection import SCORE, BestRound

FALLBACK = "val_accuracy"  # what runs made before select_round recorded per round


def chosen_round(history: list[dict]) -> tuple[dict, str]:
    """The first round with the best validation score, and the key it was scored by."""
    key = SCORE if history and all(SCORE in h for h in history) else FALLBACK
    missing = [h.get("round") for h in history if key not in h]
    if not history or missing:
        raise ValueError(f"no per-round {key} to choose on (rounds {missing or 'none'})")
    best: BestRound[dict] = BestRound()  # the rule select_round=best_val runs by
    for h in history:
        best.offer(h["round"], h[key], lambda h=h: h)
    return best.chosen()[1], key


def method_label(res: dict) -> str:
    """The method as the study tables name it (MMBind without binding is SSL + spine)."""
    binding = res.get("config", {}).get("binding", {})
    if res["method"] == "mmbind" and binding.get("bind") is False:
        return "ssl_spine"
    return res["method"]


def point_of(res: dict) -> str:
    """The partition point a run belongs to (Dirichlet alpha, missing-modality rate)."""
    partition = res.get("config", {}).get("partition", {})
    parts = [f"{k}={partition[k]}" for k in ("alpha", "missing_rate") if k in partition]
    return " ".join(parts)


def run_row(path: Path) -> dict:
    """One finished run: the last round's and the validation-chosen round's test accuracy."""
    res = json.loads(path.read_text())
    history = res.get("history") or []
    try:
        row, key = chosen_round(history)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return {
        "method": method_label(res), "point": point_of(res), "seed": res.get("seed"),
        "chosen_by": key, "chosen_round": row["round"], "rounds": history[-1]["round"],
        "last_accuracy": history[-1]["accuracy"], "chosen_accuracy": row["accuracy"],
    }  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (method, point)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["point"])].append(r)

    def mean_std(values: list[float]) -> list[float]:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return [round(statistics.fmean(values), 4), round(sd, 4)]

    return [
        {"method": m, "point": p, "seeds": sorted(r["seed"] for r in rs),
         "chosen_by": sorted({r["chosen_by"] for r in rs}),
         "last_accuracy": mean_std([r["last_accuracy"] for r in rs]),
         "chosen_accuracy": mean_std([r["chosen_accuracy"] for r in rs]),
         "chosen_rounds": [r["chosen_round"] for r in sorted(rs, key=lambda r: r["seed"])]}
        for (m, p), rs in sorted(groups.items())
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.round_choice", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="study --out folders or run folders")
    args = parser.parse_args(argv)
    paths = []
    for d in args.dirs:
        if not d.is_dir():
            parser.error(f"{d}: not a folder")
        paths += [d / "results.json"] if (d / "results.json").is_file() else []
        paths += sorted(d.glob("*/results.json"))
    if not paths:
        parser.error(f"no results.json in {', '.join(map(str, args.dirs))}")
    for group in summarise([run_row(p) for p in paths]):
        print(json.dumps(group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
