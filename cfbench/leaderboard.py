"""Leaderboard tables aggregated over seeds from run records.

Accuracy-type metrics are shown in % (R holds [0, 1]); REM is already a percentage.
Conventions: BWT/FWT divide by T-1, FM takes the max over rows 1..T-1 (see cfbench.metrics).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cfbench.records import RunRecord

if TYPE_CHECKING:
    import pandas as pd

METRIC_COLUMNS = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "fm": "FM", "rem": "REM",
                  "la": "LA"}
COST_COLUMNS = {"train_seconds": "train s", "eval_seconds": "eval s",
                "peak_rss_bytes": "peak RSS MB", "peak_gpu_bytes": "peak GPU MB",
                "state_bytes": "state MB"}
GROUP = ["scenario", "setting", "strategy"]
FORMATS = ("text", "md", "csv", "json")


def records_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """One row per successful run: config keys, metrics (in %) and costs (MB, seconds)."""
    import pandas as pd

    rows = []
    for r in records:
        if r.status != "ok":
            continue
        row = {"scenario": r.config["scenario"], "setting": r.config["setting"],
               "strategy": r.config["strategy"], "seed": r.config["seed"]}
        for key, name in METRIC_COLUMNS.items():
            value = r.metrics.get(key, float("nan"))
            row[name] = value if key == "rem" else 100.0 * value
        for key, name in COST_COLUMNS.items():
            value = r.cost.get(key)
            row[name] = (float("nan") if value is None
                         else value / 2**20 if name.endswith("MB") else value)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*GROUP, "seed", *METRIC_COLUMNS.values(),
                                       *COST_COLUMNS.values()])


def summarize(records: Iterable[RunRecord]) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (scenario, setting, strategy)."""
    frame = records_frame(records)
    values = [c for c in frame.columns if c not in (*GROUP, "seed")]
    grouped = frame.groupby(GROUP, sort=True)
    out = grouped[values].mean()
    std = grouped[values].std(ddof=1)
    for c in values:
        out[f"{c} std"] = std[c]
    out["seeds"] = grouped.size()
    return out.reset_index()


def _cell(mean: float, std: float, digits: int) -> str:
    if mean != mean:
        return "—"
    if std == std:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def render(summary: pd.DataFrame, fmt: str = "text") -> str:
    """The summary as a terminal table, Markdown, CSV or JSON."""
    if fmt == "csv":
        return summary.to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(summary.to_json(orient="records")), indent=1)
    shown = ["ACC", "BWT", "FWT", "FM", "REM", "train s", "peak RSS MB"]
    if summary["peak GPU MB"].notna().any():
        shown.append("peak GPU MB")
    header = [*GROUP, *shown, "seeds"]
    rows = [[str(r[c]) for c in GROUP]
            + [_cell(r[c], r[f"{c} std"], 1) for c in shown] + [str(r["seeds"])]
            for _, r in summary.iterrows()]
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines) + "\n"


CAPTION = ("ACC, BWT, FWT, FM in % (mean ± std over seeds); REM = % of each old task's accuracy "
           "kept; BWT/FWT divide by T-1; FM max over rows 1..T-1.")
