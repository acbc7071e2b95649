"""Sweeps: a YAML file of scenarios x settings x strategies x hyperparameter grids x seeds.

`cfbench.sweepfile.load_sweep` reads and checks the file; `plan` expands its grid axes (which
multiply) into runs through `plan_runs`, which validates every run before any starts; the runs
then take the one run path (`cfbench.runs.run_plan`) into the store.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cfbench import registry
from cfbench.errors import CfbenchError
from cfbench.records import RunRecord
from cfbench.runs import PlannedRun
from cfbench.sweepfile import SweepFile


def _points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a grid's axes, in file order."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(grid[k] for k in keys))]


def varying(grid: Mapping[str, Sequence[Any]], point: Mapping[str, Any]) -> dict[str, Any]:
    """The values of `point` on the axes of `grid` with more than one alternative."""
    return {k: v for k, v in point.items() if len(grid[k]) > 1}


def _settings(sweep: SweepFile, scenario: str, spec: str) -> list[str]:
    """The settings `spec` runs in on `scenario`: the file's, or for "all" those the scenario
    and every part of the strategy support."""
    from cfbench.strategy import strategy_names

    if sweep.settings is not None:
        return sweep.settings
    entry = registry.scenarios.get(scenario)
    settings = [s for s in entry.settings if all(
        s in registry.strategies.get(p).settings for p in strategy_names(spec))]
    if not settings:
        line = sweep.lines.get(f"strategies.{spec}", 0)
        raise CfbenchError(f"{sweep.path}:{line}: strategies.{spec}: supports none of the "
                           f"settings of {scenario} ({', '.join(entry.settings)})")
    return settings


def size(sweep: SweepFile, seeds: Sequence[int] | None = None) -> int:
    """How many runs `plan` makes at most, from the sizes of the grid's axes without expanding
    it (so a huge grid is refused at once)."""
    def points(grid: Mapping[str, Sequence[Any]]) -> int:
        return math.prod(len(values) for values in grid.values())

    per_seed = sum(points(options) * points(sweep.protocol) * len(_settings(sweep, scenario, spec))
                   * math.prod(points(grid) for grid in grids.values())
                   for scenario, options in sweep.scenarios for spec, grids in sweep.strategies)
    return per_seed * len(sweep.seeds if seeds is None else seeds)


def plan(sweep: SweepFile, data_root: Path, seeds: Sequence[int] | None = None
         ) -> list[PlannedRun]:
    """Every run of the sweep, validated by `plan_runs` before anything runs (duplicates of one
    configuration are kept once). A run's `point` shows its strategy's grid values and those of
    the scenario-option and protocol axes that vary."""
    from cfbench.experiment import load_scenario, plan_runs, resolve_device
    from cfbench.protocol import scenario_seed_of
    from cfbench.strategy import strategy_names

    runs: dict[str, PlannedRun] = {}
    seeds = list(sweep.seeds if seeds is None else seeds)
    for scenario, options_grid in sweep.scenarios:
        entry = registry.scenarios.get(scenario)
        for options in _points(options_grid):
            try:  # the data (cached: plan_runs finds it loaded), so its errors name the scenario
                load_scenario(scenario, entry.resolve(options),
                              scenario_seed_of(sweep.scenario_seed, seeds[0]), data_root,
                              resolve_device(sweep.device))
            except CfbenchError as exc:
                line = sweep.lines.get(f"scenarios.{scenario}", 0)
                raise CfbenchError(f"{sweep.path}:{line}: scenarios.{scenario}: {exc}") from None
            for protocol in _points(sweep.protocol):
                for spec, grids in sweep.strategies:
                    parts = strategy_names(spec)
                    settings = _settings(sweep, scenario, spec)
                    hp_axes = {f"{part}.{key}": values for part, grid in grids.items()
                               for key, values in grid.items()}
                    for hp in _points(hp_axes):
                        hparams: dict[str, dict[str, Any]] = {}
                        for dotted, value in hp.items():
                            part, key = dotted.split(".", 1)
                            hparams.setdefault(part, {})[key] = value
                        try:
                            configs = plan_runs(
                                scenario=scenario, settings=settings, strategies=[spec],
                                hparams=hparams, seeds=seeds,
                                scenario_seed=sweep.scenario_seed, scenario_options=options,
                                protocol_overrides=protocol, device=sweep.device,
                                data_root=data_root)
                        except CfbenchError as exc:
                            line = sweep.lines.get(f"strategies.{spec}", 0)
                            raise CfbenchError(f"{sweep.path}:{line}: strategies.{spec} on "
                                               f"{scenario}: {exc}") from None
                        shown = {(k.split(".", 1)[1] if len(parts) == 1 else k): v
                                 for k, v in hp.items()}
                        point = {**varying(options_grid, options),
                                 **varying(sweep.protocol, protocol), **shown}
                        for config in configs:
                            runs.setdefault(config.run_id, PlannedRun(config, point))
    return list(runs.values())


def dry_run_table(runs: Sequence[PlannedRun], stored: Mapping[str, RunRecord]) -> str:
    """One line per run: id, scenario, setting, strategy, grid values, seed (and stored status)."""
    rows = [("run id", "scenario", "setting", "strategy", "values", "seed", "stored")]
    for run in runs:
        c = run.config
        scenario = c.scenario + (" [validation]" if c.validation is not None else "")
        rows.append((c.run_id, scenario, c.setting, c.strategy,
                     run.values() or "-",
                     str(c.seed), stored[c.run_id].status if c.run_id in stored else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)
                             ).rstrip() + "\n" for row in rows)
