"""The sweep and tune files committed under results/ stay valid as strategies change: a renamed
hyperparameter or a new strategy missing from the reference fails here, not hours into
`make reference`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cfbench import registry
from cfbench.sweep import size
from cfbench.sweepfile import SweepFile, load_sweep

RESULTS = Path(__file__).resolve().parent.parent / "results"
SWEEP_FILES = sorted(RESULTS.glob("*/*.yaml"))
REFERENCE = RESULTS / "reference"
BUDGET = re.compile(r"(.+)-memory(\d+)")
FAMILIES = sorted(p.stem for p in REFERENCE.glob("*.yaml") if not BUDGET.fullmatch(p.stem))


def _id(path: Path) -> str:
    return str(path.relative_to(RESULTS))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=_id)
def test_committed_sweep_file_loads_and_plans_runs(path: Path) -> None:
    sweep = load_sweep(path)  # names, hyperparameters and values, protocol fields
    assert size(sweep) > 0  # every strategy supports a setting of its scenarios


@pytest.mark.parametrize("path", sorted(REFERENCE.glob("*.yaml")), ids=_id)
def test_reference_tunes_on_a_seed_apart_from_five_reported(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.tune is not None
    assert len(sweep.seeds) == 5
    assert not set(sweep.tune.seeds) & set(sweep.seeds)


def _budgets(family: str) -> dict[int, SweepFile]:
    found = {int(m[2]): load_sweep(p) for p in REFERENCE.glob(f"{family}-memory*.yaml")
             if (m := BUDGET.fullmatch(p.stem)) and m[1] == family}
    assert len(found) >= 2, f"{family}: rehearsal at fewer than two memory budgets"
    return found


def _without_memory(sweep: SweepFile) -> list:
    return [(spec, {part: {k: v for k, v in grid.items() if k != "memory"}
                    for part, grid in grids.items()}) for spec, grids in sweep.strategies]


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_lists_every_applicable_built_in_strategy(family: str) -> None:
    main = load_sweep(REFERENCE / f"{family}.yaml")
    files = [main, *_budgets(family).values()]
    settings = set(main.settings or [s for name, _ in main.scenarios
                                      for s in registry.scenarios.get(name).settings])
    listed = {spec for sweep in files for spec, _ in sweep.strategies}
    applicable = {name for name in registry.strategies.names()
                  if (entry := registry.strategies.get(name)).source == registry.BUILT_IN
                  and entry.family != "peer" and settings & set(entry.settings)}
    assert applicable <= listed, f"{family}: missing {sorted(applicable - listed)}"
    for sweep in files[1:]:
        assert (sweep.scenarios, sweep.settings, sweep.protocol, sweep.seeds, sweep.tune) == \
            (main.scenarios, main.settings, main.protocol, main.seeds, main.tune)


@pytest.mark.parametrize("family", FAMILIES)
def test_rehearsal_runs_at_each_memory_budget_with_the_same_grids(family: str) -> None:
    budgets = _budgets(family)
    first = _without_memory(next(iter(budgets.values())))
    for memory, sweep in budgets.items():
        assert _without_memory(sweep) == first  # only the memory differs between budgets
        for spec, grids in sweep.strategies:
            memories = [grid["memory"] for grid in grids.values() if "memory" in grid]
            assert memories == [[memory]], f"{spec} in {sweep.path}"


def test_the_readme_table_is_the_published_summary() -> None:
    """The README's reference table is `results/reference/leaderboard.summary.md` verbatim
    (`make reference` copies it with scripts/readme_table.py), so no number in it is typed."""
    assert subprocess.run([sys.executable, str(RESULTS.parent / "scripts" / "readme_table.py"),
                           "--check"], capture_output=True, text=True).returncode == 0
