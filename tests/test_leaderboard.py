"""The leaderboard as a reader relies on it: seeds aggregated into means and Student-t CIs,
"best" and "tied" marks that do not over-claim, the metric conventions, six output formats,
the figures, the `cfbench leaderboard` command, and the HTML page driven in a real browser.

Most tests build synthetic run records, so every expected number is known by hand."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg
from scipy import stats

import cfbench.cli
import cfbench.formats
import cfbench.metrics
from cfbench.cli import main
from cfbench.formats import labels, render
from cfbench.leaderboard import (
    Provenance,
    caption,
    confidence_halfwidth,
    records_frame,
    summarize,
    welch_p,
)
from cfbench.plots import MIN_SPAN, Figure, pareto_front, plot_all, styles
from cfbench.records import RunRecord

T_975_2 = 4.302652729911275  # Student t quantile, 0.975, 2 degrees of freedom
MB = 2**20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {"cfbench": "0.1.0", "git_sha": "0123456789abcdef0123", "torch": "2.14.1",
       "device_name": "Test CPU @ 2GHz", "threads": 2}
RUN_COMMAND = "cfbench run --scenario split --strategy naive,ewc,ewc_online --seeds 3"
LEADERBOARD_ARGV = ["leaderboard", "--format", "md"]
KINDS = ("R", "curves", "stability", "cost")


# --- synthetic records ---------------------------------------------------------------------

def R_with_acc(acc: float) -> list[list[float]]:
    """A two-task R whose final row averages to `acc`."""
    return [[0.1, 0.1], [0.95, 0.2], [acc - 0.01, acc + 0.01]]


def make_record(scenario: str, setting: str, strategy: str, seed: int,
                R: Sequence[Sequence[float]], *, hparams: dict[str, Any] | None = None,
                protocol: dict[str, Any] | None = None, status: str = "ok",
                **cost: Any) -> RunRecord:
    """A finished run with known R, costs and environment (`protocol`: the recorded fields)."""
    config = {"scenario": scenario, "setting": setting, "strategy": strategy,
              "hparams": {strategy: dict(hparams or {})}, "seed": seed,
              "protocol": dict(protocol or {}), "scenario_options": {}, "device": "cpu"}
    costs = {"train_seconds": 10.0 + seed, "eval_seconds": 1.0, "peak_rss_bytes": 300 * MB,
             "peak_gpu_bytes": None, "train_flops": 2.5e9, "state_bytes": MB // 2, **cost}
    run_id = (f"{scenario}-{setting}-{strategy}-{json.dumps(hparams, sort_keys=True)}-"
              f"{json.dumps(protocol, sort_keys=True)}-{seed}")
    return RunRecord(run_id=run_id, config=config, status=status, R=[list(r) for r in R],
                     cost=costs, env=dict(ENV), command=RUN_COMMAND)


def seeds(strategy: str, accs: Sequence[float], *, scenario: str = "split",
          setting: str = "task", **kwargs: Any) -> list[RunRecord]:
    """One record per seed 0..n-1, seed k with final-row mean ACC accs[k]."""
    return [make_record(scenario, setting, strategy, k, R_with_acc(a), **kwargs)
            for k, a in enumerate(accs)]


def row(summary: pd.DataFrame, strategy: str, setting: str = "task") -> pd.Series:
    (index,) = summary.index[(summary["strategy"] == strategy)
                             & (summary["setting"] == setting)]
    return summary.loc[index]


def ranks(records: Sequence[RunRecord]) -> dict[tuple[str, str], str]:
    summary = summarize(records)
    return {(s, name): rank for s, name, rank
            in zip(summary["setting"], summary["strategy"], summary["rank"], strict=True)}


def board_records() -> list[RunRecord]:
    """Two settings of one scenario: in 'task' ewc_online is best and ewc tied with it; in
    'class' ewc is best and lwf has a single seed. One failed run that must not count."""
    return [
        *seeds("naive", [0.50, 0.51, 0.52]),
        *seeds("ewc", [0.90, 0.92, 0.94]),
        *seeds("ewc_online", [0.91, 0.93, 0.95]),
        *seeds("naive", [0.20, 0.21, 0.22], setting="class"),
        *seeds("ewc", [0.40, 0.41, 0.42], setting="class"),
        *seeds("ewc_online", [0.30, 0.31, 0.32], setting="class"),
        *seeds("lwf", [0.35], setting="class"),
        make_record("split", "task", "naive", 7, R_with_acc(0.99), status="failed"),
    ]


BOARD = {"task": ["ewc_online", "ewc", "naive"], "class": ["ewc", "lwf", "ewc_online", "naive"]}


@pytest.fixture(scope="module")
def board() -> tuple[list[RunRecord], pd.DataFrame, Provenance]:
    records = board_records()
    return records, summarize(records), Provenance.of(records, LEADERBOARD_ARGV)


def rendered(board, fmt: str, convention: str = "cfbench") -> str:
    _, summary, provenance = board
    return render(summary, fmt, provenance, convention)


def md_tables(text: str) -> dict[str, list[list[str]]]:
    """Markdown tables by their heading; rows of stripped cells, the header row first."""
    tables: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = tables.setdefault(line[4:], [])
        elif line.startswith("| ") and current is not None:
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
    return tables


def assert_real_png(path: Path) -> np.ndarray:
    """A PNG file that decodes to an image of more than one colour."""
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50, pixels.shape
    rgba = np.zeros((*pixels.shape[:2], 4), dtype=np.uint8)
    rgba[..., :pixels.shape[2]] = np.rint(pixels * 255)
    colours = np.unique(rgba.view(np.uint32))
    assert len(colours) > 10 and float(pixels.std()) > 0.01, f"{path} is (nearly) blank"
    return pixels


# --- aggregation ---------------------------------------------------------------------------

def test_three_seeds_give_mean_std_and_student_t_interval():
    summary = summarize(seeds("ewc", [0.90, 0.92, 0.94]))
    (acc,) = summary["acc"]
    assert acc == pytest.approx(92.0)
    assert summary["acc std"].iloc[0] == pytest.approx(2.0)
    expected_ci = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)
    assert expected_ci == pytest.approx(T_975_2 * 2 / math.sqrt(3))
    assert summary["acc ci"].iloc[0] == pytest.approx(expected_ci) == pytest.approx(4.9683, 1e-4)
    assert summary["seeds"].iloc[0] == 3
    # train seconds 10, 11, 12: mean 11, std 1
    assert summary["train_seconds"].iloc[0] == pytest.approx(11.0)
    assert summary["train_seconds ci"].iloc[0] == pytest.approx(T_975_2 / math.sqrt(3))


def test_confidence_halfwidth_is_nan_without_two_seeds():
    assert confidence_halfwidth(2.0, 3) == pytest.approx(T_975_2 * 2 / math.sqrt(3))
    assert math.isnan(confidence_halfwidth(2.0, 1))
    assert math.isnan(confidence_halfwidth(math.nan, 5))
    summary = summarize(seeds("naive", [0.7]))
    assert summary["acc"].iloc[0] == pytest.approx(70.0)
    assert math.isnan(summary["acc ci"].iloc[0]) and math.isnan(summary["acc std"].iloc[0])


def test_costs_are_converted_to_mb_and_gflops():
    records = seeds("ewc", [0.9, 0.9], peak_rss_bytes=300 * MB, train_flops=2.5e9,
                    state_bytes=3 * MB // 4)
    frame = records_frame(records)
    assert list(frame["peak_rss_mb"]) == pytest.approx([300.0, 300.0])
    assert list(frame["train_gflops"]) == pytest.approx([2.5, 2.5])
    assert list(frame["state_mb"]) == pytest.approx([0.75, 0.75])
    assert frame["peak_gpu_mb"].isna().all()  # peak_gpu_bytes None -> NaN, not 0
    summary = summarize(records)
    assert summary["peak_rss_mb"].iloc[0] == pytest.approx(300.0)
    assert summary["train_gflops"].iloc[0] == pytest.approx(2.5)
    assert summary["peak_rss_mb ci"].iloc[0] == pytest.approx(0.0)


def test_metrics_are_percent_and_failed_runs_are_left_out():
    records = [*seeds("naive", [0.6, 0.8]),
               make_record("split", "task", "naive", 2, R_with_acc(0.1), status="failed")]
    frame = records_frame(records)
    assert sorted(frame["seed"]) == [0, 1]
    assert list(frame["acc"]) == pytest.approx([60.0, 80.0])
    # R_with_acc: BWT = R[2,0] - R[1,0] = (acc - 0.01) - 0.95; REM = 100 * R[2,0] / R[1,0]
    assert list(frame["bwt"]) == pytest.approx([100 * (0.59 - 0.95), 100 * (0.79 - 0.95)])
    assert list(frame["rem"]) == pytest.approx([100 * 0.59 / 0.95, 100 * 0.79 / 0.95])
    summary = summarize(records)
    assert len(summary) == 1 and summary["seeds"].iloc[0] == 2
    assert summary["acc"].iloc[0] == pytest.approx(70.0)


def test_hyperparameter_variants_of_one_strategy_are_separate_rows():
    records = [*seeds("ewc", [0.80, 0.82], hparams={"lam": 1.0}),
               *seeds("ewc", [0.90, 0.92], hparams={"lam": 100.0})]
    summary = summarize(records)
    assert len(summary) == 2 and list(summary["seeds"]) == [2, 2]
    by_lam = {json.loads(h)["ewc"]["lam"]: a for h, a in zip(summary["hparams"], summary["acc"],
                                                             strict=True)}
    assert by_lam == {1.0: pytest.approx(81.0), 100.0: pytest.approx(91.0)}
    (rows,) = md_tables(render(summary, "md", Provenance.of(records, LEADERBOARD_ARGV))).values()
    assert [r[0] for r in rows[1:]] == ["ewc (lam=100.0)", "ewc (lam=1.0)"]


# --- ranks and ties ------------------------------------------------------------------------

def test_overlapping_seeds_are_tied_and_distant_ones_are_not():
    a, b, far = [0.90, 0.92, 0.94], [0.91, 0.93, 0.95], [0.50, 0.51, 0.52]
    assert welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert welch_p(a, b) > 0.05 > welch_p(far, b)
    assert ranks([*seeds("ewc", a), *seeds("si", b)]) == {("task", "si"): "best",
                                                         ("task", "ewc"): "tied"}
    assert ranks([*seeds("ewc", far), *seeds("si", b)]) == {("task", "si"): "best",
                                                           ("task", "ewc"): ""}


def test_no_tie_is_claimed_with_a_single_seed_on_either_side():
    assert math.isnan(welch_p([0.92], [0.90, 0.92, 0.94]))
    # the single seed is best: the other cannot be called tied with it
    assert ranks([*seeds("si", [0.95]), *seeds("ewc", [0.90, 0.92, 0.94])]) == {
        ("task", "si"): "best", ("task", "ewc"): ""}
    # the single seed is the runner-up, close to the best's seeds
    assert ranks([*seeds("si", [0.92]), *seeds("ewc", [0.91, 0.93, 0.95])]) == {
        ("task", "ewc"): "best", ("task", "si"): ""}


def test_constant_samples_tie_only_when_equal():
    assert welch_p([0.9, 0.9], [0.9, 0.9]) == 1.0
    assert welch_p([0.9, 0.9], [0.8, 0.8]) == 0.0


def test_ranks_are_computed_per_setting(board):
    _, summary, _ = board
    marks = dict(zip(zip(summary["setting"], summary["strategy"], strict=True), summary["rank"],
                     strict=True))
    assert marks == {("task", "ewc_online"): "best", ("task", "ewc"): "tied",
                     ("task", "naive"): "", ("class", "ewc"): "best",
                     ("class", "ewc_online"): "", ("class", "naive"): "", ("class", "lwf"): ""}
    assert (summary["rank"] == "best").sum() == 2
    assert row(summary, "naive")["seeds"] == 3  # the failed seed 7 is not counted


# --- conventions ---------------------------------------------------------------------------

# T = 3. BWT sum = (0.6 - 0.9) + (0.85 - 0.8) = -0.25; FWT sum = (0.1 - 0.1) + (0.2 - 0.1) = 0.1;
# FM (rows 1..2) = mean(0.9 - 0.6, 0.8 - 0.85) = 0.125; Mammoth's rows 1..3 give
# mean(0.9 - 0.6, 0.85 - 0.85) = 0.15.
R3 = [[0.1, 0.1, 0.1], [0.9, 0.1, 0.1], [0.7, 0.8, 0.2], [0.6, 0.85, 0.9]]


@pytest.mark.parametrize(("convention", "expected"), [
    ("cfbench", {"bwt": -25.0 / 2, "fwt": 10.0 / 2, "fm": 12.5}),
    ("gem", {"bwt": -25.0 / 3, "fwt": 10.0 / 3, "fm": 12.5}),
    ("mammoth", {"bwt": -25.0 / 2, "fwt": 10.0 / 2, "fm": 15.0}),
])
def test_conventions_change_bwt_fwt_and_fm_as_documented(convention, expected):
    summary = summarize([make_record("split", "task", "naive", 0, R3)], convention)
    got = summary.iloc[0]
    for metric, value in expected.items():
        assert got[metric] == pytest.approx(value), metric
    assert got["acc"] == pytest.approx(100 * (0.6 + 0.85 + 0.9) / 3)  # never convention-bound
    assert got["la"] == pytest.approx(100 * (0.9 + 0.8 + 0.9) / 3)


def test_caption_names_the_convention():
    assert "divide by T-1, FM takes the max over rows 1..T-1" in caption("cfbench")
    assert "divide by T, FM takes the max over rows 1..T-1" in caption("gem")
    assert "divide by T-1, FM takes the max over rows 1..T." in caption("mammoth")
    for convention in cfbench.metrics.CONVENTIONS:
        assert f"Convention '{convention}'" in caption(convention)


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="unknown metric convention"):
        summarize(seeds("naive", [0.5]), "avalanche")


# --- formats -------------------------------------------------------------------------------

def test_markdown_has_a_block_per_setting_sorted_by_acc(board):
    text = rendered(board, "md")
    tables = md_tables(text)
    assert list(tables) == ["split — class setting", "split — task setting"]
    for setting, expected in BOARD.items():
        header, *rows = tables[f"split — {setting} setting"]
        assert header[:2] == ["strategy", "ACC"] and header[-2:] == ["seeds", "rank"]
        assert "peak RSS MB" in header and "peak GPU MB" not in header  # no GPU numbers at all
        assert [r[0] for r in rows] == expected
    header, *rows = tables["split — task setting"]
    cells = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert cells["ewc"]["ACC"] == "92.0 ± 5.0" and cells["ewc"]["rank"] == "tied"
    assert cells["ewc_online"]["ACC"] == "93.0 ± 5.0" and cells["ewc_online"]["rank"] == "best"
    assert cells["naive"]["ACC"] == "51.0 ± 2.5" and cells["naive"]["rank"] == ""
    assert cells["naive"]["seeds"] == "3" and cells["naive"]["peak RSS MB"] == "300 ± 0"
    assert cells["naive"]["train s"] == "11.0 ± 2.5"
    lwf = dict(zip(tables["split — class setting"][0], tables["split — class setting"][2],
                   strict=True))
    assert lwf["strategy"] == "lwf" and lwf["ACC"] == "35.0"  # one seed: the mean alone
    assert caption("cfbench") in text.splitlines()
    assert "- produced by: cfbench leaderboard --format md" in text.splitlines()
    assert f"- runs by: {RUN_COMMAND}" in text.splitlines()
    assert "torch 2.14.1" in text and "Test CPU @ 2GHz" in text and "0123456789" in text


def test_csv_parses_with_numeric_columns(board):
    text = rendered(board, "csv")
    table = pd.read_csv(io.StringIO(text))
    assert len(table) == 7
    for column in ("acc", "acc std", "acc ci", "bwt", "train_seconds", "peak_rss_mb",
                   "train_gflops", "state_mb", "seeds"):
        assert pd.api.types.is_numeric_dtype(table[column]), column
    ewc = table[(table["strategy"] == "ewc") & (table["setting"] == "task")].iloc[0]
    assert ewc["acc"] == pytest.approx(92.0) and ewc["acc ci"] == pytest.approx(4.9683, 1e-4)
    assert ewc["rank"] == "tied" and ewc["seeds"] == 3
    assert json.loads(ewc["hparams"]) == {"ewc": {}}


def test_json_is_strict_and_complete(board):
    def no_nan(name: str):
        raise AssertionError(f"{name} is not JSON")

    data = json.loads(rendered(board, "json", "gem"), parse_constant=no_nan)
    assert set(data) == {"convention", "caption", "provenance", "rows"}
    assert data["convention"] == "gem" and data["caption"] == caption("gem")
    assert data["provenance"]["command"] == "cfbench leaderboard --format md"
    assert data["provenance"]["run_commands"] == [RUN_COMMAND]
    assert data["provenance"]["threads"] == [2]
    assert len(data["rows"]) == 7
    lwf = next(r for r in data["rows"] if r["strategy"] == "lwf")
    assert lwf["acc"] == pytest.approx(35.0) and lwf["acc ci"] is None
    assert lwf["peak_gpu_mb"] is None and lwf["seeds"] == 1


def test_the_summary_is_one_table_a_row_per_strategy_a_column_per_setting(board):
    """The README's condensed table: ACC ± CI and the place in each column, ties said, a dash
    where a strategy has no runs, rows ordered by mean place."""
    lines = rendered(board, "summary").splitlines()
    assert lines[0] == "| strategy | split class | split task |"
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip("|").split("|")]
                                  for line in lines[2:6])}
    assert list(rows) == ["ewc", "ewc_online", "lwf", "naive"]  # mean places 1.5, 2, 2, 3.5
    assert rows["ewc_online"][1] == "93.0 ± 5.0 (#1)" and rows["ewc"][1] == "92.0 ± 5.0 (#2, tied)"
    assert rows["ewc"][0].endswith("(#1)") and rows["naive"][1] == "51.0 ± 2.5 (#3)"
    assert rows["lwf"][1] == "—" and rows["lwf"][0].endswith("(#2, n=1)")  # fewer seeds
    assert "#k = place by mean ACC in its column" in lines[7]
    assert any(line.startswith("- produced by: cfbench leaderboard") for line in lines)


def test_the_summary_keeps_one_row_per_memory_whatever_tune_chose_per_column():
    """Reference tables tune der at two fixed memories in two settings and choose a different
    alpha in each: the summary has one row per memory, not one per chosen alpha; the full
    table still names the alpha. Where two rows of a column would share a name (records
    that do not say which keys were tuned), the full names are kept."""
    records = []
    for setting, alphas in (("task", (0.3, 1.0)), ("class", (3.0, 0.1))):
        for memory, alpha, acc in zip((200, 1000), alphas, (0.6, 0.8), strict=True):
            runs = seeds("der", [acc, acc + 0.02], setting=setting,
                         hparams={"memory": memory, "alpha": alpha})
            for record in runs:
                record.selection = {**tune_selection({"memory": memory, "alpha": alpha}),
                                    "grid": {"alpha": [0.1, 0.3, 1.0, 3.0]}}
            records += runs
    provenance = Provenance.of(records, LEADERBOARD_ARGV)
    lines = render(summarize(records), "summary", provenance).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["der (memory=1000)",
                                                                   "der (memory=200)"]
    assert lines[4] == ""
    assert "The values `cfbench tune` chose for each cell are in the full tables." in lines[5]
    full = render(summarize(records), "md", provenance)
    assert "| der (alpha=3.0, memory=200) | 61.0 ± " in full
    chosen = "chosen: split class der: memory=200 alpha=3.0 (alpha from 0.1/0.3/1.0/3.0), "
    assert chosen in full and not any("chosen:" in line for line in lines)
    for record in records:
        del record.selection["grid"]  # an older record: every chosen key counts as tuned
    lines = render(summarize(records), "summary", provenance).splitlines()
    assert {line.split("|")[1].strip() for line in lines[2:6]} == {
        "der (alpha=0.3, memory=200)", "der (alpha=1.0, memory=1000)",
        "der (alpha=3.0, memory=200)", "der (alpha=0.1, memory=1000)"}


@pytest.mark.parametrize("fmt", ["md", "text", "html", "latex"])
def test_a_strategy_missing_from_one_setting_is_named_under_that_table(board, fmt):
    """lwf ran in the class setting only: the task table says so (every format that has
    prose), the class table names nothing, and it is said once."""
    text = rendered(board, fmt)
    line = "Not run in the task setting (runs in other settings of split): lwf."
    assert text.count(line) == 1, text
    assert "Not run in the class setting" not in text
    if fmt == "md":
        task_at, class_at = text.index("split — task setting"), text.index("split — class")
        assert text.index(line) > task_at > class_at  # under the task table, not the class one


def test_latex_is_booktabs_with_marks_and_escapes(board):
    text = rendered(board, "latex")
    lines = text.splitlines()
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert lines.count(rule) == 2, rule
    assert "\\textbf{ewc\\_online} & \\textbf{93.0 $\\pm$ 5.0}" in text
    assert "\\textit{ewc} & \\textit{92.0 $\\pm$ 5.0}" in text
    assert any(line.startswith("naive & 51.0 $\\pm$ 2.5") for line in lines)
    assert "in \\%" in text  # the caption's "% of each old task"
    body = [line for line in lines if not line.startswith("%")]
    assert body and not any(re.search(r"(?<!\\)[%_]", line) for line in body), \
        "an unescaped % or _ in the LaTeX body"
    assert "% produced by: cfbench leaderboard --format md" in lines


def test_text_table_names_strategies_and_marks(board):
    text = rendered(board, "text")
    for name in ("ewc_online", "ewc", "naive", "lwf", "best", "tied"):
        assert name in text, name
    assert "split — task setting" in text and "split — class setting" in text
    assert "produced by: cfbench leaderboard --format md" in text


# --- plots ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def board_files(board, tmp_path_factory) -> tuple[dict[tuple[str, str], list[Figure]], Path]:
    """plot_all's figures for the board, and the HTML page embedding them."""
    records, summary, provenance = board
    out = tmp_path_factory.mktemp("board")
    plots = plot_all(records, summary, out / "plots")
    page = out / "leaderboard.html"
    page.write_text(render(summary, "html", provenance, "cfbench", plots))
    return plots, page


def test_plot_all_writes_png_and_svg_per_setting(board_files):
    plots, _ = board_files
    assert set(plots) == {("split", "task"), ("split", "class")}
    for (scenario, setting), figures in plots.items():
        assert [f.png.name for f in figures] == [f"{scenario}-{setting}-{k}.png" for k in KINDS]
        for figure in figures:
            assert_real_png(figure.png)
            svg = figure.png.with_suffix(".svg").read_text()
            assert "<svg" in svg and svg.rstrip().endswith("</svg>")
            assert figure.title.endswith(f"— {scenario}, {setting} setting")
            assert len(figure.caption) > 80 and figure.png.stem not in figure.caption


def svg_ticks(svg: Path, axis: str) -> list[str]:
    """The tick labels of every `axis` ("x" or "y") in an SVG figure, panel after panel."""
    import xml.etree.ElementTree as ET

    text = "{http://www.w3.org/2000/svg}text"
    return ["".join(t.itertext()).replace("\u2212", "-")
            for g in ET.parse(svg).iter("{http://www.w3.org/2000/svg}g")
            if g.get("id", "").startswith(f"{axis}tick_") for t in g.iter(text)]


def test_25_strategies_get_25_distinct_styles_that_follow_the_strategy():
    import itertools

    names = [f"strategy {i:02d}" for i in range(25)]
    palette = styles(names)
    assert len({(s.colour, s.marker) for s in palette.values()}) == 25
    colours = {s.colour[:3] for s in palette.values()}
    # ten colours no eye confuses (tab20's pairs are a tenth of the RGB cube apart)
    assert len(colours) == 10 and min(math.dist(a, b) for a, b in
                                      itertools.combinations(colours, 2)) > 0.2
    # a strategy's style depends on the set of labels, not on the order a figure lists them
    assert styles([*reversed(names), *names[:5]]) == palette


def test_figures_name_the_tasks_and_do_not_magnify_small_differences(tmp_path):
    """Two strategies a fraction of a point apart: the stability axes still span MIN_SPAN
    points and show 0 forgetting; tasks are named as the records name them."""
    records = [*seeds("naive", [0.90, 0.91]), *seeds("ewc", [0.905, 0.915])]
    for record in records:
        record.tasks = [{"name": "MNIST"}, {"name": "Fashion"}]
    (figures,) = plot_all(records, summarize(records), tmp_path).values()
    svg = {f.png.stem.rsplit("-", 1)[-1]: f.png.with_suffix(".svg") for f in figures}
    assert svg_ticks(svg["R"], "x") == ["MNIST", "Fashion"] * 2  # a panel per strategy
    assert svg_ticks(svg["R"], "y")[:3] == ["untrained", "MNIST", "Fashion"]
    assert svg_ticks(svg["curves"], "x")[:3] == ["untrained", "MNIST", "Fashion"]
    la = [float(t) for t in svg_ticks(svg["stability"], "x")]
    fm = [float(t) for t in svg_ticks(svg["stability"], "y")]
    assert max(la) - min(la) >= MIN_SPAN * 0.6 and 0.0 in fm, (la, fm)
    # records without task names: numbered
    other = seeds("naive", [0.5, 0.6])
    (figures,) = plot_all(other, summarize(other), tmp_path / "unnamed").values()
    assert svg_ticks(figures[0].png.with_suffix(".svg"), "x") == ["task 1", "task 2"]


def test_pareto_front_keeps_the_undominated_points():
    costs, accs = [1.0, 2.0, 3.0, 4.0, 2.0], [50.0, 60.0, 55.0, 70.0, 40.0]
    assert pareto_front(costs, accs) == [0, 1, 3]
    assert pareto_front([3.0, 1.0, 2.0], [90.0, 10.0, 50.0]) == [1, 2, 0]
    assert pareto_front([1.0, 1.0], [40.0, 80.0]) == [1]  # same cost: the better one
    assert pareto_front([1.0, 2.0], [50.0, 50.0]) == [0]  # same ACC, dearer: dominated
    assert pareto_front([5.0], [1.0]) == [0]


# --- command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """Run records of a tiny real grid: split-digits, task setting, naive and EWC, 2 seeds."""
    out = tmp_path_factory.mktemp("grid") / "runs"
    assert main(["run", "--scenario", "split-digits", "--strategy", "naive,ewc", "--seeds", "2",
                 "--setting", "task", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    return out


def test_run_records_carry_their_command(grid):
    records = [json.loads(p.read_text()) for p in sorted(grid.glob("*.json"))]
    assert len(records) == 4
    for record in records:
        assert record["command"].startswith("cfbench run --scenario split-digits"), record


def test_leaderboard_command_writes_every_format_and_the_plots(grid, tmp_path, capsys):
    out = tmp_path / "board"
    argv = ["leaderboard", "--records", str(grid), "--format", "md", "--format", "html",
            "--format", "json", "--plots", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {out / name}" for name in
                       ("leaderboard.md", "leaderboard.html", "leaderboard.json")]
    md = (out / "leaderboard.md").read_text()
    header, *rows = md_tables(md)["split-digits — task setting"]
    assert sorted(r[0] for r in rows) == ["ewc", "naive"]
    assert {r[header.index("seeds")] for r in rows} == {"2"}
    assert f"- produced by: cfbench leaderboard --records {grid}" in md
    assert "- runs by: cfbench run --scenario split-digits --strategy naive,ewc" in md
    data = json.loads((out / "leaderboard.json").read_text())
    assert sorted(r["strategy"] for r in data["rows"]) == ["ewc", "naive"]
    assert {r["seeds"] for r in data["rows"]} == {2}
    pngs = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in pngs] == sorted(f"split-digits-task-{k}.png" for k in KINDS)
    assert len(list((out / "plots").glob("*.svg"))) == 4
    for png in pngs:
        assert_real_png(png)
    page = (out / "leaderboard.html").read_text()
    assert page.count("<table class='board'>") == 1
    assert page.count("src='data:image/png;base64,") == 4


def test_csv_opens_with_default_readers_and_provenance_sits_beside_it(grid, tmp_path, capsys):
    """pandas.read_csv and the csv module, with no options, read the header and one row per
    strategy; the caption and provenance are in leaderboard.meta.json (and the JSON format)."""
    out = tmp_path / "board"
    assert main(["leaderboard", "--records", str(grid), "--format", "csv", "--format", "json",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {out / name}" for name in
        ("leaderboard.csv", "leaderboard.meta.json", "leaderboard.json")]
    table = pd.read_csv(out / "leaderboard.csv")
    assert list(table.columns[:6]) == ["scenario", "setting", "strategy", "hparams",
                                       "protocol", "acc"]
    assert sorted(table["strategy"]) == ["ewc", "naive"] and set(table["seeds"]) == {2}
    with open(out / "leaderboard.csv", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == list(table.columns)
    assert sorted(row[2] for row in rows) == ["ewc", "naive"]
    assert all(len(row) == len(header) for row in rows)
    meta = json.loads((out / "leaderboard.meta.json").read_text())
    full = json.loads((out / "leaderboard.json").read_text())
    assert meta["caption"] == caption("cfbench") == full["caption"]
    assert meta["convention"] == "cfbench"
    assert meta["provenance"]["command"] == (f"cfbench leaderboard --records {grid} --format csv "
                                             f"--format json --out {out}")
    assert meta["provenance"]["run_commands"] == full["provenance"]["run_commands"] != []


def test_convention_flag_reaches_caption_and_numbers(grid, capsys):
    tables = {}
    for convention in ("cfbench", "gem"):
        assert main(["leaderboard", "--records", str(grid), "--format", "json",
                     "--convention", convention]) == 0
        tables[convention] = json.loads(capsys.readouterr().out)
    gem = tables["gem"]
    assert gem["caption"] == caption("gem") and "divide by T," in gem["caption"]
    assert gem["provenance"]["command"].endswith("--convention gem")
    # split-digits has T = 5 tasks: GEM's BWT is cfbench's times (T-1)/T
    for ours, theirs in zip(tables["cfbench"]["rows"], gem["rows"], strict=True):
        assert ours["strategy"] == theirs["strategy"]
        assert theirs["bwt"] == pytest.approx(ours["bwt"] * 4 / 5)
        assert theirs["acc"] == pytest.approx(ours["acc"])
    assert main(["leaderboard", "--records", str(grid), "--format", "md", "--convention",
                 "mammoth"]) == 0
    assert caption("mammoth") in capsys.readouterr().out


@pytest.mark.parametrize(("case", "message"), [
    ("plots-without-out", "--plots writes files: give --out DIR"),
    ("two-formats-without-out", "several --format values write files: give --out DIR"),
    ("empty-records", "no successful run records to tabulate"),
    ("missing-records", "the directory does not exist"),
])
def test_leaderboard_bad_usage_is_one_line_exit_2(case, message, grid, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = {
        "plots-without-out": ["--records", str(grid), "--plots"],
        "two-formats-without-out": ["--records", str(grid), "--format", "md", "--format", "csv"],
        "empty-records": ["--records", str(empty), "--format", "md"],
        "missing-records": ["--records", str(tmp_path / "nowhere")],
    }[case]
    assert main(["leaderboard", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cfbench: error: ") and message in lines[0]
    assert list(tmp_path.iterdir()) == [empty] and not any(empty.iterdir())


def test_cli_constants_match_the_modules_they_mirror():
    assert cfbench.cli.FORMATS == cfbench.formats.FORMATS
    assert cfbench.cli.CONVENTIONS == cfbench.metrics.CONVENTIONS
    assert set(cfbench.formats.EXTENSIONS) == set(cfbench.formats.FORMATS)


# --- the HTML page in a headless browser ---------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--no-first-run", "--disable-dev-shm-usage")


@pytest.fixture(scope="module")
def browser(request, tmp_path_factory):
    """Headless Chromium through chromedriver (Debian packages; `make test` installs them)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: `make test` installs them "
                    "(apt-get install chromium chromium-driver)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in CHROME_ARGS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    request.addfinalizer(driver.quit)
    driver.set_window_size(1280, 1600)
    return driver


def board_table(driver, setting: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(
        By.XPATH, f"//h3[normalize-space()='{setting} setting']"
                  "/following-sibling::div[1]/table[@class='board']")


def column(table, name: str) -> tuple[Any, list[str]]:
    """The header cell called `name` and the visible text of that column, top to bottom."""
    from selenium.webdriver.common.by import By

    headers = table.find_elements(By.CSS_SELECTOR, "thead th")
    index = [h.text for h in headers].index(name)
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    return headers[index], [r.find_elements(By.CSS_SELECTOR, "th, td")[index].text
                            for r in rows]


def press(header, key: str | None = None) -> None:
    """Click the sort button of a header cell, or press `key` on it."""
    from selenium.webdriver.common.by import By

    button = header.find_element(By.TAG_NAME, "button")
    if key is None:
        button.click()
    else:
        button.send_keys(key)


def numbers(table, name: str) -> list[float]:
    """A column's means, top to bottom."""
    return [float(c.split(" ± ")[0]) for c in column(table, name)[1]]


def acc_values(table) -> list[float]:
    return numbers(table, "ACC")


def test_html_page_sorts_by_clicked_column_in_a_browser(browser, board_files, tmp_path):
    from selenium.webdriver.common.by import By

    _, page = board_files
    browser.get(page.as_uri())
    assert browser.title == "cfbench leaderboard"
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.board")) == len(BOARD)
    for setting, strategies in BOARD.items():
        table = board_table(browser, setting)
        _, names = column(table, "strategy")
        assert names == strategies  # a row per strategy, best first
        initial = acc_values(table)
        assert initial == sorted(initial, reverse=True) and len(set(initial)) == len(initial)
        header, _ = column(table, "ACC")
        assert header.get_attribute("aria-sort") == "descending"  # as the page opens
        press(header)
        assert acc_values(table) == sorted(initial)
        assert header.get_attribute("aria-sort") == "ascending"
        press(header)
        assert acc_values(table) == sorted(initial, reverse=True)
        assert header.get_attribute("aria-sort") == "descending"
        _, names = column(table, "strategy")
        assert names == strategies
    loaded = browser.execute_script(
        "return Array.from(document.images).map(function (i) { return i.naturalWidth; });")
    assert len(loaded) == 2 * len(KINDS) and all(w > 0 for w in loaded), loaded
    captions = [c.text for c in browser.find_elements(By.TAG_NAME, "figcaption")]
    assert len(captions) == len(loaded)
    assert captions[0].startswith("Accuracy matrix R — split, class setting. Each strategy's")
    assert not any("split-class" in c or "split-task" in c for c in captions)  # no file stems
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    pixels = assert_real_png(shot)
    assert pixels.shape[1] >= 1000  # the window's width, not an empty frame


def test_html_headers_sort_best_first_from_the_keyboard(browser, board_files):
    """Tab reaches the headers; Enter or Space on one sorts best first (FM: lowest first,
    BWT: highest first), again reverses, and aria-sort says which way."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, page = board_files
    browser.get(page.as_uri())
    table = board_table(browser, "class")
    scroller = table.find_element(By.XPATH, "..")
    browser.execute_script("arguments[0].focus();", scroller)
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element.text == "strategy"
    acc, _ = column(table, "ACC")
    press(acc, Keys.ENTER)  # the page opens best first by ACC: now worst first
    worst_first = numbers(table, "FM")
    fm, _ = column(table, "FM")
    press(fm, Keys.ENTER)
    assert numbers(table, "FM") == sorted(worst_first) != worst_first
    assert fm.get_attribute("aria-sort") == "ascending"
    assert acc.get_attribute("aria-sort") is None
    press(fm, Keys.ENTER)
    assert numbers(table, "FM") == worst_first == sorted(worst_first, reverse=True)
    assert fm.get_attribute("aria-sort") == "descending"
    bwt, _ = column(table, "BWT")
    press(bwt, Keys.SPACE)
    assert numbers(table, "BWT") == sorted(numbers(table, "BWT"), reverse=True)
    assert bwt.get_attribute("aria-sort") == "descending"
    assert column(table, "strategy")[1] == BOARD["class"]  # best BWT = least forgetting here


WIDE = [f"{name}{i}" for i in range(4) for name in ("naive", "ewc", "si", "lwf", "replay",
                                                        "agem")] + ["der"]


@pytest.fixture(scope="module")
def wide_page(tmp_path_factory) -> Path:
    """A page of 28 strategies (one with a long hyperparameter label), 3 seeds, its figures."""
    records = [record for k, name in enumerate(WIDE)
               for record in seeds(name, [0.5 + k / 100, 0.51 + k / 100, 0.52 + k / 100])]
    records += seeds("ewc", [0.7, 0.71, 0.72], hparams={"lam": 1000.0, "online": "gamma=0.9"})
    records += seeds("ewc", [0.7, 0.7, 0.72], hparams={"lam": 10.0, "online": "none"})
    out = tmp_path_factory.mktemp("wide")
    summary = summarize(records)
    assert len(summary) >= 25
    plots = plot_all(records, summary, out / "plots")
    page = out / "leaderboard.html"
    page.write_text(render(summary, "html", Provenance.of(records, LEADERBOARD_ARGV), "cfbench",
                           plots))
    return page


@pytest.mark.parametrize("width", [1400, 800])
def test_a_wide_board_scrolls_in_its_own_box_not_the_page(browser, wide_page, width, tmp_path):
    from selenium.webdriver.common.by import By

    browser.set_window_size(width, 1000)
    try:
        browser.get(wide_page.as_uri())
        page_width, window = browser.execute_script(
            "return [document.documentElement.scrollWidth, "
            "document.documentElement.clientWidth];")
        assert window >= width - 20 and page_width <= window, (page_width, window)
        table = board_table(browser, "task")
        scroller = table.find_element(By.XPATH, "..")
        assert scroller.get_attribute("class") == "scroll"
        if width == 800:  # too wide for the window: it scrolls sideways inside its box
            assert browser.execute_script(
                "return arguments[0].scrollWidth > arguments[0].clientWidth;", scroller)
        browser.execute_script("arguments[0].scrollLeft = 400;", scroller)
        names = table.find_elements(By.CSS_SELECTOR, "tbody th")
        assert len(names) == len(WIDE) + 2
        left = browser.execute_script(
            "return [arguments[0].getBoundingClientRect().left, "
            "arguments[1].getBoundingClientRect().left];", scroller, names[0])
        assert abs(left[0] - left[1]) < 1.5, left  # the strategy column stays in view
        # the legend and the links to each table come before the first table
        legend = browser.find_element(By.CSS_SELECTOR, "dl.legend")
        assert legend.location["y"] < scroller.location["y"]
        assert "forgetting" in legend.text and "lower is better" in legend.text
        links = [a.get_attribute("href").rsplit("#", 1)[-1]
                 for a in browser.find_elements(By.CSS_SELECTOR, "nav a")]
        assert table.find_element(By.XPATH, "../preceding-sibling::h3[1]").get_attribute(
            "id") in links
        assert browser.save_screenshot(str(tmp_path / f"wide-{width}.png"))
    finally:
        browser.set_window_size(1280, 1600)


def test_tuned_runs_say_how_they_were_chosen_and_validation_scores_stay_apart():
    tuned = make_record("split", "task", "ewc", 1, R_with_acc(0.9), hparams={"lam": 100})
    tuned.selection = {
        "by": "cfbench tune sweep.yaml", "candidates": 3, "chosen": {"ewc.lam": 100},
        "criterion": "mean final validation ACC", "validation_acc": 0.912,
        "validation": {"fraction": 0.1, "seed": 0, "tasks": 3}, "tuning_seeds": [0]}
    scored_on_validation = make_record("split", "task", "ewc", 0, R_with_acc(0.95))
    scored_on_validation.config["validation"] = {"fraction": 0.1, "seed": 0, "tasks": 3}
    frame = records_frame([tuned, scored_on_validation])
    assert sorted(frame["scenario"]) == ["split", "split [validation]"]
    lines = Provenance.of([tuned]).lines()
    assert ("hyperparameters tuned by cfbench tune sweep.yaml: mean final validation ACC; "
            "validation = 10% of each task's training data, per class in classification (split "
            "seed 0), first 3 task(s); tuning seeds [0]") in lines
    assert "chosen: split task ewc: ewc.lam=100, validation ACC 91.2% among 3 candidate(s)" \
        in lines


def test_transfer_columns_appear_for_transfer_runs_only():
    transfer = seeds("naive", [0.5, 0.6], scenario="to-fashion")
    for record in transfer:
        record.metrics = {"rem_source": 0.0}  # marks a transfer run; values come from R
    plain = seeds("naive", [0.5, 0.6])
    summary = summarize(transfer + plain)
    R = np.asarray(transfer[0].R)
    on = row(summary[summary["scenario"] == "to-fashion"], "naive")
    assert on["rem_source"] == pytest.approx(np.mean(
        [100 * r.R[-1][0] / r.R[1][0] for r in transfer]))
    assert on["acc_target"] == pytest.approx(np.mean([100 * r.R[-1][1] for r in transfer]))
    assert R.shape == (3, 2)
    off = row(summary[summary["scenario"] == "split"], "naive")
    assert math.isnan(off["rem_source"]) and math.isnan(off["acc_target"])
    text = render(summary, "md", Provenance.of(transfer + plain, LEADERBOARD_ARGV))
    assert "| REM src | ACC tgt |" in text
    assert "REM src" not in render(summarize(plain), "md",
                                   Provenance.of(plain, LEADERBOARD_ARGV)).split("Mean ±")[0]


def test_runs_under_another_protocol_are_another_row_not_more_seeds():
    # A record made before a protocol field existed counts as its default (precision fp32).
    default = [*seeds("naive", [0.50, 0.52]),
               make_record("split", "task", "naive", 2, R_with_acc(0.54),
                           protocol={"precision": "fp32"})]
    bf16 = seeds("naive", [0.70, 0.72], protocol={"precision": "bf16"})
    longer = seeds("naive", [0.90], protocol={"epochs": 4.0})
    summary = summarize(default + bf16 + longer)
    rows = dict(zip(labels(summary), zip(summary["seeds"], summary["acc"], strict=True),
                    strict=True))
    assert rows.keys() == {"naive (epochs=1.0, precision=fp32)",
                           "naive (epochs=1.0, precision=bf16)",
                           "naive (epochs=4.0, precision=fp32)"}
    assert rows["naive (epochs=1.0, precision=fp32)"] == (3, pytest.approx(52.0))
    assert rows["naive (epochs=1.0, precision=bf16)"] == (2, pytest.approx(71.0))
    # A strategy run under one protocol only keeps its bare name.
    assert labels(summarize(default)) == ["naive"]


def test_rows_are_labelled_by_the_hyperparameters_that_differ_only():
    fixed = {"fisher": "sampled", "fisher_batch": 1, "fisher_samples": 1024}
    records = [*seeds("ewc", [0.6, 0.62], hparams={**fixed, "lam": 10.0}),
               *seeds("ewc", [0.7], hparams={**fixed, "lam": 1000.0}),
               *seeds("naive", [0.5])]
    composed = seeds("ewc+replay", [0.8, 0.9])
    for record, lam in zip(composed, (10.0, 100.0), strict=True):
        record.config["hparams"] = {"ewc": {**fixed, "lam": lam}, "replay": {"memory": 200}}
    plus = seeds("der++", [0.8, 0.9])  # one strategy, though its name has a '+'
    for record, alpha in zip(plus, (0.3, 1.0), strict=True):
        record.config["hparams"] = {"der++": {"alpha": alpha, "beta": 0.5}}
    assert sorted(labels(summarize(records + composed + plus))) == [
        "der++ (alpha=0.3)", "der++ (alpha=1.0)", "ewc (lam=10.0)", "ewc (lam=1000.0)",
        "ewc+replay (ewc.lam=10.0)", "ewc+replay (ewc.lam=100.0)", "naive"]


def tune_selection(chosen: dict[str, Any]) -> dict[str, Any]:
    """What `cfbench tune` writes into a reported record (`cfbench.tune.selection_entry`)."""
    return {"by": "cfbench tune", "criterion": "final ACC on validation", "candidates": 3,
            "chosen": chosen, "validation_acc": 0.9, "tuning_seeds": [5],
            "validation": {"fraction": 0.2, "seed": 0, "tasks": None}}


def test_rows_whose_values_tune_chose_are_labelled_tuned():
    """A table holding a strategy's defaults and its tuned values tells the rows apart: the
    tuned one says so; a strategy whose every row is tuned (as in a reference table) carries
    no marker, since there is nothing to tell apart."""
    default = seeds("ewc", [0.6, 0.62], hparams={"lam": 1000.0})
    tuned = seeds("ewc", [0.7, 0.72], hparams={"lam": 100.0})
    only_tuned = seeds("lwf", [0.65])
    for record in tuned:
        record.selection = tune_selection({"lam": 100.0})
    only_tuned[0].selection = tune_selection({"alpha": 1.0})
    records = default + tuned + only_tuned + seeds("naive", [0.5])
    summary = summarize(records)
    assert sorted(labels(summary)) == ["ewc (lam=100.0, tuned)", "ewc (lam=1000.0)",
                                       "lwf", "naive"]
    # The summary leaves out the value tune chose, and still tells the tuned row apart.
    assert sorted(labels(summary, tuned_values=False)) == ["ewc (lam=1000.0)", "ewc (tuned)",
                                                           "lwf", "naive"]
    table = render(summary, "md", Provenance.of(records, LEADERBOARD_ARGV))
    assert "| ewc (lam=100.0, tuned) | 71.0 ± " in table and "| ewc (lam=1000.0) | 61.0 ± " in table
