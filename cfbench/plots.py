"""Leaderboard figures (matplotlib, PNG and SVG), one set per scenario and setting.

- R heatmaps: the mean accuracy matrix of each strategy.
- Accuracy curves: each task's accuracy across the sequence, a panel per strategy, with the
  spread over seeds as a band.
- Stability vs plasticity: learning accuracy (LA) against forgetting (FM), with 95% CIs.
- Cost vs ACC: train seconds, peak RSS and GFLOPs against ACC, with the Pareto front.
- Learning vs forgetting (language models): the downstream perplexity reached against the
  increase in the source's log-perplexity, with 95% CIs.

Written for boards of tens of strategies: a strategy keeps one style (colour and marker shape)
in every figure of a page, legends sit beside the axes, tasks are named as the records name
them, and percentage axes span at least `MIN_SPAN` points so that a fraction of a point does not
fill the plot. Each figure comes with a caption saying what it shows (`Figure`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cfbench.formats import blocks, file_stem, one_line
from cfbench.leaderboard import GROUP, confidence_halfwidth, configuration
from cfbench.records import RunRecord

if TYPE_CHECKING:
    import matplotlib.figure
    import pandas as pd

PAPER = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.dpi": 150, "savefig.dpi": 150,
         # SVG text stays text: searchable, selectable and read by screen readers.
         "svg.fonttype": "none"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
"""Seven shapes against ten colours: style i is (colour i mod 10, shape i mod 7), so no two of
the first 70 strategies look alike, and two of one colour never share a shape."""
MIN_SPAN = 10.0
"""The least span, in percentage points, of an accuracy or forgetting axis."""
LEGEND_ROWS = 16
"""Legend entries per column beside an axes; more strategies add a column."""


@dataclass(frozen=True)
class Style:
    colour: tuple[float, float, float, float]
    marker: str


@dataclass(frozen=True)
class Figure:
    """A written figure: its PNG (an SVG beside it), a title and what it shows, in words."""

    png: Path
    title: str
    caption: str


def styles(labels: Sequence[str]) -> dict[str, Style]:
    """A style per distinct label, by its place in the sorted labels, so a strategy looks the
    same in every figure drawn from the same labels."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {name: Style(cmap(i % 10), MARKERS[i % len(MARKERS)])
            for i, name in enumerate(sorted(set(labels)))}


@dataclass
class _Seeds:
    """One configuration's R matrices over its seeds, in %, and its tasks' names."""

    R: np.ndarray
    """(seeds, T+1, T)"""
    tasks: list[str]

    @property
    def mean(self) -> np.ndarray:
        return self.R.mean(axis=0)

    @property
    def ci(self) -> np.ndarray:
        """The 95% Student-t half-width per entry; NaN with one seed."""
        n = len(self.R)
        std = self.R.std(axis=0, ddof=1) if n > 1 else np.full(self.R.shape[1:], math.nan)
        return np.vectorize(lambda s: confidence_halfwidth(s, n))(std)


def _by_configuration(records: Sequence[RunRecord]) -> dict[tuple, _Seeds]:
    """The successful runs' R per configuration (the leaderboard's GROUP columns, in order).
    Tasks keep the names their records give them when every seed agrees, else 'task i'."""
    grouped: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.status == "ok":
            grouped.setdefault(tuple(configuration(r).values()), []).append(r)
    out = {}
    for key, runs in grouped.items():
        R = 100 * np.array([r.R for r in runs], dtype=np.float64)
        names = {tuple(_plain(t["name"]) for t in r.tasks) for r in runs}
        tasks = names.pop() if len(names) == 1 else ()
        if len(tasks) != R.shape[2]:
            tasks = tuple(f"task {i + 1}" for i in range(R.shape[2]))
        out[key] = _Seeds(R, list(tasks))
    return out


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


def _task_ticks(axis, names: Sequence[str]) -> None:
    """Tick labels `names` at 0, 1, ..., slanted when they would run into each other."""
    slant = len(names) * max(map(len, names)) > 30
    axis.set_ticks(range(len(names)), names, rotation=40 if slant else 0,
                   ha="right" if slant else "center", rotation_mode="anchor")


def _stages(tasks: Sequence[str]) -> list[str]:
    """R's rows: before any training, then after each task."""
    return ["untrained", *tasks]


def run_figure(record: RunRecord) -> matplotlib.figure.Figure:
    """One run at a glance: R as a heatmap, and each task's accuracy after every task
    trained."""
    from matplotlib.figure import Figure

    R = 100 * np.asarray(record.R, dtype=float)
    T = R.shape[1]
    fig = Figure(figsize=(7.5, 3.0), dpi=100, layout="constrained")
    heat, curves = fig.subplots(1, 2)
    image = heat.imshow(R, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    if T <= 10:
        for (t, i), v in np.ndenumerate(R):
            if math.isfinite(v):
                heat.text(i, t, f"{v:.0f}", ha="center", va="center", fontsize=7,
                          color="white" if v < 60 else "black")
    names = [str(task.get("name") or f"task {i + 1}") for i, task in enumerate(record.tasks)]
    names = names if len(names) == T else [f"task {i + 1}" for i in range(T)]
    heat.set(xlabel="accuracy on", ylabel="after training on", title="R (accuracy %)")
    _task_ticks(heat.xaxis, names)
    heat.set_yticks(range(len(R)), _stages(names))
    fig.colorbar(image, ax=heat)
    for i in range(T):
        curves.plot(range(len(R)), R[:, i], marker=".", lw=1, label=names[i],
                    color=image.cmap(i / max(T - 1, 1)))
    curves.set(xlabel="after training on", ylabel="accuracy %", ylim=(-3, 103),
               title="accuracy on each task")
    _task_ticks(curves.xaxis, _stages(names))
    curves.grid(alpha=0.3)
    if T <= 10:
        curves.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(f"{record.config['scenario']} / {record.config['setting']} / "
                 f"{record.config['strategy']}, seed {record.config['seed']} ({record.run_id})",
                 fontsize=9)
    return fig


def _heatmaps(block: pd.DataFrame, seeds: dict[tuple, _Seeds], title: str):
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(block))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.6, 2.5 * rows + 0.4),
                             squeeze=False, layout="constrained")
    for k, (ax, (_, row)) in enumerate(zip(axes.flat, block.iterrows(), strict=False)):
        runs = seeds[tuple(row[c] for c in GROUP)]
        R = runs.mean
        image = ax.imshow(R, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        if R.shape[1] <= 10:
            for (t, i), v in np.ndenumerate(R):
                ax.text(i, t, f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 60 else "black")
        _task_ticks(ax.xaxis, runs.tasks)
        ax.set_yticks(range(R.shape[0]), _stages(runs.tasks))
        ax.set_xlabel("accuracy on")
        if k % cols == 0:
            ax.set_ylabel("after training on")
        ax.set_title(row["label"])
    for ax in axes.flat[len(block):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy %")
    fig.suptitle(title)
    return fig


def _curves(block: pd.DataFrame, seeds: dict[tuple, _Seeds], title: str):
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(block))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows + 0.5), squeeze=False,
                             sharey=True, layout="constrained")
    task_colours = plt.get_cmap("viridis")
    for ax, (_, row) in zip(axes.flat, block.iterrows(), strict=False):
        runs = seeds[tuple(row[c] for c in GROUP)]
        mean, ci = runs.mean, runs.ci
        T = mean.shape[1]
        stages = np.arange(T + 1)
        for i, task in enumerate(runs.tasks):
            colour = task_colours(i / max(T - 1, 1))
            ax.plot(stages, mean[:, i], marker=".", lw=1, color=colour, label=task)
            if not np.isnan(ci[:, i]).all():
                ax.fill_between(stages, mean[:, i] - ci[:, i], mean[:, i] + ci[:, i],
                                color=colour, alpha=0.2, lw=0)
        ax.set_title(row["label"])
        _task_ticks(ax.xaxis, _stages(runs.tasks))
        ax.set_xlabel("after training on")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy %")
    for ax in axes.flat[len(block):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 10),
               frameon=False, title="accuracy on (band: 95% CI over seeds)")
    fig.suptitle(title)
    return fig


def _span(ax, axis: str, *, include: float | None = None, bounds=(0.0, 100.0)) -> None:
    """Widen an axis in percentage points to span at least MIN_SPAN (and `include`), kept
    within `bounds` where the data allow."""
    get, set_ = getattr(ax, f"get_{axis}lim"), getattr(ax, f"set_{axis}lim")
    lo, hi = get()
    if include is not None:
        lo, hi = min(lo, include), max(hi, include)
    if hi - lo < MIN_SPAN:
        middle = (lo + hi) / 2
        lo, hi = middle - MIN_SPAN / 2, middle + MIN_SPAN / 2
        shift = max(bounds[0] - lo, 0.0) - max(hi - bounds[1], 0.0)
        lo, hi = lo + shift, hi + shift
        pad = 0.03 * MIN_SPAN  # a marker on a bound stays whole
        lo, hi = lo - pad, hi + pad
    set_(lo, hi)


def _legend_beside(fig, ax, handles, names) -> None:
    """The legend right of `ax`, never on the axes (with tens of strategies it would hide
    points); the figure grows by the legend's size, so the axes keep theirs. A point's entry
    is its marker alone: error bars drawn across it would hide its shape."""
    from matplotlib.container import ErrorbarContainer

    handles = [h.lines[0] if isinstance(h, ErrorbarContainer) else h for h in handles]
    legend = ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       frameon=False, markerscale=1.2,
                       ncol=1 + (len(names) - 1) // LEGEND_ROWS)
    box = legend.get_window_extent(fig.canvas.get_renderer())
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + box.width / fig.dpi, max(height, box.height / fig.dpi + 1.0))


def _point(ax, style: Style, label: str, x: float, y: float, x_ci: float, y_ci: float) -> None:
    ax.errorbar(x, y, xerr=_err(x_ci), yerr=_err(y_ci), fmt=style.marker, ms=5, capsize=2,
                elinewidth=0.8, color=style.colour, mec="white", mew=0.4, label=label)


def _tradeoff(points: Sequence[tuple[str, float, float, float, float]],
              palette: dict[str, Style], title: str, xlabel: str, ylabel: str):
    """One point per strategy, (label, x, y, x CI, y CI), with its error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 4.0), layout="constrained")
    for label, x, y, x_ci, y_ci in points:
        _point(ax, palette[label], label, x, y, x_ci, y_ci)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend_beside(fig, ax, *ax.get_legend_handles_labels())
    fig.suptitle(title)
    return fig


def _stability(block: pd.DataFrame, palette: dict[str, Style], title: str):
    points = [(r["label"], r["la"], r["fm"], r["la ci"], r["fm ci"]) for _, r in block.iterrows()]
    fig = _tradeoff(points, palette, title,
                    "plasticity: learning accuracy LA %", "forgetting FM % (lower is more stable)")
    ax = fig.axes[0]
    _span(ax, "x")
    _span(ax, "y", include=0.0, bounds=(-100.0, 100.0))
    ax.axhline(0, color="0.5", lw=0.8)
    return fig


def _learning_forgetting(block: pd.DataFrame, palette: dict[str, Style], title: str):
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


def _cost_axes(block: pd.DataFrame) -> list[tuple[str, str]]:
    return [a for a in COST_AXES if block[a[0]].notna().any()]


def _cost(block: pd.DataFrame, palette: dict[str, Style], title: str):
    import matplotlib.pyplot as plt

    axes_spec = _cost_axes(block)
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(2.7 * len(axes_spec), 2.8),
                             sharey=True, squeeze=False, layout="constrained")
    for ax, (column, name) in zip(axes[0], axes_spec, strict=True):
        points = block[block[column].notna()]
        for _, row in points.iterrows():
            _point(ax, palette[row["label"]], row["label"], row[column], row["acc"],
                   row[f"{column} ci"], row["acc ci"])
        front = pareto_front(list(points[column]), list(points["acc"]))
        ax.plot(points[column].iloc[front], points["acc"].iloc[front], "--", lw=1,
                color="0.4", drawstyle="steps-post", label="Pareto front")
        ax.set_xlabel(name)
        ax.set_xlim(left=0)  # a cost is a ratio scale: 750 vs 800 MB is not a fourfold gap
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("ACC %")
    _span(axes[0, 0], "y")
    _legend_beside(fig, axes[0, -1], *axes[0, 0].get_legend_handles_labels())
    fig.suptitle(title)
    return fig


HEADINGS = {"R": "Accuracy matrix R", "curves": "Accuracy on each task during the sequence",
            "stability": "Stability vs plasticity", "cost": "Accuracy vs cost",
            "learning-forgetting": "Learning vs forgetting"}
_CI = "with 95% confidence intervals over seeds"


def _captions(block: pd.DataFrame) -> dict[str, str]:
    costs = ", ".join(name for _, name in _cost_axes(block))
    return {
        "R": "Each strategy's accuracy matrix R (mean over seeds, %): a row per stage (untrained, "
             "then after training on each task in turn), a column per task evaluated; colours "
             "run from 0 to 100%.",
        "curves": "Accuracy on each task (a line per task) before training and after training "
                  "on each task in turn, a panel per strategy: the mean over seeds, its 95% "
                  "confidence interval as a band (none with one seed). Accuracy axes run from "
                  "0 to 100%.",
        "stability": "Plasticity against stability, a point per strategy " + _CI + ". Across: "
                     "learning accuracy LA, each task's accuracy right after training on it; up: "
                     "forgetting FM (lower is better). The FM axis includes 0 (no forgetting) "
                     f"and both axes span at least {MIN_SPAN:g} points, so that small "
                     "differences are not magnified.",
        "cost": f"Final accuracy ACC (up) against training cost ({costs}; across), a point per "
                f"strategy {_CI}; the dashed steps are the Pareto front (strategies no other "
                "one beats on both cost and accuracy). Cost axes start at 0 and the ACC axis "
                f"spans at least {MIN_SPAN:g} points. Costs compare only on the same hardware.",
        "learning-forgetting": "What fine-tuning learned against what it forgot, a point per "
                               f"strategy {_CI}. Across: the downstream tasks' perplexity after "
                               "the sequence (log axis; lower is better); up: the increase in "
                               "the source's log-perplexity, nats per token (above 0: "
                               "forgotten).",
    }


def plot_all(records: Sequence[RunRecord], summary: pd.DataFrame, out_dir: Path
             ) -> dict[tuple[str, str], list[Figure]]:
    """Write every figure for every (scenario, setting); returns the figures per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = _by_configuration(records)
    written: dict[tuple[str, str], list[Figure]] = {}
    with plt.rc_context(PAPER):
        all_blocks = [(scenario, setting, block.assign(label=block["label"].map(_plain)))
                      for scenario, setting, block in blocks(summary)]
        palette = styles([label for *_, b in all_blocks for label in b["label"]])
        for scenario, setting, block in all_blocks:
            stem = file_stem(scenario, setting)
            titles = {kind: f"{heading} — {scenario}, {setting} setting"
                      for kind, heading in HEADINGS.items()}
            shown = {kind: _plain(title) for kind, title in titles.items()}
            figures = {"R": _heatmaps(block, seeds, shown["R"]),
                       "curves": _curves(block, seeds, shown["curves"]),
                       "stability": _stability(block, palette, shown["stability"])}
            if _cost_axes(block):
                figures["cost"] = _cost(block, palette, shown["cost"])
            if block["source_ppl_after"].notna().any():
                figures["learning-forgetting"] = _learning_forgetting(
                    block, palette, shown["learning-forgetting"])
            captions = _captions(block)
            written[scenario, setting] = [
                Figure(_save(fig, out_dir, f"{stem}-{kind}"), one_line(titles[kind]),
                       captions[kind])
                for kind, fig in figures.items()]
            for fig in figures.values():
                plt.close(fig)
    return written
