"""Leaderboard figures (matplotlib, PNG and SVG), one set per scenario and setting.

- R heatmaps: the mean accuracy matrix of each strategy.
- Accuracy curves: each task's accuracy across the sequence, a panel per strategy.
- Stability vs plasticity: learning accuracy (LA) against forgetting (FM), with 95% CIs.
- Cost vs ACC: train seconds, peak RSS and GFLOPs against ACC, with the Pareto front.
- Learning vs forgetting (language models): the downstream perplexity reached against the
  increase in the source's log-perplexity, with 95% CIs.

A strategy keeps its colour in every figure (colours follow the sorted list of all labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cfbench.formats import blocks, file_stem, one_line
from cfbench.leaderboard import GROUP, configuration
from cfbench.records import RunRecord

if TYPE_CHECKING:
    import pandas as pd

PAPER = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.dpi": 150, "savefig.dpi": 150}


def colours(labels: Sequence[str]) -> dict[str, tuple]:
    import matplotlib

    names = sorted(set(labels))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def mean_R(records: Sequence[RunRecord]) -> dict[tuple, np.ndarray]:
    """Mean R over seeds per configuration (the leaderboard's GROUP columns, in order)."""
    grouped: dict[tuple, list] = {}
    for r in records:
        if r.status == "ok":
            key = tuple(configuration(r).values())
            grouped.setdefault(key, []).append(np.asarray(r.R))
    return {k: 100 * np.mean(v, axis=0) for k, v in grouped.items()}


def _plain(text: str) -> str:
    """Text from a record as matplotlib shows it literally (a '$' would start mathtext)."""
    return one_line(text).replace("$", r"\$")


def _save(fig, out_dir: Path, stem: str) -> Path:
    png = out_dir / f"{stem}.png"
    fig.savefig(png, bbox_inches="tight")
    fig.savefig(out_dir / f"{stem}.svg", bbox_inches="tight")
    return png


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def _heatmaps(block: pd.DataFrame, Rs: dict[tuple, np.ndarray], title: str):
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(block))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.6, 2.4 * rows + 0.4),
                             squeeze=False, layout="constrained")
    for k, (ax, (_, row)) in enumerate(zip(axes.flat, block.iterrows(), strict=False)):
        R = Rs[tuple(row[k] for k in GROUP)]
        image = ax.imshow(R, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        T = R.shape[1]
        if T <= 10:
            for (t, i), v in np.ndenumerate(R):
                ax.text(i, t, f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 60 else "black")
        ax.set_xticks(range(T), [str(i + 1) for i in range(T)])
        ax.set_yticks(range(T + 1), [str(t) for t in range(T + 1)])
        ax.set_xlabel("task evaluated")
        if k % cols == 0:
            ax.set_ylabel("after training task")
        ax.set_title(row["label"])
    for ax in axes.flat[len(block):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy %")
    fig.suptitle(title)
    return fig


def _curves(block: pd.DataFrame, Rs: dict[tuple, np.ndarray], title: str):
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(block))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), squeeze=False,
                             sharey=True)
    task_colours = plt.get_cmap("viridis")
    for ax, (_, row) in zip(axes.flat, block.iterrows(), strict=False):
        R = Rs[tuple(row[k] for k in GROUP)]
        T = R.shape[1]
        for i in range(T):
            ax.plot(range(T + 1), R[:, i], marker=".", lw=1,
                    color=task_colours(i / max(T - 1, 1)), label=f"task {i + 1}")
        ax.set_title(row["label"])
        ax.set_xlabel("after training task")
        ax.set_xticks(range(T + 1))
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy %")
    for ax in axes.flat[len(block):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 10),
               bbox_to_anchor=(0.5, -0.02), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _tradeoff(points: Sequence[tuple[str, float, float, float, float]],
              palette: dict[str, tuple], title: str, xlabel: str, ylabel: str):
    """One point per strategy, (label, x, y, x CI, y CI), with its error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.0))
    for label, x, y, x_ci, y_ci in points:
        ax.errorbar(x, y, xerr=_err(x_ci), yerr=_err(y_ci), fmt="o", ms=5, capsize=2,
                    color=palette[label], label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    # Beside the axes, not on them: with tens of strategies a legend inside hides the points.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title(title)
    return fig


def _stability(block: pd.DataFrame, palette: dict[str, tuple], title: str):
    points = [(r["label"], r["la"], r["fm"], r["la ci"], r["fm ci"]) for _, r in block.iterrows()]
    return _tradeoff(points, palette, title, "plasticity: learning accuracy LA %",
                     "forgetting FM % (lower is more stable)")


def _learning_forgetting(block: pd.DataFrame, palette: dict[str, tuple], title: str):
    points = [(r["label"], r["target_ppl_after"], r["source_logppl_increase"],
               r["target_ppl_after ci"], r["source_logppl_increase ci"])
              for _, r in block.iterrows()]
    fig = _tradeoff(points, palette, title,
                    "learned: downstream perplexity after (lower: better)",
                    "forgotten: source Δ log-perplexity, nats")
    ax = fig.axes[0]
    ax.set_xscale("log")
    ax.axhline(0, color="0.5", lw=0.8)
    return fig


def _err(ci: float) -> float | None:
    return None if ci != ci else ci


COST_AXES = [("train_seconds", "train seconds"), ("peak_rss_mb", "peak RSS MB"),
             ("train_gflops", "training GFLOPs")]


def pareto_front(costs: Sequence[float], accs: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both lower cost and higher accuracy,
    ordered by cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accs[i]))
    front, best = [], -np.inf
    for i in order:
        if accs[i] > best:
            front.append(i)
            best = accs[i]
    return front


def _cost(block: pd.DataFrame, palette: dict[str, tuple], title: str):
    import matplotlib.pyplot as plt

    axes_spec = [a for a in COST_AXES if block[a[0]].notna().any()]
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(2.7 * len(axes_spec), 2.6),
                             sharey=True, squeeze=False)
    for ax, (column, name) in zip(axes[0], axes_spec, strict=True):
        points = block[block[column].notna()]
        for _, row in points.iterrows():
            ax.errorbar(row[column], row["acc"], xerr=_err(row[f"{column} ci"]),
                        yerr=_err(row["acc ci"]), fmt="o", ms=5, capsize=2,
                        color=palette[row["label"]], label=row["label"])
        front = pareto_front(list(points[column]), list(points["acc"]))
        ax.plot(points[column].iloc[front], points["acc"].iloc[front], "--", lw=1,
                color="0.4", drawstyle="steps-post", label="Pareto front")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("ACC %")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_all(records: Sequence[RunRecord], summary: pd.DataFrame, out_dir: Path
             ) -> dict[tuple[str, str], list[Path]]:
    """Write every figure for every (scenario, setting); returns the PNG paths per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    Rs = mean_R(records)
    written: dict[tuple[str, str], list[Path]] = {}
    with plt.rc_context(PAPER):
        all_blocks = [(scenario, setting, block.assign(label=block["label"].map(_plain)))
                      for scenario, setting, block in blocks(summary)]
        palette = colours([label for *_, b in all_blocks for label in b["label"]])
        for scenario, setting, block in all_blocks:
            title = _plain(f"{scenario}, {setting} setting")
            stem = file_stem(scenario, setting)
            figures = {"R": _heatmaps(block, Rs, title), "curves": _curves(block, Rs, title),
                       "stability": _stability(block, palette, title)}
            if block[[c for c, _ in COST_AXES]].notna().any().any():
                figures["cost"] = _cost(block, palette, title)
            if block["source_ppl_after"].notna().any():
                figures["learning-forgetting"] = _learning_forgetting(block, palette, title)
            written[scenario, setting] = [_save(fig, out_dir, f"{stem}-{kind}")
                                          for kind, fig in figures.items()]
            for fig in figures.values():
                plt.close(fig)
    return written
