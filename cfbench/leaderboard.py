"""Leaderboards: run records aggregated over seeds, ranked without over-claiming.

Metrics are recomputed from each record's R under the requested convention (records keep R, so
a table in GEM's or Mammoth's convention needs no rerun). Per configuration (scenario, setting,
strategy, hyperparameters, and the protocol, scenario options and device it ran under): mean,
standard deviation and a 95% Student-t confidence interval over seeds.
Within a (scenario, setting), the strategy with the best mean ACC is marked "best", and every
other one whose per-seed ACC a Welch t-test cannot tell from the best's (p >= 0.05) "tied":
a 0.1-point lead over 3 seeds is not a win.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from cfbench import metrics
from cfbench.protocol import Protocol
from cfbench.records import RunRecord

if TYPE_CHECKING:
    import pandas as pd

GROUP = ["scenario", "setting", "strategy", "hparams", "protocol"]
"""What a run is one seed of. Runs that differ in any of these are different experiments."""
# column -> (label, unit, decimals); accuracy-type metrics in %, costs in natural units.
COLUMNS: dict[str, tuple[str, str, int]] = {
    "acc": ("ACC", "%", 1), "bwt": ("BWT", "%", 1), "fwt": ("FWT", "%", 1),
    "fm": ("FM", "%", 1), "rem": ("REM", "%", 1), "rem_source": ("REM src", "%", 1),
    "acc_target": ("ACC tgt", "%", 1),
    "la": ("LA", "%", 1),
    "source_ppl_before": ("src PPL pre", "", 2), "source_ppl_after": ("src PPL post", "", 2),
    "source_logppl_increase": ("src Δ log PPL", "nats", 3),
    "target_ppl_before": ("tgt PPL pre", "", 2), "target_ppl_after": ("tgt PPL post", "", 2),
    "train_seconds": ("train s", "s", 1), "peak_rss_mb": ("peak RSS MB", "MB", 0),
    "peak_gpu_mb": ("peak GPU MB", "MB", 0), "train_gflops": ("GFLOPs", "GFLOP", 1),
    "state_mb": ("state MB", "MB", 2),
}
COSTS = ("train_seconds", "peak_rss_mb", "peak_gpu_mb", "train_gflops", "state_mb")
"""The columns of COLUMNS that measure what a run cost rather than what it learned."""
LOWER_IS_BETTER = frozenset({
    "fm", "source_ppl_before", "source_ppl_after", "source_logppl_increase",
    "target_ppl_before", "target_ppl_after", *COSTS})
"""Forgetting, perplexities and costs; every other column of COLUMNS is better higher."""
LEGEND: dict[str, str] = {
    "acc": "final accuracy: the mean over all tasks after training on the last one",
    "bwt": "backward transfer: how much later tasks changed each old task's accuracy since it "
           "was learned (negative: forgotten)",
    "fwt": "forward transfer: accuracy on a task before training on it, minus the untrained "
           "model's",
    "fm": "forgetting: each old task's drop from its best accuracy to its final one",
    "rem": "remembering: % of each old task's accuracy (right after learning it) kept at the end",
    "rem_source": "transfer scenarios: % of the pretrained source's accuracy kept at the end",
    "acc_target": "transfer scenarios: final accuracy on the downstream tasks",
    "la": "learning accuracy (plasticity): each task's accuracy right after training on it",
    "source_ppl_before": "the source's held-out perplexity per token before fine-tuning",
    "source_ppl_after": "the source's held-out perplexity per token after fine-tuning",
    "source_logppl_increase": "increase of the source's log-perplexity, nats per token (> 0: "
                              "forgotten)",
    "target_ppl_before": "the downstream tasks' perplexity before fine-tuning",
    "target_ppl_after": "the downstream tasks' perplexity after fine-tuning",
    "train_seconds": "cost: wall-clock seconds of training",
    "peak_rss_mb": "cost: peak memory of the process (resident set)",
    "peak_gpu_mb": "cost: peak GPU memory",
    "train_gflops": "cost: floating-point operations of training, in billions",
    "state_mb": "cost: what the strategy keeps between tasks (buffers, Fisher, teacher copies)",
}
"""What each column means, in words, for a reader of a table (`caption` has the conventions)."""
ALPHA = 0.05


MEAN_CI = "Mean ± 95% CI (Student t) over seeds."


def caption(convention: str) -> str:
    return (f"{MEAN_CI} ACC, BWT, FWT, FM, LA in %; REM = % of each "
            f"old task's accuracy kept; REM src (transfer scenarios) = % of the pretrained "
            f"source's accuracy kept, ACC tgt = final ACC on the downstream tasks; in "
            f"language-model scenarios, src PPL pre/post = the source's held-out perplexity per "
            f"token before/after fine-tuning, src Δ log PPL = its increase in log-perplexity "
            f"(nats per token; > 0 = forgotten), tgt PPL pre/post = the downstream tasks'. "
            f"{conventions(convention)}")


def conventions(convention: str) -> str:
    """The end of every caption: how BWT, FWT and FM were computed, and what 'best' and 'tied'
    claim (the HTML page gives the columns' meanings in `LEGEND` instead of the rest)."""
    divisor = "T" if convention == "gem" else "T-1"
    rows = "1..T" if convention == "mammoth" else "1..T-1"
    return (f"Convention '{convention}': BWT and FWT divide by "
            f"{divisor}, FM takes the max over rows {rows}. 'best' = highest mean ACC in its "
            f"scenario and setting; 'tied' = not distinguishable from it by a two-sided Welch "
            f"t-test on per-seed ACC (p >= {ALPHA}; needs >= 2 seeds on both sides).")


def configuration(record: RunRecord) -> dict[str, str]:
    """The GROUP columns of a run. "protocol" is the full protocol (fields a record predates at
    their defaults), the scenario options and the device, as sorted JSON, so a bf16 run, a
    2-epoch run or a GPU run never counts as another seed of the default one."""
    config = record.config
    # Runs scored on a validation split (cfbench tune) never share a row with test scores.
    scenario = config["scenario"] + (" [validation]" if config.get("validation") else "")
    protocol = {**dataclasses.asdict(Protocol()), **config["protocol"], "device": config["device"],
                **{f"option.{k}": v for k, v in config.get("scenario_options", {}).items()}}
    return {"scenario": scenario, "setting": config["setting"], "strategy": config["strategy"],
            "hparams": json.dumps(config["hparams"], sort_keys=True),
            "protocol": json.dumps(protocol, sort_keys=True)}


def records_frame(records: Iterable[RunRecord], convention: str = "cfbench") -> pd.DataFrame:
    """One row per successful run: config keys, metrics (%, from R), costs, and whether
    `cfbench tune` chose its values (`tuned`: the record carries a selection; `tuned_keys`:
    which)."""
    import pandas as pd

    rows = []
    for r in records:
        if r.status != "ok":
            continue
        m = metrics.all_metrics(r.R, convention)
        c = r.cost
        rows.append({
            **configuration(r), "seed": r.config["seed"],
            **{k: (m[k] if k == "rem" else 100.0 * m[k]) for k in metrics.METRICS},
            **({"rem_source": metrics.transfer_remembering(r.R),
                "acc_target": 100.0 * metrics.target_accuracy(r.R)}
               if "rem_source" in r.metrics else {"rem_source": math.nan, "acc_target": math.nan}),
            **(metrics.language_metrics(r.matrices["loss"])
               if "rem_source" in r.metrics and "loss" in r.matrices
               else dict.fromkeys(metrics.LANGUAGE_METRICS, math.nan)),
            "train_seconds": c.get("train_seconds"),
            "peak_rss_mb": _scaled(c.get("peak_rss_bytes"), 2**20),
            "peak_gpu_mb": _scaled(c.get("peak_gpu_bytes"), 2**20),
            "train_gflops": _scaled(c.get("train_flops"), 1e9),
            "state_mb": _scaled(c.get("state_bytes"), 2**20),
            "tuned": r.selection is not None,
            "tuned_keys": json.dumps(sorted(tuned_keys(r.selection)) if r.selection else []),
        })
    return pd.DataFrame(rows, columns=[*GROUP, "seed", *COLUMNS, "tuned", "tuned_keys"])


def _scaled(value: float | None, unit: float) -> float:
    return math.nan if value is None else value / unit


def confidence_halfwidth(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean; NaN for n < 2."""
    from scipy import stats

    if n < 2 or std != std:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value; NaN when either side has fewer than 2 values.

    Two constant samples are indistinguishable (p = 1) if equal and distinct (p = 0) if not.
    """
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return math.nan
    if max(a) == min(a) and max(b) == min(b):
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarize(records: Iterable[RunRecord], convention: str = "cfbench") -> pd.DataFrame:
    """Per group: `<col>` mean, `<col> std`, `<col> ci` (half-width), `seeds`, `tuned` (any
    of its runs was chosen by `cfbench tune`), `tuned_keys` (a JSON list of the keys tune
    chose among several values), and `rank` ("best", "tied" or "")."""
    frame = records_frame(records, convention)
    grouped = frame.groupby(GROUP, sort=True, dropna=False)
    out = grouped[list(COLUMNS)].mean()
    std = grouped[list(COLUMNS)].std(ddof=1)
    n = grouped.size()
    for c in COLUMNS:
        out[f"{c} std"] = std[c]
        out[f"{c} ci"] = [confidence_halfwidth(s, k) for s, k in zip(std[c], n, strict=True)]
    out["seeds"] = n
    out["tuned"] = grouped["tuned"].any()
    out["tuned_keys"] = grouped["tuned_keys"].max()
    out = out.reset_index()
    per_seed = {key: list(g["acc"]) for key, g in grouped}
    out["rank"] = ""
    for _, block in out.groupby(["scenario", "setting"]):
        best = block["acc"].idxmax()
        out.loc[best, "rank"] = "best"
        best_acc = per_seed[tuple(out.loc[best, GROUP])]
        for i in block.index.drop(best):
            p = welch_p(per_seed[tuple(out.loc[i, GROUP])], best_acc)
            if p == p and p >= ALPHA:
                out.loc[i, "rank"] = "tied"
    return out


def tuned_keys(selection: Mapping[str, Any]) -> list[str]:
    """The keys `cfbench tune` chose among several values (older records, which do not say,
    count every key of their point)."""
    return list(selection.get("grid", selection["chosen"]))


def describe_choice(selection: Mapping[str, Any]) -> str:
    """What was chosen, from which values, the default it replaced and its validation score,
    e.g. ``memory=1000 lam=100 (lam from 10/100/1000, default 1000.0), validation ACC 91.2%
    among 3 candidate(s)``."""
    chosen = " ".join(f"{k}={val}" for k, val in selection["chosen"].items()) or "defaults"
    defaults, grid = selection.get("defaults", {}), selection.get("grid", {})
    notes = []
    for key in tuned_keys(selection):
        note = [f"{key} from {'/'.join(map(str, grid[key]))}"] if key in grid else []
        if key in defaults and defaults[key] != selection["chosen"].get(key):
            note.append(f"default {defaults[key]}" if note else f"default {key}={defaults[key]}")
        notes += [", ".join(note)] if note else []
    if notes:
        chosen += f" ({'; '.join(notes)})"
    return (f"{chosen}, validation ACC {100 * selection['validation_acc']:.1f}% among "
            f"{selection['candidates']} candidate(s)")


def describe_tuning(selection: Mapping[str, Any]) -> str:
    """How the choice was made, shared by every run of one tune: command, criterion, split."""
    v = selection["validation"]
    tasks = "all tasks" if v.get("tasks") is None else f"first {v['tasks']} task(s)"
    return (f"{selection['by']}: {selection['criterion']}; validation = {100 * v['fraction']:g}% "
            f"of each task's training data, per class in classification (split seed "
            f"{v['seed']}), {tasks}; tuning seeds {selection['tuning_seeds']}")


def describe_selection(selection: Mapping[str, Any]) -> str:
    """One line for a single run (`cfbench show`): the choice, then how it was made."""
    return f"{describe_choice(selection)}; chosen by {describe_tuning(selection)}"


@dataclass
class Provenance:
    """Where a table came from: costs compare only on the same hardware and versions."""

    command: str
    generated_at: str
    cfbench: list[str]
    git_sha: list[str]
    torch: list[str]
    devices: list[str]
    threads: list[int]
    run_commands: list[str] = field(default_factory=list)
    tuning: list[str] = field(default_factory=list)
    """How tuned runs' hyperparameters were chosen (``cfbench tune``), one line per protocol."""
    selections: list[str] = field(default_factory=list)
    """What was chosen, one line per scenario, setting and strategy."""

    @classmethod
    def of(cls, records: Sequence[RunRecord], argv: Sequence[str] | None = None) -> Provenance:
        def distinct(key: str) -> list:
            return sorted({r.env.get(key) for r in records if r.env.get(key) is not None},
                          key=str)

        return cls(
            command=shlex.join(["cfbench", *(sys.argv[1:] if argv is None else argv)]),
            generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            cfbench=distinct("cfbench"), git_sha=distinct("git_sha"), torch=distinct("torch"),
            devices=distinct("device_name"), threads=distinct("threads"),
            run_commands=sorted({r.command for r in records if r.command}),
            tuning=sorted({describe_tuning(r.selection) for r in records if r.selection}),
            selections=sorted({f"{r.config['scenario']} {r.config['setting']} "
                               f"{r.config['strategy']}: {describe_choice(r.selection)}"
                               for r in records if r.selection}),
        )

    def lines(self, choices: bool = True) -> list[str]:
        """The provenance, a line each; without `choices`, no "chosen:" line per row (for a
        table that does not show the chosen values)."""
        lines = [f"produced by: {self.command}", f"generated: {self.generated_at} on "
                 f"{platform.node() or 'unknown host'}"]
        lines += [f"runs by: {c}" for c in self.run_commands]
        lines += [f"hyperparameters tuned by {t}" for t in self.tuning]
        lines += [f"chosen: {s}" for s in self.selections] if choices else []
        shas = ", ".join(sha[:10] + ("-dirty" if sha.endswith("-dirty") else "")
                         for sha in self.git_sha) or "unknown"
        lines.append(f"cfbench {', '.join(self.cfbench)} (git {shas}), "
                     f"torch {', '.join(self.torch)}")
        threads = ", ".join(map(str, self.threads))
        lines.append(f"hardware: {'; '.join(self.devices)}, {threads} threads (costs compare "
                     "only on the same hardware)")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
