"""`cfbench tune`: choose hyperparameters on validation data, then report on the test split.

1. Every grid point of each (scenario, setting, strategy) in the sweep file runs with the tuning
   seeds on a validation split carved from each task's training data
   (`cfbench.validation.validation_split`; only the first k tasks with ``tune.tasks: k``, the
   protocol of Chaudhry et al. 2019). The test split is never read.
2. The point with the highest final ACC on validation, averaged over the tuning seeds, is chosen
   (ties: the first in file order; a point with a failed run is not eligible).
3. The chosen point runs on the test split with the report seeds (the file's ``seeds``), which
   must be disjoint from the tuning seeds (van de Ven et al.: tune on one seed, report on
   others). Each of these records carries ``selection``, saying how its values were chosen.

Validation runs are stored apart from the reported ones (`validation_store`, and with ``--out``
the folder's ``validation/`` subfolder), so a leaderboard over the main store or the records
folder never mixes validation and test accuracies. Both phases take the one run
path (`cfbench.runs.run_plan`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfbench.errors import CfbenchError
from cfbench.records import RunConfig, RunRecord
from cfbench.runs import PlannedRun, RunOptions, Sink, check_stored, run_plan
from cfbench.strategy import resolve_hparams, strategy_names
from cfbench.sweep import dry_run_table, plan
from cfbench.sweepfile import SweepFile
from cfbench.validation import validation_split

CRITERION = "final ACC on validation, mean over the tuning seeds"


@dataclass(frozen=True)
class TunePlan:
    """The validation runs, the candidate report runs, and the split they use."""

    sweep: SweepFile
    tuning: list[PlannedRun]
    report: list[PlannedRun]
    validation: dict[str, Any]


@dataclass(frozen=True)
class Choice:
    """The winner of one (scenario, setting, strategy): its point and validation score."""

    label: str
    candidate: str | None
    """Key of the chosen configuration (None: every candidate failed)."""
    point: dict[str, Any]
    score: float | None
    candidates: int
    ineligible: int
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    """The axes the candidates differ on, each with its values in file order: what was tuned,
    as opposed to values the file fixes (e.g. a replay memory)."""


def validation_store(store: Path) -> Path:
    """Where the validation runs of a tune whose reported runs go to `store` are kept."""
    return store.with_name(f"{store.stem}.validation{store.suffix or '.sqlite'}")


def validation_out(out: str | Path) -> Path:
    """Where the validation records of a tune whose reported records go to `out` are written:
    a subfolder, which a leaderboard over `out` does not read."""
    return Path(out) / "validation"


def plan_tune(sweep: SweepFile, data_root: Path) -> TunePlan:
    """Validate the tune section and plan every run (tuning and reported) before any starts."""
    from cfbench.experiment import load_scenario

    spec = sweep.tune
    line = sweep.lines.get("tune", 0)
    if spec is None:
        raise CfbenchError(f"{sweep.path}: `cfbench tune` needs a 'tune:' section (at least "
                           "'seeds:', the seeds to tune on); see the README's Sweeps section")
    shared = sorted(set(spec.seeds) & set(sweep.seeds))
    if shared:
        raise CfbenchError(f"{sweep.path}:{line}: tune.seeds: seed(s) {shared} are also in "
                           f"'seeds'; tune on seeds disjoint from the seeds you report")
    runs = plan(sweep, data_root, seeds=[*spec.seeds, *sweep.seeds])
    validation = {"fraction": spec.validation, "seed": spec.split_seed, "tasks": spec.tasks}
    checked = set()
    for run in runs:
        c = run.config
        key = (c.scenario, json.dumps(c.scenario_options, sort_keys=True), c.scenario_seed)
        if key not in checked:
            checked.add(key)
            try:  # a split that cannot be made fails now, not in a worker
                validation_split(load_scenario(c.scenario, c.scenario_options, c.scenario_seed,
                                               data_root, c.device), **validation)
            except CfbenchError as exc:
                raise CfbenchError(f"{sweep.path}:{line}: tune: {exc}") from None
    tuning = [PlannedRun(dataclasses.replace(r.config, validation=validation), r.point)
              for r in runs if r.config.seed in spec.seeds]
    report = [r for r in runs if r.config.seed in sweep.seeds]
    return TunePlan(sweep, tuning, report, validation)


def _without(config: RunConfig, *keys: str) -> str:
    d = config.to_dict()
    for key in (*keys, "seed", "validation"):
        d.pop(key, None)
    return json.dumps(d, sort_keys=True)


def group_key(config: RunConfig) -> str:
    """What one choice is made for: the configuration without hyperparameters, protocol, seed
    and split (the protocol is tuned too when the file gives it a grid)."""
    return _without(config, "hparams", "protocol")


def candidate_key(config: RunConfig) -> str:
    """One grid point: the configuration without seed and split."""
    return _without(config)


def select(tune: TunePlan, records: Mapping[str, RunRecord]) -> dict[str, Choice]:
    """Per group, the grid point with the best mean final validation ACC over tuning seeds."""
    groups: dict[str, dict[str, list[PlannedRun]]] = {}
    for run in tune.tuning:
        groups.setdefault(group_key(run.config), {}).setdefault(
            candidate_key(run.config), []).append(run)
    choices = {}
    for group, candidates in groups.items():
        best: tuple[float, str, dict[str, Any]] | None = None
        ineligible = 0
        for candidate, runs in candidates.items():
            found = [records.get(r.config.run_id) for r in runs]
            if any(r is None or r.status != "ok" for r in found):
                ineligible += 1
                continue
            score = sum(r.metrics["acc"] for r in found) / len(found)
            if best is None or score > best[0]:
                best = (score, candidate, runs[0].point)
        c = next(iter(candidates.values()))[0].config
        label = f"{c.scenario}/{c.setting}/{c.strategy}"
        grid = tuned_axes([runs[0].point for runs in candidates.values()])
        if best is None:
            choices[group] = Choice(label, None, {}, None, len(candidates), ineligible, grid)
        else:
            score, candidate, point = best
            choices[group] = Choice(label, candidate, point, score, len(candidates), ineligible,
                                    grid)
    return choices


def tuned_axes(points: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The keys whose value is not the same in every point (the points of one group share
    their keys), each with its distinct values in order of first appearance."""
    axes: dict[str, list[Any]] = {}
    for point in points:
        for key, value in point.items():
            if value not in axes.setdefault(key, []):
                axes[key].append(value)
    return {key: values for key, values in axes.items() if len(values) > 1}


def default_values(strategy: str, point: Mapping[str, Any]) -> dict[str, Any]:
    """The strategy's own defaults of the hyperparameters in `point` (``part.key`` in a
    composition), so a table can show a tuned value beside the default; protocol and
    scenario-option axes have none here."""
    defaults, parts = resolve_hparams(strategy, {}), strategy_names(strategy)
    found = {}
    for key in point:
        part, name = key.rpartition(".")[::2] if len(parts) > 1 else (parts[0], key)
        if name in defaults.get(part, {}):
            found[key] = defaults[part][name]
    return found


def selection_entry(tune: TunePlan, choice: Choice, strategy: str) -> dict[str, Any]:
    """The `selection` of a reported record: how its hyperparameters were chosen, and the
    strategy's defaults of the chosen keys."""
    assert tune.sweep.tune is not None
    return {"by": "cfbench tune", "criterion": CRITERION, "validation": tune.validation,
            "tuning_seeds": list(tune.sweep.tune.seeds), "candidates": choice.candidates,
            "chosen": choice.point, "grid": choice.grid,
            "defaults": default_values(strategy, choice.point), "validation_acc": choice.score}


def final_runs(tune: TunePlan, choices: Mapping[str, Choice]) -> list[PlannedRun]:
    """The reported runs: each group's chosen point on the report seeds, with the selection
    their records carry."""
    return [dataclasses.replace(r, selection=selection_entry(tune, choice, r.config.strategy))
            for r in tune.report
            if (choice := choices[group_key(r.config)]).candidate == candidate_key(r.config)]


def choice_lines(choices: Iterable[Choice]) -> list[str]:
    lines = []
    for c in choices:
        if c.candidate is None:
            lines.append(f"{c.label}: nothing chosen: every one of {c.candidates} candidate(s) "
                         "had a failed validation run")
            continue
        values = " ".join(f"{k}={v}" for k, v in c.point.items()) or "(defaults)"
        skipped = f", {c.ineligible} ineligible (failed)" if c.ineligible else ""
        lines.append(f"{c.label}: {values}  validation ACC {100 * c.score:.2f}% "
                     f"({c.candidates} candidate(s){skipped})")
    return lines


def tune(sweep: SweepFile, data_root: Path, store: Path, options: RunOptions, *,
         out: str | Path | None = None, dry_run: bool = False) -> bool:
    """Plan both phases, run the validation runs into `validation_store(store)` (and
    `validation_out(out)`), choose, and run the chosen values into `store` (and `out`). True when
    every run succeeded and every group got a choice."""
    sinks = (Sink(None if out is None else validation_out(out), validation_store(store)),
             Sink(out, store))  # checked before planning
    with options.progress.loading(f"the scenarios of {sweep.name} (data root {data_root})"):
        planned = plan_tune(sweep, data_root)
    with sinks[0] as val, sinks[1] as test:
        if dry_run:
            options.report(dry_run_table(planned.tuning, val.stored()) + "then the chosen "
                           f"values on seeds {list(sweep.seeds)} ({test.where})")
            return True
        for runs, sink in ((planned.tuning, val), (planned.report, test)):  # before any run
            check_stored(runs, sink, options.resume)
        tuning = run_plan(planned.tuning, val, f"{sweep.name} (validation)", options)
        choices = select(planned, {r.run_id: r for r in tuning.records()})
        options.report("\n  ".join(["chosen on validation:", *choice_lines(choices.values())]))
        reported = run_plan(final_runs(planned, choices), test,
                            f"{sweep.name} (test split, chosen values)", options)
    options.report(f"tables: cfbench leaderboard --store {store}")
    unchosen = any(c.candidate is None for c in choices.values())
    return not (tuning.failed or reported.failed or unchosen)
