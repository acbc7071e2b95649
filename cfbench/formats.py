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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cfbench.leaderboard import COLUMNS, Provenance, caption

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("text", "md", "csv", "json", "latex", "html")
EXTENSIONS = {"text": "txt", "md": "md", "csv": "csv", "json": "json", "latex": "tex",
              "html": "html"}
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


def cell(row: Mapping, column: str) -> str:
    """The mean ± its CI half-width (the mean alone with one seed); undefined is an em dash."""
    mean, ci = row[column], row[f"{column} ci"]
    digits = COLUMNS[column][2]
    if mean != mean:
        return "—"
    if ci == ci:
        return f"{mean:.{digits}f} ± {ci:.{digits}f}"
    return f"{mean:.{digits}f}"


def labels(summary: pd.DataFrame) -> list[str]:
    """Strategy names, with what tells one strategy's rows in a table apart: all its
    hyperparameters where they differ, and the protocol fields that differ."""
    out: dict[object, str] = {}
    for _, rows in summary.groupby(["scenario", "setting", "strategy"]):
        protocols = [json.loads(p) for p in rows["protocol"]]
        differ = sorted(k for k in set().union(*protocols)
                        if len({json.dumps(p.get(k)) for p in protocols}) > 1)
        for (i, row), protocol in zip(rows.iterrows(), protocols, strict=True):
            parts = [f"{k}={v}" for part in json.loads(row["hparams"]).values()
                     for k, v in part.items()] if rows["hparams"].nunique() > 1 else []
            parts += [f"{k}={protocol.get(k)}" for k in differ]
            out[i] = row["strategy"] + (f" ({', '.join(parts)})" if parts else "")
    return [out[i] for i in summary.index]


def blocks(summary: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(scenario, setting, rows) per table, rows sorted by mean ACC, best first."""
    summary = summary.assign(label=labels(summary))
    for (scenario, setting), block in summary.groupby(["scenario", "setting"], sort=True):
        yield scenario, setting, block.sort_values("acc", ascending=False)


def _header(columns: Sequence[str]) -> list[str]:
    return ["strategy", *(COLUMNS[c][0] for c in columns), "seeds", "rank"]


def _row(row: Mapping, columns: Sequence[str]) -> list[str]:
    return [row["label"], *(cell(row, c) for c in columns), str(row["seeds"]), row["rank"]]


def render_text(summary: pd.DataFrame, provenance: Provenance, convention: str) -> str:
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    # No markup, emoji codes or highlighting: a name like "[/]" or ":x:" is printed as it is.
    console = Console(file=buffer, width=200, color_system=None, markup=False, emoji=False,
                      highlight=False)
    columns = _shown(summary)
    for scenario, setting, block in blocks(summary):
        table = Table(title=one_line(f"{scenario} — {setting} setting"), title_justify="left")
        for i, name in enumerate(_header(columns)):
            table.add_column(name, justify="left" if i == 0 else "right")
        for _, row in block.iterrows():
            table.add_row(*map(one_line, _row(row, columns)))
        console.print(table)
    console.print(caption(convention), soft_wrap=True)
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
        out.append("")
    out += [caption(convention), ""]
    out += [f"- {_md(line)}" for line in provenance.lines()]
    return "\n".join(out) + "\n"


def _csv_cell(value: object) -> object:
    """Text on one line, and prefixed with ' where a spreadsheet would run it as a formula."""
    if not isinstance(value, str):
        return value
    text = one_line(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def render_csv(summary: pd.DataFrame, provenance: Provenance, convention: str) -> str:
    comments = "".join(f"# {one_line(line)}\n"
                       for line in [*provenance.lines(), caption(convention)])
    text = {c: summary[c].map(_csv_cell) for c in summary if summary[c].dtype.kind not in "biufc"}
    return comments + summary.assign(**text).to_csv(index=False)


def render_json(summary: pd.DataFrame, provenance: Provenance, convention: str) -> str:
    rows = json.loads(summary.to_json(orient="records"))
    return json.dumps({"convention": convention, "caption": caption(convention),
                       "provenance": provenance.to_dict(), "rows": rows}, indent=1,
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
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1200px;color:#1d1d1f;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.3rem;margin-top:2.5rem;border-bottom:1px solid #ddd}
h3{font-size:1.05rem;margin-top:1.5rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{padding:.3rem .6rem;text-align:right;border-bottom:1px solid #eee;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{cursor:pointer;background:#f5f5f7;user-select:none}th:hover{background:#e8e8ed}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
tr.best td{font-weight:600}tr.tied td{font-style:italic}
.caption,.prov{font-size:.85rem;color:#555;max-width:900px}
nav a{margin-right:1rem}
figure{margin:1rem 1rem 1rem 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
"""

# Sorts a table by the clicked column, numerically by each cell's data-v, toggling direction.
_JS = """
document.querySelectorAll('table.board').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _sort_value(row: Mapping, column: str) -> str:
    value = row[column]
    return "" if value != value else repr(float(value))


def render_html(summary: pd.DataFrame, provenance: Provenance, convention: str,
                plots: Mapping[tuple[str, str], Sequence[Path]] | None = None) -> str:
    """One page: a section per scenario, a sortable table per setting, its plots inline."""
    columns = _shown(summary)

    def esc(text: str) -> str:
        return html.escape(one_line(text))

    by_scenario: dict[str, list[str]] = {}
    for scenario, setting, block in blocks(summary):
        parts = [f"<h3>{esc(setting)} setting</h3>", "<table class='board'><thead><tr>"]
        parts += [f"<th>{esc(h)}</th>" for h in _header(columns)]
        parts.append("</tr></thead><tbody>")
        for _, row in block.iterrows():
            cells = [f"<td data-v='{esc(row['label'])}'>{esc(row['label'])}</td>"]
            cells += [f"<td data-v='{_sort_value(row, c)}'>{esc(cell(row, c))}</td>"
                      for c in columns]
            cells += [f"<td data-v='{row['seeds']}'>{row['seeds']}</td>",
                      f"<td data-v='{esc(row['rank'])}'>{esc(row['rank'])}</td>"]
            parts.append(f"<tr class='{esc(row['rank'])}'>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        for path in (plots or {}).get((scenario, setting), []):
            data = base64.b64encode(Path(path).read_bytes()).decode()
            parts.append(f"<figure><img alt='{esc(Path(path).stem)}' "
                         f"src='data:image/png;base64,{data}'><figcaption>"
                         f"{esc(Path(path).stem)}</figcaption></figure>")
        by_scenario.setdefault(scenario, []).extend(parts)
    nav = " ".join(f"<a href='#{esc(s)}'>{esc(s)}</a>" for s in by_scenario)
    sections = "".join(f"<section id='{esc(s)}'><h2>{esc(s)}</h2>{''.join(p)}</section>"
                       for s, p in by_scenario.items())
    prov = "".join(f"<li>{esc(line)}</li>" for line in provenance.lines())
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>cfbench leaderboard</title><style>{_CSS}</style></head><body>"
            f"<h1>cfbench leaderboard</h1><nav>{nav}</nav>{sections}"
            f"<p class='caption'>{esc(caption(convention))} Click a column header to sort.</p>"
            f"<ul class='prov'>{prov}</ul><script>{_JS}</script></body></html>\n")


RENDERERS = {"text": render_text, "md": render_md, "csv": render_csv, "json": render_json,
             "latex": render_latex}


def render(summary: pd.DataFrame, fmt: str, provenance: Provenance, convention: str = "cfbench",
           plots: Mapping[tuple[str, str], Sequence[Path]] | None = None) -> str:
    if fmt == "html":
        return render_html(summary, provenance, convention, plots)
    return RENDERERS[fmt](summary, provenance, convention)

