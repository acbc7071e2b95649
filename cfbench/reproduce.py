"""Published tables we reproduce: ``cfbench reproduce NAME`` runs a paper's protocol with our
strategies and prints our numbers beside the published ones.

A reproduction is data: the scenario and protocol the paper used, the published mean and
standard deviation per method and setting, and the runs (strategy, hyperparameters per setting,
protocol changes) that stand for each published row. A row lands when our mean over seeds is
within the published mean +/- max(3 x published std, 2 points). `plan` lists the runs; they take
the one run path (`cfbench.runs.run_plan`, always resuming from the records already there), and
`results` reads the table's numbers from their records.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cfbench.errors import CfbenchError
from cfbench.experiment import plan_runs
from cfbench.records import RunConfig, RunRecord
from cfbench.registry import SETTINGS

Hparams = Mapping[str, Mapping[str, Any]]
T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """Our runs standing for one published row (or one variant of it, e.g. a memory size)."""

    label: str
    method: str
    """The published row it is compared with."""
    strategy: str
    hparams: Mapping[str, Hparams] = field(default_factory=dict)
    """Per setting: {strategy part: {hyperparameter: value}}; a setting absent means defaults."""
    protocol: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reproduction:
    name: str
    citation: str
    scenario: str
    scenario_options: Mapping[str, Any]
    settings: tuple[str, ...]
    protocol: Mapping[str, Any]
    published: Mapping[str, Mapping[str, tuple[float, float]]]
    """method -> setting -> (mean, std) of average accuracy (%) after the last task."""
    rows: tuple[Row, ...]
    seeds: int
    notes: tuple[str, ...] = ()


def band(mean: float, std: float) -> tuple[float, float]:
    """The acceptance band around a published result (percent)."""
    half = max(3 * std, 2.0)
    return mean - half, mean + half


def _by_setting(task: T, domain: T, class_: T) -> dict[str, T]:
    return {"task": task, "domain": domain, "class": class_}


def _everywhere(name: str, **hparams: Any) -> dict[str, Hparams]:
    """The same hyperparameters for `name` in every setting."""
    return {s: {name: hparams} for s in SETTINGS}


def _per_setting(name: str, key: str, values: Mapping[str, float], **fixed: Any
                 ) -> dict[str, Hparams]:
    """``{setting: {name: {key: value, **fixed}}}`` for a coefficient tuned per setting."""
    return {s: {name: {key: v, **fixed}} for s, v in values.items()}


def _hsu_coefficient(task: float, domain: float, class_: float) -> dict[str, float]:
    """Hsu et al.'s code adds reg_coef * sum Omega (theta - theta*)^2 to the loss; every
    quadratic strategy here adds lam/2 * sum Omega (theta - theta*)^2, so lam = 2 reg_coef."""
    return {s: 2 * c for s, c in _by_setting(task, domain, class_).items()}


HSU_SGD = {"optimizer": "sgd", "lr": 0.01}

HSU2018_SPLIT_MNIST = Reproduction(
    name="hsu2018-split-mnist",
    citation="Hsu, Liu, Ramasamy & Kira 2018, Re-evaluating Continual Learning Scenarios, "
             "Table 2 (Split MNIST, 10 runs)",
    scenario="split-mnist",
    scenario_options={"pad": 2},
    settings=("task", "domain", "class"),
    protocol={"model": "mlp:400,400", "optimizer": "adam", "lr": 1e-3, "batch_size": 128,
              "epochs": 4, "reset_optimizer": False},
    published={
        "Adam": _by_setting((93.46, 2.01), (55.16, 1.38), (19.71, 0.08)),
        "SGD": _by_setting((97.98, 0.09), (63.20, 0.35), (19.46, 0.04)),
        "L2": _by_setting((98.18, 0.96), (66.00, 3.73), (22.52, 1.08)),
        "Naive rehearsal": _by_setting((99.40, 0.08), (95.16, 0.49), (90.78, 0.85)),
        "Naive rehearsal-C": _by_setting((99.57, 0.07), (97.11, 0.34), (95.59, 0.49)),
        "EWC": _by_setting((97.70, 0.81), (58.85, 2.59), (19.80, 0.05)),
        "Online EWC": _by_setting((98.04, 1.10), (57.33, 1.44), (19.77, 0.04)),
        "SI": _by_setting((98.56, 0.49), (64.76, 3.09), (19.67, 0.09)),
        "MAS": _by_setting((99.22, 0.21), (68.57, 6.85), (19.52, 0.29)),
        "LwF": _by_setting((99.60, 0.03), (71.02, 1.26), (24.17, 0.33)),
        "GEM": _by_setting((98.42, 0.10), (96.16, 0.35), (92.20, 0.12)),
        "DGR": _by_setting((99.47, 0.03), (95.74, 0.23), (91.24, 0.33)),
        "Offline": _by_setting((99.52, 0.16), (98.59, 0.15), (97.53, 0.30)),
    },
    rows=(
        Row("Adam", "Adam", "naive"),
        Row("SGD", "SGD", "naive", protocol=HSU_SGD),
        Row("L2", "L2", "l2", _per_setting("l2", "lam", _hsu_coefficient(0.01, 0.5, 100),
                                           anchor="previous-task")),
        Row("Naive rehearsal (memory 1100)", "Naive rehearsal", "replay",
            _everywhere("replay", memory=1100, selection="per-task", mix="dataset")),
        Row("Naive rehearsal (memory 4400)", "Naive rehearsal-C", "replay",
            _everywhere("replay", memory=4400, selection="per-task", mix="dataset")),
        Row("EWC", "EWC", "ewc", _per_setting("ewc", "lam", _hsu_coefficient(100, 100, 600),
                                              fisher="predicted", fisher_samples=None)),
        Row("Online EWC", "Online EWC", "online-ewc",
            _per_setting("online-ewc", "lam", _hsu_coefficient(400, 700, 100),
                         fisher="predicted", fisher_samples=None, gamma=1.0)),
        Row("SI", "SI", "si", _per_setting("si", "lam", _hsu_coefficient(300, 3000, 600),
                                           xi=0.1)),
        Row("MAS", "MAS", "mas", _per_setting("mas", "lam", _hsu_coefficient(1, 10000, 1),
                                              reduce_units="mean")),
        Row("LwF", "LwF", "lwf"),
        Row("GEM (memory 1100)", "GEM", "gem",
            _everywhere("gem", memory=1100, margin=0.5, rehearse=False),
            protocol=HSU_SGD),
        Row("GEM (memory 4400)", "GEM", "gem",
            _everywhere("gem", memory=4400, margin=0.5, rehearse=False),
            protocol=HSU_SGD),
        Row("DGR", "DGR", "generative-replay",
            _everywhere("generative-replay", generator_iterations=2000)),
        Row("Offline", "Offline", "joint", _everywhere("joint", form="offline")),
    ),
    seeds=10,
    notes=(
        "Inputs padded to 32x32 and normalised with mean 0.1000, std 0.2752 (split-mnist "
        "pad=2 derives exactly these from MNIST's statistics); the optimizer's state carries "
        "over between tasks as in Hsu et al.'s code (reset_optimizer=False).",
        "Task setting: one 10-unit layer whose logits are masked to each task's two units; it "
        "predicts as separate 2-unit heads do, but with the optimizer's state carried over, "
        "Adam's leftover momentum still moves an old task's rows for a few steps after the "
        "switch (separate heads get no update).",
        "LwF (class setting, out of band): the published row comes from van de Ven & Tolias's "
        "code (2000 iterations per task, the class-setting softmax over all seen units with "
        "zero targets on new ones), which gave 24.8 in a one-seed check; ours is Li & Hoiem's "
        "loss over the old units only.",
        "Regularisation coefficients: lam = 2 x the paper's reg_coef (our penalties carry "
        "a 1/2).",
        "GEM rows run the original GEM update alone (rehearse=False); Hsu et al.'s code also "
        "trains GEM on the memory (gem's default, rehearse=True).",
        "DGR: a VAE generator trained 2000 iterations per task, van de Ven & Tolias's budget "
        "(the row's source); fewer iterations underfit the generator.",
        "Offline trains once on the union of all tasks after the last one (joint form=offline), "
        "as the paper does; only its final ACC compares.",
    ),
)

REPRODUCTIONS = {r.name: r for r in (HSU2018_SPLIT_MNIST,)}


def get(name: str) -> Reproduction:
    try:
        return REPRODUCTIONS[name]
    except KeyError:
        raise CfbenchError(f"unknown reproduction '{name}'; available: "
                           f"{', '.join(sorted(REPRODUCTIONS))}") from None


@dataclass(frozen=True)
class RowResult:
    """Our result for one row and setting, beside the published one."""

    row: Row
    setting: str
    accs: tuple[float, ...]
    """Average accuracy (%) after the last task, one per seed."""
    published: tuple[float, float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.accs) > 1 else math.nan

    @property
    def within(self) -> bool:
        lo, hi = band(*self.published)
        return lo <= self.mean <= hi


Plan = list[tuple[Row, str, list[RunConfig]]]  # per row and setting, a run per seed


def plan(repro: Reproduction, *, data_root: Path, seeds: int | None = None,
         rows: Sequence[str] = (), settings: Sequence[str] | None = None,
         epochs: float | None = None, device: str = "cpu") -> Plan:
    """Every row (those whose label matches a wildcard of `rows`; all without) x setting x seed
    (the paper's seeds by default), all validated before anything trains."""
    chosen = [r for r in repro.rows if not rows or any(fnmatch.fnmatch(r.label, p) for p in rows)]
    if not chosen:
        raise CfbenchError(f"no row of {repro.name} matches {', '.join(rows)}; rows: "
                           f"{', '.join(r.label for r in repro.rows)}")
    unknown = set(settings or ()) - set(repro.settings)
    if unknown:
        raise CfbenchError(f"{repro.name} has no setting {', '.join(sorted(unknown))}; choose "
                           f"from {', '.join(repro.settings)}")
    quicker = {"epochs": epochs} if epochs else {}
    return [(row, setting, plan_runs(
        scenario=repro.scenario, settings=[setting], strategies=[row.strategy],
        hparams=row.hparams.get(setting, {}), seeds=range(seeds or repro.seeds),
        scenario_options=repro.scenario_options,
        protocol_overrides={**repro.protocol, **row.protocol, **quicker},
        device=device, data_root=data_root))
        for row in chosen for setting in settings or repro.settings]


def results(repro: Reproduction, plan: Plan, records: Iterable[RunRecord]) -> list[RowResult]:
    """Our numbers for each row and setting whose every run finished ok."""
    acc = {r.run_id: 100 * r.metrics["acc"] for r in records if r.status == "ok"}
    return [RowResult(row, setting, tuple(acc[c.run_id] for c in configs),
                      repro.published[row.method][setting])
            for row, setting, configs in plan if all(c.run_id in acc for c in configs)]


def table(repro: Reproduction, rows: Sequence[RowResult]) -> str:
    """Markdown: our mean +/- std beside the published mean +/- std, marking rows in band."""
    settings = [s for s in repro.settings if any(o.setting == s for o in rows)]
    cell = {(o.row.label, o.setting): o for o in rows}
    lines = [f"Reproduction of {repro.citation}: average accuracy (%) after the last task, "
             "ours (mean +/- std over seeds) | published; "
             "'ok' = within published mean +/- max(3 std, 2).", "",
             "| method | " + " | ".join(f"{s} ours | {s} published" for s in settings) + " |",
             "|---|" + "---|---|" * len(settings)]
    for label in dict.fromkeys(o.row.label for o in rows):
        cells = []
        for s in settings:
            o = cell.get((label, s))
            if o is None:
                cells += ["", ""]
                continue
            mark = "ok" if o.within else "**out**"
            spread = f" +/- {o.std:.2f}" if len(o.accs) > 1 else ""
            cells += [f"{o.mean:.2f}{spread} (n={len(o.accs)}) {mark}",
                      f"{o.published[0]:.2f} +/- {o.published[1]:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in repro.notes]
    return "\n".join(lines) + "\n"
