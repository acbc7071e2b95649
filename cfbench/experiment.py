"""From a request to run records: plan (validate everything first), then execute each run.

`plan_runs` resolves and checks every name, hyperparameter, protocol field and data file before
anything trains, so bad input fails fast and writes nothing. `fill` trains K >= 1
configurations through one backend of the loop and fills their records (R, the objective's
matrices, the metrics and the costs); `execute` is one configuration on one model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cfbench import metrics, registry
from cfbench.cost import Stopwatch, peak_gpu_bytes, peak_rss_bytes, reset_peak_memory
from cfbench.errors import CfbenchError
from cfbench.models import build_model, initialise
from cfbench.protocol import scenario_seed_of
from cfbench.records import RunConfig, RunRecord, environment
from cfbench.scenario import Classification, Scenario, Setting, train_subset
from cfbench.strategy import (
    Strategy,
    TrainContext,
    build_strategy,
    overrides,
    resolve_hparams,
    strategy_names,
)
from cfbench.train import ModelBackend, evaluate_members, run_task, train_task, warm_up
from cfbench.validation import validation_split


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CfbenchError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CfbenchError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return str(device)


def load_scenario(name: str, options: Mapping[str, Any], seed: int, data_root: Path,
                  device: str) -> Scenario:
    """Build (once per process) a registered scenario with its tasks on `device`."""
    return _load_scenario(name, tuple(sorted(options.items())), seed, data_root, device)


@functools.lru_cache(maxsize=2)
def _load_scenario(name: str, options: tuple, seed: int, data_root: Path, device: str
                   ) -> Scenario:
    entry = registry.scenarios.get(name)
    try:
        scenario = entry.factory(data_root=data_root, seed=seed, **dict(options))
    except ValueError as exc:
        raise CfbenchError(f"bad options for scenario '{name}': {exc}") from None
    return scenario.to(device)


def plan_runs(*, scenario: str, settings: Sequence[str], strategies: Sequence[str],
              hparams: Mapping[str, Mapping[str, Any]], seeds: Sequence[int],
              scenario_seed: int | str = 0, scenario_options: Mapping[str, Any] | None = None,
              protocol_overrides: Mapping[str, Any] | None = None, device: str = "cpu",
              data_root: Path) -> list[RunConfig]:
    """Every run of the grid settings x strategies x seeds, fully resolved and validated.
    `scenario_seed` ``"seed"`` (`PER_SEED`) gives each run its training seed's task sequence;
    the first one is loaded to check (the others differ only in their draws)."""
    entry = registry.scenarios.get(scenario)
    options = entry.resolve(scenario_options or {})
    device = resolve_device(device)
    built = load_scenario(scenario, options, scenario_seed_of(scenario_seed, seeds[0]),
                          data_root, device)
    for setting in settings:
        Setting(built, setting)  # an unknown setting fails here, naming the valid ones
    changes = dict(protocol_overrides or {})
    # A budget given in one unit replaces the scenario's budget in the other.
    if changes.get("iterations") is not None:
        changes.setdefault("epochs", None)
    if changes.get("epochs") is not None:
        changes.setdefault("iterations", None)
    try:
        protocol = dataclasses.replace(built.protocol, **changes)
    except TypeError as exc:
        raise CfbenchError(f"bad protocol override: {exc}") from None
    build_model(protocol.model, built.input_shape, 1)  # a bad --model fails before any run
    if not protocol.normalize and not isinstance(built.objective, Classification):
        raise CfbenchError(f"normalize=false leaves image pixels unnormalised; scenario "
                           f"'{scenario}' has no images (its inputs are token ids)")
    for setting in settings:
        for other in set(protocol.also_evaluate) - {setting}:
            Setting(built, other)  # one the scenario lacks fails here, naming the valid ones
            if {setting, other} != {"task", "class"}:
                raise CfbenchError(f"also_evaluate: a {setting}-setting model cannot be scored "
                                   f"in the {other} setting (only the task and class settings "
                                   "share their output units)")
    if (protocol.precision == "bf16" and device.startswith("cuda")
            and not torch.cuda.is_bf16_supported()):
        raise CfbenchError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; "
                           "use --precision fp32")
    unused = set(hparams) - {n for s in strategies for n in strategy_names(s)}
    if unused:
        raise CfbenchError(f"hyperparameters given for {', '.join(sorted(unused))}, which is not "
                           "among the strategies run")
    configs = []
    for strategy in ("+".join(strategy_names(s)) for s in strategies):
        own = {n: hparams[n] for n in strategy_names(strategy) if n in hparams}
        resolved = resolve_hparams(strategy, own)
        for setting in settings:
            built_strategy = build_strategy(strategy, resolved, setting)  # fail on bad values
            reason = built_strategy.refuses(built)
            if reason:
                raise CfbenchError(f"strategy '{strategy}' does not apply to scenario "
                                   f"'{scenario}': {reason}")
            if not protocol.reset_optimizer and overrides(built_strategy, "param_groups"):
                raise CfbenchError(f"strategy '{strategy}' sets its own parameter groups for "
                                   "each task, which needs reset_optimizer=True")
            # The run's own setting is R itself: left out, so the run keeps its plain id.
            scored = dataclasses.replace(protocol, also_evaluate=tuple(
                s for s in protocol.also_evaluate if s != setting))
            configs += [RunConfig(scenario, setting, strategy, resolved, options,
                                  scenario_seed_of(scenario_seed, seed), seed, scored, device)
                        for seed in seeds]
    return configs


def parameter_drift(model: torch.nn.Module, start: Mapping[int, torch.Tensor]) -> float:
    """RMS change of the parameters present at the start, keyed by ``id(parameter)``, so a
    model a strategy wraps or grows is still compared on its original parameters (added
    heads, adapters and columns are excluded)."""
    total, count = 0.0, 0
    for p in model.parameters():
        if id(p) in start and start[id(p)].shape == p.shape:
            total += float((p.detach() - start[id(p)]).pow(2).sum())
            count += p.numel()
    return math.sqrt(total / count) if count else math.nan


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_record(config: RunConfig) -> RunRecord:
    """The record of a run about to start: where it runs, and where its strategies and its
    scenario come from (built-in, a package, a plugin file: not in the config, since the same
    code from another place is the same run)."""
    env = environment(config.device)
    env["strategy_sources"] = {name: registry.strategies.get(name).source
                               for name in strategy_names(config.strategy)}
    env["scenario_source"] = registry.scenarios.get(config.scenario).source
    return RunRecord(run_id=config.run_id, config=config.to_dict(), started_at=utc_now(),
                     env=env)


def execute(config: RunConfig, data_root: Path,
            on_task: Callable[[int, int], None] | None = None) -> RunRecord:
    """Run one configuration. A failure inside training is returned as a failed record."""
    record = new_record(config)
    try:
        fill([record], [config], data_root, on_task)
    except CfbenchError:
        raise
    except Exception as exc:  # a diverging or crashing strategy must not take the grid down
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        record.traceback = traceback.format_exc(limit=8)
    record.finished_at = utc_now()
    return record


def unfinished_record(config: RunConfig, status: str, reason: str, started_at: str = ""
                      ) -> RunRecord:
    """The record of a run that did not finish in its own process: a crashed or killed worker
    ("failed"), or one stopped by Ctrl-C ("interrupted")."""
    return RunRecord(run_id=config.run_id, config=config.to_dict(), status=status, error=reason,
                     started_at=started_at or utc_now(), finished_at=utc_now())


def fill(records: Sequence[RunRecord], configs: Sequence[RunConfig], data_root: Path,
         on_task: Callable[[int, int], None] | None = None,
         backend: type[ModelBackend] = ModelBackend) -> None:
    """Train `configs` (K >= 1 configurations of one scenario, setting and protocol but for
    the learning rate) through one `backend` of the loop and fill one record each. `on_task`
    is called as each run's own loop would call it. Costs are the job's divided by K."""
    config = configs[0]
    device = torch.device(config.device)
    scenario, setting = training_scenario(config, data_root)
    tasks = scenario.tasks
    for record in records:
        record.tasks = task_summaries(scenario)
        record.curves = {"train_loss": [[] for _ in tasks]}
    ctxs, strategies = [], []
    for c in configs:
        model = initial_model(c, scenario, setting, device)
        if c.protocol.compile:
            model.compile()
        strategies.append(build_strategy(c.strategy, c.hparams, c.setting))
        own = dataclasses.replace(scenario, protocol=c.protocol)  # members differ in lr
        ctxs.append(TrainContext.create(model, own, setting, c.seed, device))
    job = backend(ctxs, strategies)
    warm_up()
    train_clock, eval_clock = Stopwatch(device), Stopwatch(device)
    reset_peak_memory(device)
    tables: list[dict[str, list[list[float]]]] = [{} for _ in configs]

    def evaluate(predict: bool = True) -> None:
        with eval_clock:
            for table, rows in zip(tables, evaluate_members(job, predict), strict=True):
                for name, row in rows.items():
                    table.setdefault(name, []).append(row)

    first = 0
    if scenario.source is not None:
        # Transfer: row 0 is the untrained model, row 1 the source learned (identically for
        # every strategy); the strategy sees the source as a task learned in zero steps.
        evaluate(predict=False)
        job.load([source_state(c, scenario, setting, data_root) for c in configs])
        job.set_task(0)
        first = 1
    start = [{id(p): p.detach().clone() for p in c.model.parameters()} for c in ctxs]
    job.each("setup")
    if first:
        job.each("before_task", tasks[0])
        job.each("after_task", tasks[0])
    evaluate()
    costs = []
    for t in range(first, len(tasks)):
        job.set_task(t)
        with train_clock:
            costs.append(run_task(job, tasks[t]))
        evaluate()
        for record, losses in zip(records, costs[-1].losses, strict=True):
            record.tasks[t]["steps"] = costs[-1].steps
            record.curves["train_loss"][t] = list(losses)
            if on_task:
                on_task(t + 1, len(tasks))
    job.sync()
    for record, ctx, strategy, table, begun in zip(records, ctxs, strategies, tables, start,
                                                   strict=True):
        record.R = table.pop("R")
        record.matrices = table
        record.metrics = run_metrics(record.R, record.matrices, ctx.model, begun,
                                     transfer=bool(first))
        record.strategy_log = ctx.log
        record.cost = {
            "train_seconds": train_clock.seconds / job.k,
            "eval_seconds": eval_clock.seconds / job.k,
            "steps": sum(c.steps for c in costs),
            "train_flops": sum(c.flops for c in costs),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": peak_gpu_bytes(device),
            "state_bytes": strategy.state_bytes(),
        }
        if job.batched:
            record.cost["stacked_runs"] = job.k


def run_metrics(R: list[list[float]], matrices: Mapping[str, list[list[float]]],
                model: torch.nn.Module, start: Mapping[int, torch.Tensor], transfer: bool
                ) -> dict[str, float]:
    """A finished run's metrics: those of R, parameter drift, and in a transfer scenario the
    share of the source kept (``rem_source``) and the downstream tasks' ACC (``acc_target``),
    plus, where held-out loss is kept (language models), the perplexities."""
    out = {**metrics.all_metrics(R), "drift": parameter_drift(model, start)}
    if transfer:
        out["rem_source"] = metrics.transfer_remembering(R)
        out["acc_target"] = metrics.target_accuracy(R)
        if "loss" in matrices:
            out.update(metrics.language_metrics(matrices["loss"]))
    return out


def training_scenario(config: RunConfig, data_root: Path) -> tuple[Scenario, Setting]:
    """The scenario a run trains on (its validation split, if any, and its protocol), and its
    setting."""
    scenario = load_scenario(config.scenario, config.scenario_options, config.scenario_seed,
                             data_root, config.device)
    if config.validation is not None:
        scenario = validation_split(scenario, **config.validation)
    if config.protocol.train_per_task is not None:
        scenario = train_subset(scenario, config.protocol.train_per_task, config.scenario_seed)
    scenario = dataclasses.replace(scenario, protocol=config.protocol)
    return scenario, Setting(scenario, config.setting)


def task_summaries(scenario: Scenario) -> list[dict[str, Any]]:
    """What a run record says about each task (the loop adds the steps it trained)."""
    return [{"name": t.name, "classes": list(t.classes), "n_train": len(t.y_train),
             "n_test": len(t.y_test), **({"data": t.data} if t.data else {})}
            for t in scenario.tasks]


def initial_model(config: RunConfig, scenario: Scenario, setting: Setting,
                   device: torch.device) -> torch.nn.Module:
    """The backbone as initialised by the run's seed and the protocol's `init` (the same for
    every strategy)."""
    torch.manual_seed(config.seed)
    model = build_model(config.protocol.model, scenario.input_shape, setting.n_outputs)
    return initialise(model, config.protocol.init).to(device)


def source_state(config: RunConfig, scenario: Scenario, setting: Setting, data_root: Path
                 ) -> dict[str, torch.Tensor]:
    """The model after the transfer source is learned: pretrained weights loaded, or plain
    fine-tuning on task 0 for the source's epochs. It depends on neither the strategy nor its
    hyperparameters, so it is computed once per process for all the strategies of a grid."""
    key = json.dumps({k: v for k, v in config.to_dict().items()
                      if k not in ("strategy", "hparams")}, sort_keys=True)
    if key not in _SOURCE_STATES:
        assert scenario.source is not None
        device = torch.device(config.device)
        model = initial_model(config, scenario, setting, device)
        if scenario.source.load is not None:
            scenario.source.load(model)
        else:
            protocol = dataclasses.replace(config.protocol, epochs=scenario.source.epochs,
                                           iterations=None)
            source = dataclasses.replace(scenario, protocol=protocol)
            ctx = TrainContext.create(model, source, Setting(source, setting.name), config.seed,
                                      device)
            ctx.task_index = 0
            train_task(ctx, Strategy(), source.tasks[0])
        _SOURCE_STATES.clear()  # one scenario at a time: keep memory bounded
        _SOURCE_STATES[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _SOURCE_STATES[key]


_SOURCE_STATES: dict[str, dict[str, torch.Tensor]] = {}
