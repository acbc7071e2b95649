"""The Python API: `cfbench run` and `cfbench leaderboard` as functions, importable as
``cfbench.run``, ``cfbench.load_records`` and ``cfbench.tabulate``.

The commands are a thin layer over these functions (they parse flags, then call them), so a
script and the command line plan, run, record and tabulate the same way. Bad input is a
`CfbenchError` with one line naming the problem, raised before anything trains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfbench.errors import CfbenchError
from cfbench.records import DEFAULT_OUT, RunRecord, read_records

if TYPE_CHECKING:
    import pandas as pd

    from cfbench.runs import RunOptions

OnBad = Callable[[CfbenchError], None]


def _names(value: str | Sequence[str]) -> list[str]:
    """A comma list ("naive,ewc") or a sequence of names, as a list."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def _serial(data_root: Path, plugins: Sequence[str | Path]) -> RunOptions:
    """Runs one after another in this process, replacing what the sink holds of them, silent:
    what a script wants unless it says otherwise."""
    from cfbench.executors import RunSetup, make_executor
    from cfbench.runs import RunOptions

    setup = RunSetup(data_root.resolve(), tuple(str(Path(p).resolve()) for p in plugins), None)
    return RunOptions(make_executor("serial", setup), replace=True)


def run(scenario: str, strategies: str | Sequence[str], *, setting: str | Sequence[str] = "all",
        seeds: int | Sequence[int] = 1, out: str | Path | None = None,
        store: str | Path | None = None, hparams: dict[str, dict[str, Any]] | None = None,
        scenario_seed: int | str = 0, scenario_options: dict[str, Any] | None = None,
        device: str = "cpu", data_root: str | Path | None = None,
        plugins: Sequence[str | Path] = (), options: RunOptions | None = None,
        yes: bool = False, **protocol: Any) -> list[RunRecord]:
    """Run `strategies` through `scenario` and return the record of every run
    (`cfbench run`).

    strategies: names or a comma list; compose with '+' ("ewc+replay"). setting: "all" (every
    setting the scenario supports), one, a comma list or a sequence. seeds: a count (0..N-1) or
    the seeds. out: where each record is written as <run id>.json (default results/runs);
    store: also this SQLite results store. hparams: per strategy, e.g. ``{"ewc": {"lam": 100}}``.
    protocol: any `Protocol` field, e.g. ``iterations=20``, ``lr=0.01``. data_root: where the
    datasets are (default $CFBENCH_DATA or a user cache). plugins: Python files that register
    strategies or scenarios. options: how the runs execute (`cfbench.runs.RunOptions`; the
    command line's executor, resume and progress flags); default: one after another in this
    process, replacing what `out` holds of them. yes: allow a plan of more than
    `runs.MOST_RUNS` runs.

    Everything is planned and checked before the first run trains; a run that fails is a
    record with status "failed" (its error says why), not an exception.
    """
    from cfbench import registry
    from cfbench.data import data_root as default_root
    from cfbench.experiment import plan_runs
    from cfbench.registry import load_plugin
    from cfbench.runs import PlannedRun, Sink, check_run_count, run_plan

    for path in plugins:
        load_plugin(str(path))
    strategies = _names(strategies)
    entry = registry.scenarios.get(scenario)
    settings = list(entry.settings) if setting == "all" else _names(setting)
    seeds = range(seeds) if isinstance(seeds, int) else list(seeds)
    check_run_count(len(settings) * len(strategies) * len(seeds), yes)
    root = default_root(data_root)
    options = options or _serial(root, plugins)
    sink = Sink(out or DEFAULT_OUT, store)  # checked before planning loads any data
    with options.progress.loading(f"{scenario} (data root {root})"):
        configs = plan_runs(scenario=scenario, settings=settings, strategies=strategies,
                            hparams=hparams or {}, seeds=seeds, scenario_seed=scenario_seed,
                            scenario_options=scenario_options, protocol_overrides=protocol,
                            device=device, data_root=root)
    with sink:
        outcome = run_plan([PlannedRun(c) for c in configs], sink, "cfbench run", options)
    return outcome.records()


def load_records(path: str | Path = DEFAULT_OUT, *, scenario: str | Sequence[str] | None = None,
                 on_bad: OnBad | None = None) -> list[RunRecord]:
    """The run records in `path`: a folder of <run id>.json files (what `run` writes) or a
    SQLite results store (a file), optionally only those of `scenario` (a name or several).
    Each is checked against the record schema; a bad one is a `CfbenchError` naming its file
    and field, or, given `on_bad`, is passed to it and left out."""
    from cfbench.store import Store

    path = Path(path)
    if path.is_file():
        with Store(path) as store:
            one = scenario if isinstance(scenario, str) else None
            records = store.records(scenario=one, on_bad=on_bad)
    else:
        records = read_records(path, on_bad)
    wanted = {scenario} if isinstance(scenario, str) else scenario
    return [r for r in records if wanted is None or r.config["scenario"] in wanted]


def tabulate(records: Iterable[RunRecord] | str | Path, convention: str = "cfbench"
             ) -> pd.DataFrame:
    """The leaderboard of `records` (or of the records `load_records` finds at a path): one
    row per configuration, with each metric's mean over seeds, its std and 95% CI half-width,
    the number of seeds and the rank ("best", "tied" or ""). convention: "cfbench", or "gem"
    or "mammoth" to compare with the numbers they publish. `cfbench leaderboard` renders it."""
    from cfbench.leaderboard import summarize
    from cfbench.metrics import CONVENTIONS

    if isinstance(records, str | Path):
        records = load_records(records)
    # In run-id order: sums over seeds round the same whatever order the records came in.
    records = sorted(records, key=lambda r: r.run_id)
    if convention not in CONVENTIONS:
        raise CfbenchError(f"unknown metric convention '{convention}'; use one of "
                           f"{', '.join(CONVENTIONS)}")
    if not any(r.status == "ok" for r in records):
        raise CfbenchError("no successful run records to tabulate; run `cfbench run` first or "
                           "name the folder or store that holds them (--records, --store)")
    return summarize(records, convention)
