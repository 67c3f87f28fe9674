"""The package's one matplotlib entry point (headless): new figures, atomic PNG saving, shared chart types."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fairforget.artifacts import atomic_path  # noqa: E402


def new_figure(*args, **kwargs):
    """``plt.subplots`` on the headless backend: (figure, axes)."""
    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path | str) -> None:
    """Save a figure atomically as PNG and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def interval_bars(path: Path | str, groups: Sequence[str], series: dict[str, tuple[Sequence[float], Sequence]],
                  title: str, ylabel: str, reference: float | None = None) -> None:
    """Grouped bars with 95% interval whiskers. ``series`` maps a legend name to (values, [low, high] pairs)."""
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(len(series), 1)), 4.0))
    for k, (name, (values, intervals)) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        # a percentile interval may lie beside its estimate (few replicates, skewed statistics): no bar below 0
        low = [max(v - ci[0], 0.0) for v, ci in zip(values, intervals)]
        high = [max(ci[1] - v, 0.0) for v, ci in zip(values, intervals)]
        ax.bar(xs, values, width=width, label=name, yerr=[low, high], capsize=3)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=f"ideal ({reference:g})")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def layer_head_panel(fig, ax, matrix, title: str, cmap: str = "viridis", vmin: float | None = None,
                     vmax: float | None = None, fontsize: int = 8) -> None:
    """One layer x head heatmap on ``ax`` (layers up, integer head ticks) with its colour bar."""
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("head")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, fraction=0.05)
