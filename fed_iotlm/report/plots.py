"""The report's figures (matplotlib, Agg backend), each written atomically as a PNG.

Heatmaps rather than grouped bars for per-node / per-site / per-modality accuracy: a
study has tens of groups, and a labelled grid stays readable where 60 bars per
category do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fed_iotlm.atomic import atomic_write  # noqa: E402

History = Sequence[tuple[int, float]]


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(ax: plt.Axes, entries: int) -> None:
    """Outside the panel, to its right: a study's legends are long and would hide lines."""
    ax.legend(fontsize=6.5 if entries > 6 else 7.5, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)  # fmt: skip


def _grid(n: int, labels: Sequence[str], height: float = 3.4) -> tuple[plt.Figure, np.ndarray]:
    """Panels 5.5 inches wide plus room for the longest legend entry on their right."""
    width = 5.5 + 0.06 * max(map(len, labels), default=0)
    cols = min(2, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def rounds_plot(facets: Mapping[str, Mapping[str, Sequence[History]]], path: Path) -> None:
    """Accuracy per round: one panel per method, each run a thin line in its group's
    colour and the group's mean over runs a thick one (the legend names groups)."""
    fig, axes = _grid(len(facets), [f"{g} (n=99)" for gs in facets.values() for g in gs])
    for ax, (title, groups) in zip(axes.flat, facets.items(), strict=False):
        for color, (label, runs) in zip(_colors(len(groups)), groups.items(), strict=True):
            for h in runs:
                ax.plot(*zip(*h, strict=True), color=color, alpha=0.3, lw=0.8)
            rounds = sorted({r for h in runs for r, _ in h})
            mean = [np.mean([a for h in runs for r2, a in h if r2 == r]) for r in rounds]
            # a one-round run (local-only training, one long round) is a point, not a line:
            # without a marker it would not show at all
            marker = "o" if len(rounds) == 1 else None
            ax.plot(
                rounds, mean, color=color, lw=2, marker=marker, label=f"{label} (n={len(runs)})"
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        _legend(ax, len(groups))
    _save(fig, path)


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: np.ndarray,
    path: Path,
    *,
    title: str,
    xlabel: str,
) -> None:
    """A rows × cols grid of accuracies on a fixed 0-1 colour scale, each cell labelled."""
    fig, ax = plt.subplots(
        figsize=(
            max(4.5, 1.6 + 0.75 * len(cols) + 0.07 * max(map(len, rows))),
            1.3 + 0.32 * len(rows),
        )  # fmt: skip
    )
    im = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                    color="black" if v > 0.6 else "white")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    _save(fig, path)


def sweep_plot(
    panels: Mapping[str, Mapping[str, tuple[list[float], list[float], list[float]]]],
    path: Path,
) -> None:
    """Accuracy against each swept numeric param: one line per group of the other knobs,
    mean ± std over seeds as error bars."""
    fig, axes = _grid(len(panels), [g for lines in panels.values() for g in lines])
    for ax, (param, lines) in zip(axes.flat, panels.items(), strict=False):
        for color, (label, (xs, ys, es)) in zip(_colors(len(lines)), lines.items(), strict=True):
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, color=color, label=label)
        ax.set_xlabel(param)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        _legend(ax, len(lines))
    _save(fig, path)


def comm_plot(
    labels: Sequence[str], up: Sequence[float], down: Sequence[float], path: Path
) -> None:
    """kB sent up and down per node and round, one pair of bars per group."""
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(6.5 + 0.05 * max(map(len, labels)), 1.2 + 0.35 * len(labels)))
    ax.barh(y - 0.2, up, height=0.4, label="up (node → server)")
    ax.barh(y + 0.2, down, height=0.4, label="down (server → node)")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("kB per node per round")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path)
