"""A leaderboard summary rendered as a terminal table, Markdown, CSV, JSON, LaTeX or HTML.

Every format carries the caption (conventions, the tie test) and the provenance. The HTML page
is self-contained: inline CSS and JavaScript, plots embedded as data URIs, no network needed.

Text from records (names, hyperparameters, commands) may be anything a file can hold, so it is
made inert here, in one place per concern: `one_line` writes control characters as escapes (no
field ends a line, a TeX comment or a CSV row, or drives a terminal), each format escapes its
own special characters, and `file_stem` makes a file name that cannot leave its folder.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cfbench.leaderboard import (
    COLUMNS,
    COSTS,
    LEGEND,
    LOWER_IS_BETTER,
    MEAN_CI,
    Provenance,
    caption,
    conventions,
    records_frame,
)

if TYPE_CHECKING:
    import pandas as pd

    from cfbench.plots import Figure
    from cfbench.records import RunRecord

FORMATS = ("text", "md", "summary", "csv", "json", "latex", "html")
EXTENSIONS = {"text": "txt", "md": "md", "summary": "summary.md", "csv": "csv", "json": "json",
              "latex": "tex", "html": "html"}
SHOWN = ["acc", "bwt", "fwt", "fm", "rem", "rem_source", "acc_target", "la",
         "source_ppl_before", "source_ppl_after", "source_logppl_increase", "target_ppl_before",
         "target_ppl_after", "train_seconds",
         "peak_rss_mb", "peak_gpu_mb", "train_gflops", "state_mb"]


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069"
                      "\ud800-\udfff]")
"""Control characters, line and paragraph separators, bidirectional overrides, lone surrogates."""
_NOT_IN_STEM = re.compile(r"[^A-Za-z0-9._+-]+")


def one_line(text: object) -> str:
    """`text` with every control character written as its escape sequence (a newline as
    ``\\n``), so that text from a record stays on its line and cannot steer a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))


def file_stem(*parts: str) -> str:
    """A file name from `parts` (joined by '-') that names a file in its folder and nowhere
    else: runs of characters other than letters, digits and ``._+-`` become '_', a leading '.'
    or '-' goes, the length is capped, and a hash of the parts is appended when anything
    changed, so two different names never share a file."""
    text = "-".join(parts)
    stem = _NOT_IN_STEM.sub("_", text).lstrip(".-")[:100] or "_"
    if stem == text:
        return stem
    return f"{stem}-{hashlib.sha256(text.encode(errors='surrogatepass')).hexdigest()[:12]}"


def _shown(summary: pd.DataFrame) -> list[str]:
    return [c for c in SHOWN if summary[c].notna().any()]


def number(value: float | None, column: str) -> str:
    """`value` as the tables print `column` (its decimals); undefined is an em dash."""
    if value is None or value != value:
        return "—"
    return f"{value:.{COLUMNS[column][2]}f}"


def cell(row: Mapping, column: str) -> str:
    """The mean ± its CI half-width (the mean alone with one seed); undefined is an em dash."""
    mean, ci = row[column], row[f"{column} ci"]
    if mean == mean and ci == ci:
        return f"{number(mean, column)} ± {number(ci, column)}"
    return number(mean, column)


_COSTS = ("train_seconds", "peak_rss_mb", "peak_gpu_mb", "train_gflops", "state_mb")


def record_summary(record: RunRecord) -> tuple[str, str]:
    """A successful run's metrics and costs, each named, scaled and rounded as the tables
    show it, plus what only a record holds (evaluation seconds, optimizer steps, the RMS
    change of the parameters): ``("ACC 60.0%, BWT -49.6%, ...", "train s 9.8, ...")``."""
    row = records_frame([record]).iloc[0]
    shown = [c for c in SHOWN if row[c] == row[c]]
    unit = {"%": "%", "nats": " nats"}
    metrics = [f"{COLUMNS[c][0]} {number(row[c], c)}{unit.get(COLUMNS[c][1], '')}"
               for c in shown if c not in _COSTS]
    metrics.append(f"drift {record.metrics.get('drift', float('nan')):.4g}")
    costs = [f"{COLUMNS[c][0]} {number(row[c], c)}" for c in shown if c in _COSTS]
    costs += [f"eval s {number(record.cost.get('eval_seconds'), 'train_seconds')}",
              f"steps {record.cost.get('steps', '—')}"]
    return ", ".join(metrics), ", ".join(costs)


def labels(summary: pd.DataFrame, tuned_values: bool = True) -> list[str]:
    """Strategy names, with what tells one strategy's rows in a table apart: the
    hyperparameters and the protocol fields whose values differ among them (``ewc (lam=10)``;
    a part of a composition names its owner, ``ewc+replay (ewc.lam=10)``), and, where a table
    holds a strategy both with values `cfbench tune` chose and without, "tuned" on the former
    (``ewc (lam=10, tuned)``). Without `tuned_values`, the values tune chose are left out, so
    that one strategy's rows keep one name across tables that chose differently
    (``der (memory=200)``; beside its defaults, ``ewc (tuned)`` and ``ewc (lam=1000.0)``)."""
    out: dict[object, str] = {}
    for _, rows in summary.groupby(["scenario", "setting", "strategy"]):
        hparams = [{(owner, k): v for owner, part in json.loads(h).items()
                    for k, v in part.items()} for h in rows["hparams"]]
        protocols = [json.loads(p) for p in rows["protocol"]]
        differ_h, differ_p = _differing(hparams), _differing(protocols)
        differ_tuned = rows["tuned"].nunique() > 1
        strategy = rows["strategy"].iloc[0]
        names = {(owner, k): k if owner == strategy else f"{owner}.{k}" for owner, k in differ_h}
        for i, own, protocol, tuned, keys in zip(rows.index, hparams, protocols, rows["tuned"],
                                                 rows["tuned_keys"], strict=True):
            hidden = set() if tuned_values else set(json.loads(keys))
            parts = [f"{names[key]}={own.get(key)}" for key in differ_h
                     if names[key] not in hidden]
            parts += [f"{k}={protocol.get(k)}" for k in differ_p
                      if k not in hidden and k.removeprefix("option.") not in hidden]
            parts += ["tuned"] if tuned and differ_tuned else []
            out[i] = strategy + (f" ({', '.join(parts)})" if parts else "")
    return [out[i] for i in summary.index]


def _differing(values: Sequence[Mapping]) -> list:
    """The keys, sorted, whose value is not the same in every mapping (missing = None)."""
    return sorted(k for k in set().union(*values)
                  if len({json.dumps(v.get(k)) for v in values}) > 1)


def blocks(summary: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(scenario, setting, rows) per table, rows sorted by mean ACC, best first."""
    summary = summary.assign(label=labels(summary))
    for (scenario, setting), block in summary.groupby(["scenario", "setting"], sort=True):
        yield scenario, setting, block.sort_values("acc", ascending=False)


def not_run(summary: pd.DataFrame, scenario: str, setting: str) -> str | None:
    """A sentence naming the strategies with runs in other settings of `scenario` but none in
    `setting` (a strategy that does not apply there, or was not run), so a table never drops
    one silently; None when there is none."""
    of_scenario = summary[summary["scenario"] == scenario]
    here = set(of_scenario.loc[of_scenario["setting"] == setting, "strategy"])
    missing = sorted(set(of_scenario["strategy"]) - here)
    if not missing:
        return None
    return (f"Not run in the {setting} setting (runs in other settings of {scenario}): "
            f"{', '.join(missing)}.")


def _header(columns: Sequence[str]) -> list[str]:
    return ["strategy", *(COLUMNS[c][0] for c in columns), "seeds", "rank"]


def _row(row: Mapping, columns: Sequence[str]) -> list[str]:
    return [row["label"], *(cell(row, c) for c in columns), str(row["seeds"]), row["rank"]]


FILE_WIDTH = 200
"""Characters per line of the text format where no terminal sets the width (a file, a pipe)."""


def terminal_width() -> int:
    """The width to print the text format at: $COLUMNS, else the terminal's, else FILE_WIDTH."""
    return shutil.get_terminal_size((FILE_WIDTH, 24)).columns


def _fold(columns: Sequence[str], fits: Callable[[list[str], int], bool]) -> list[list[str]]:
    """`columns` as one table if it fits, else in consecutive parts, each holding what
    `fits(part, index)` allows (one column at least); costs begin a part of their own."""
    if fits(list(columns), 0):
        return [list(columns)]
    parts: list[list[str]] = []
    for group in ([c for c in columns if c not in COSTS], [c for c in columns if c in COSTS]):
        part: list[str] = []
        for column in group:
            if part and not fits([*part, column], len(parts)):
                parts.append(part)
                part = []
            part.append(column)
        if part:
            parts.append(part)
    return parts


def _text_tables(title: str, block: pd.DataFrame, columns: Sequence[str], console) -> list:
    """One block as rich tables no wider than `console`: the strategy, `columns`, seeds and
    rank in one table if it fits, else the columns that do not fit in further tables."""
    from rich.measure import Measurement
    from rich.table import Table

    def table(part: list[str], index: int) -> Table:
        end = None if index == 0 else -2  # seeds and rank in the first table only
        more = "" if index == 0 else " (costs)" if set(part) <= set(COSTS) else " (more)"
        out = Table(title=one_line(title + more), title_justify="left")
        for i, name in enumerate(_header(part)[:end]):
            out.add_column(name, justify="left" if i == 0 else "right")
        for _, row in block.iterrows():
            out.add_row(*map(one_line, _row(row, part)[:end]))
        return out

    unbounded = console.options.update_width(10**6)  # measure the width a table wants

    def fits(part: list[str], index: int) -> bool:
        return Measurement.get(console, unbounded, table(part, index)).maximum <= console.width

    return [table(part, index) for index, part in enumerate(_fold(columns, fits))]


def render_text(summary: pd.DataFrame, provenance: Provenance, convention: str,
                width: int = FILE_WIDTH) -> str:
    """A table per scenario and setting, at most `width` characters wide (columns that do not
    fit go to further tables, the costs first)."""
    from rich.console import Console

    buffer = io.StringIO()
    # No markup, emoji codes or highlighting: a name like "[/]" or ":x:" is printed as it is.
    console = Console(file=buffer, width=width, color_system=None, markup=False, emoji=False,
                      highlight=False)
    columns = _shown(summary)
    for scenario, setting, block in blocks(summary):
        for table in _text_tables(f"{scenario} — {setting} setting", block, columns, console):
            console.print(table)
        absent = not_run(summary, scenario, setting)
        if absent:
            console.print(absent)
    console.print(caption(convention))
    for line in provenance.lines():
        console.print(one_line(line), soft_wrap=True)
    return buffer.getvalue()


_MD = re.compile(r"[\\`*|<>\[\]$~]")


def _md(text: str) -> str:
    """Text from a record as Markdown shows it literally: one line, and no table cell break,
    HTML, code span, link, emphasis or maths."""
    return _MD.sub(r"\\\g<0>", one_line(text))


def render_md(summary: pd.DataFrame, provenance: Provenance, convention: str) -> str:
    columns = _shown(summary)
    out = []
    for scenario, setting, block in blocks(summary):
        header = _header(columns)
        out += [f"### {_md(scenario)} — {_md(setting)} setting", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(map(_md, _row(row, columns))) + " |"
                for _, row in block.iterrows()]
        absent = not_run(summary, scenario, setting)
        out += ["", _md(absent)] if absent else []
        out.append("")
    out += [caption(convention), ""]
    out += [f"- {_md(line)}" for line in provenance.lines()]
    return "\n".join(out) + "\n"


def render_summary(summary: pd.DataFrame, provenance: Provenance, convention: str) -> str:
    """One Markdown table for a README: a row per strategy, a column per scenario and setting,
    each cell ACC ± CI and its place in that column (``#1`` best, "tied" where the Welch test
    cannot tell it from the best), "n=k" where it has fewer seeds than the most any row has,
    "—" where the strategy has no runs; rows by mean place. A row is named without the values
    tune chose, which differ from column to column; where that name would not be unique in a
    column, the full names are used."""
    summary = summary.assign(row=labels(summary, tuned_values=False))
    most_seeds = summary["seeds"].max()
    columns, places, cells = [], {}, {}
    for scenario, setting, block in blocks(summary):
        column = f"{scenario} {setting}"
        columns.append(column)
        shared = block["row"].duplicated(keep=False)
        for place, (_, row) in enumerate(block.iterrows(), start=1):
            name = row["label"] if shared[row.name] else row["row"]
            tied = ", tied" if row["rank"] == "tied" else ""
            few = f", n={row['seeds']}" if row["seeds"] < most_seeds else ""
            cells[name, column] = f"{cell(row, 'acc')} (#{place}{tied}{few})"
            places.setdefault(name, []).append(place)
    order = sorted(places, key=lambda name: (sum(places[name]) / len(places[name]), name))
    out = ["| strategy | " + " | ".join(map(_md, columns)) + " |",
           "|---|" + "---|" * len(columns)]
    out += ["| " + " | ".join([_md(name), *(cells.get((name, c), "—") for c in columns)])
            + " |" for name in order]
    out += ["", f"ACC in % after the last task. {MEAN_CI} #k = place by mean ACC in its column. "
            f"{conventions(convention)} Rows by mean place over the columns the strategy ran "
            "in; — = no runs in that scenario and setting."
            + (" The values `cfbench tune` chose for each cell are in the full tables."
               if summary["tuned"].any() else ""), ""]
    out += [f"- {_md(line)}" for line in provenance.lines(choices=False)]
    return "\n".join(out) + "\n"


def _csv_cell(value: object) -> object:
    """Text on one line, and prefixed with ' where a spreadsheet would run it as a formula."""
    if not isinstance(value, str):
        return value
    text = one_line(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def render_csv(summary: pd.DataFrame, provenance: Provenance, convention: str) -> str:
    """The header and one row per configuration, nothing else, so that any CSV reader opens it
    with no options; the caption and provenance go beside it (`render_meta`)."""
    text = {c: summary[c].map(_csv_cell) for c in summary if summary[c].dtype.kind not in "biufc"}
    return summary.assign(**text).to_csv(index=False)


def metadata(provenance: Provenance, convention: str) -> dict[str, Any]:
    """What a table's numbers mean and where they came from: the head of the JSON format, and
    all of leaderboard.meta.json, the sidecar of a CSV."""
    return {"convention": convention, "caption": caption(convention),
            "provenance": provenance.to_dict()}


def render_meta(provenance: Provenance, convention: str) -> str:
    return json.dumps(metadata(provenance, convention), indent=1, allow_nan=False) + "\n"


def render_json(summary: pd.DataFrame, provenance: Provenance, convention: str) -> str:
    rows = json.loads(summary.to_json(orient="records"))
    return json.dumps({**metadata(provenance, convention), "rows": rows}, indent=1,
                      allow_nan=False) + "\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#",
          "{": r"\{", "}": r"\}", "$": r"\$", "±": r"$\pm$", "—": "--", ">": r"$>$",
          "<": r"$<$", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}"}
"""TeX's special characters ("^^5c" would be a backslash), written as text."""


def _latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in one_line(text))


def render_latex(summary: pd.DataFrame, provenance: Provenance, convention: str) -> str:
    """booktabs tables, one per scenario and setting; the best row bold, tied rows italic."""
    columns = _shown(summary)
    out = [f"% {one_line(line)}" for line in provenance.lines()]
    out.append("% requires \\usepackage{booktabs}")
    for scenario, setting, block in blocks(summary):
        header = _header(columns)[:-1]
        title = _latex_escape(f"{scenario}, {setting} setting. {caption(convention)}")
        out += ["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{title}}}",
                "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
                " & ".join(_latex_escape(h) for h in header) + " \\\\", "\\midrule"]
        for _, row in block.iterrows():
            cells = [_latex_escape(c) for c in _row(row, columns)[:-1]]
            if row["rank"] == "best":
                cells = [f"\\textbf{{{c}}}" for c in cells]
            elif row["rank"] == "tied":
                cells = [f"\\textit{{{c}}}" for c in cells]
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        absent = not_run(summary, scenario, setting)
        out += [f"\\par\\smallskip{{\\footnotesize {_latex_escape(absent)}}}"] if absent else []
        out += ["\\end{table}", ""]
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1200px;color:#1d1d1f;padding:0 1rem;overflow-wrap:break-word}
h1{font-size:1.6rem}h2{font-size:1.3rem;margin-top:2.5rem;border-bottom:1px solid #ddd}
h3{font-size:1.05rem;margin-top:1.5rem}
nav ul{padding-left:1.2rem}
dl.legend{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;font-size:.9rem}
dl.legend dt{font-weight:600}dl.legend dd{margin:0}
.scroll{overflow-x:auto;max-width:100%;margin:.5rem 0 1rem}
.scroll:focus-visible{outline:2px solid #0a58ca}
table{border-collapse:separate;border-spacing:0;font-size:.9rem}
th,td{padding:.3rem .6rem;text-align:right;border-bottom:1px solid #eee;white-space:nowrap;
background:#fff}
thead th{background:#f5f5f7}thead th:hover{background:#e8e8ed}tbody th{font-weight:normal}
th:first-child,td:first-child{position:sticky;left:0;z-index:1;text-align:left;
white-space:normal;min-width:9rem;box-shadow:inset -1px 0 #ddd}
th button{font:inherit;font-weight:600;color:inherit;background:none;border:0;padding:0;
cursor:pointer}
th button:focus-visible{outline:2px solid #0a58ca;outline-offset:2px}
th[aria-sort=ascending] button::after{content:" ▲"}
th[aria-sort=descending] button::after{content:" ▼"}
tr.best>*{font-weight:600}tr.tied>*{font-style:italic}
.caption,.prov{font-size:.85rem;color:#555;max-width:900px}
figure{margin:1rem 1rem 1rem 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555;max-width:60rem}
"""

# Sorts a board by a header's button, numerically by each cell's data-v: the first press puts
# the best first (the header's data-first order), the next reverses it; empty cells stay last.
_JS = """
document.querySelectorAll('table.board').forEach(function (table) {
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  headers.forEach(function (th, col) {
    th.querySelector('button').addEventListener('click', function () {
      var now = th.getAttribute('aria-sort');
      var order = now === 'descending' ? 'ascending'
        : now === 'ascending' ? 'descending' : th.dataset.first;
      headers.forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', order);
      var sign = order === 'ascending' ? 1 : -1;
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (x === '' || y === '') { return (x === '') - (y === ''); }
        var nx = Number(x), ny = Number(y);
        return sign * ((isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""
_RANK_ORDER = {"best": 0, "tied": 1, "": 2}
_FIGURE_SCALE = 0.8
"""CSS pixels per PNG pixel (the PNG header's width and height): every figure's text comes out
the same size on the page, whichever figure is wider."""


def _sort_value(value: float) -> str:
    """A cell's sort key as JavaScript's Number reads it ('Infinity' for a diverged run)."""
    return "" if value != value else json.dumps(float(value))


def _html_header(columns: Sequence[str]) -> str:
    """A header row of buttons; `data-first` is the order that puts the best first."""
    first = {"strategy": "ascending", "seeds": "descending", "rank": "ascending",
             **{c: "ascending" if c in LOWER_IS_BETTER else "descending" for c in columns}}
    cells = []
    for key, name in zip(["strategy", *columns, "seeds", "rank"], _header(columns), strict=True):
        sort = " aria-sort='descending'" if key == "acc" else ""  # blocks() sorts by ACC
        cells.append(f"<th scope='col' data-first='{first[key]}'{sort}><button type='button'>"
                     f"{html.escape(name)}</button></th>")
    return "<thead><tr>" + "".join(cells) + "</tr></thead>"


def _html_legend(columns: Sequence[str]) -> str:
    """What each shown column means, and which way is better."""
    items = [(COLUMNS[c][0], f"{LEGEND[c]}; {'lower' if c in LOWER_IS_BETTER else 'higher'} "
              "is better") for c in columns]
    items += [("seeds", "runs averaged, one per seed"),
              ("rank", "best: highest mean ACC of its table; tied: not distinguishable from the "
                       "best (see below)")]
    return "<dl class='legend'>" + "".join(f"<dt>{html.escape(term)}</dt><dd>"
                                           f"{html.escape(text)}</dd>"
                                           for term, text in items) + "</dl>"


def render_html(summary: pd.DataFrame, provenance: Provenance, convention: str,
                plots: Mapping[tuple[str, str], Sequence[Figure]] | None = None) -> str:
    """One page: links to every table, the metrics' legend, then a section per scenario with a
    sortable table per setting (scrolling sideways on its own) and its figures."""
    columns = _shown(summary)

    def esc(text: str) -> str:
        return html.escape(one_line(text))

    by_scenario: dict[str, list[str]] = {}
    links: dict[str, list[str]] = {}
    for scenario, setting, block in blocks(summary):
        anchor = "t-" + file_stem(scenario, setting)  # letters, digits and ._+- only
        links.setdefault(scenario, []).append(f"<a href='#{anchor}'>{esc(setting)} setting</a>")
        parts = [f"<h3 id='{anchor}'>{esc(setting)} setting</h3>",
                 f"<div class='scroll' role='region' tabindex='0' aria-labelledby='{anchor}'>"
                 f"<table class='board'>{_html_header(columns)}<tbody>"]
        for _, row in block.iterrows():
            cells = [f"<th scope='row' data-v='{esc(row['label'])}'>{esc(row['label'])}</th>"]
            cells += [f"<td data-v='{_sort_value(row[c])}'>{esc(cell(row, c))}</td>"
                      for c in columns]
            cells += [f"<td data-v='{row['seeds']}'>{row['seeds']}</td>",
                      f"<td data-v='{_RANK_ORDER[row['rank']]}'>{esc(row['rank'])}</td>"]
            parts.append(f"<tr class='{esc(row['rank'])}'>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table></div>")
        absent = not_run(summary, scenario, setting)
        parts += [f"<p class='caption'>{esc(absent)}</p>"] if absent else []
        for figure in (plots or {}).get((scenario, setting), []):
            png = figure.png.read_bytes()
            width, height = (round(_FIGURE_SCALE * n) for n in struct.unpack(">II", png[16:24]))
            parts.append(f"<figure><img alt='{esc(figure.title)}' width='{width}' "
                         f"height='{height}' src='data:image/png;base64,"
                         f"{base64.b64encode(png).decode()}'><figcaption><b>"
                         f"{esc(figure.title)}.</b> {esc(figure.caption)}</figcaption></figure>")
        by_scenario.setdefault(scenario, []).extend(parts)
    nav = "".join(f"<li><a href='#s-{file_stem(s)}'>{esc(s)}</a> — {' · '.join(links[s])}</li>"
                  for s in by_scenario)
    sections = "".join(f"<section id='s-{file_stem(s)}'><h2>{esc(s)}</h2>{''.join(p)}</section>"
                       for s, p in by_scenario.items())
    prov = "".join(f"<li>{esc(line)}</li>" for line in provenance.lines())
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>cfbench leaderboard</title><style>{_CSS}</style></head><body>"
            f"<h1>cfbench leaderboard</h1><nav aria-label='tables'><ul>{nav}</ul></nav>"
            f"<section id='legend'><h2>Reading the tables</h2>{_html_legend(columns)}"
            f"<p class='caption'>{MEAN_CI} Accuracies in %. {esc(conventions(convention))} A "
            "click on a column header (or Enter on it) sorts the table best first; another "
            "reverses it.</p></section>"
            f"{sections}<h2>Provenance</h2><ul class='prov'>{prov}</ul>"
            f"<script>{_JS}</script></body></html>\n")


RENDERERS = {"md": render_md, "summary": render_summary, "csv": render_csv, "json": render_json,
             "latex": render_latex}


def render(summary: pd.DataFrame, fmt: str, provenance: Provenance, convention: str = "cfbench",
           plots: Mapping[tuple[str, str], Sequence[Figure]] | None = None,
           width: int = FILE_WIDTH) -> str:
    """`summary` in format `fmt`; `width` is the text format's (`terminal_width()` to print)."""
    if fmt == "html":
        return render_html(summary, provenance, convention, plots)
    if fmt == "text":
        return render_text(summary, provenance, convention, width)
    return RENDERERS[fmt](summary, provenance, convention)

