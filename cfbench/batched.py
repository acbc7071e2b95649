"""Seed batching: K seeds of one configuration trained as one vectorised job.

Each seed's model is built exactly as a single run builds it (``torch.manual_seed(seed)``, then
the backbone), and the K models are stacked into one set of parameters of shape (K, ...)
(``torch.func.stack_module_state``). A training step draws each seed's minibatch from that
seed's own ``batch_generator`` (the order its own run takes), runs the K networks as batched
matrix products (one ``baddbmm`` per layer for all seeds), and backpropagates the sum over
seeds of each seed's mean cross-entropy (plus its penalty), so seed k's parameters get exactly
seed k's gradient. One optimizer of the protocol's kind (``make_optimizer``, as the loop builds
it) updates the stacked parameters: Adam and SGD are elementwise, so seed k's update is the one
its own optimizer would make. Evaluation runs every seed on each test batch at once, with one
host sync per evaluation.

What happens outside the step runs per seed, on an ordinary model holding that seed's
parameters, with that seed's own strategy object and ``TrainContext`` (generators included):
``setup``, ``before_task``, ``train_data`` (joint), ``after_task`` (EWC's Fisher, MAS's
sensitivities, replay's buffer), and the model-free ``batch`` hook (replay mixing in memory
samples). The in-step hooks have batched forms (``_PARTS``): the quadratic regularisers'
gradient term ``lam * importance * (p - anchor)`` with each seed's importance and anchor
stacked, and LwF's distillation from the seeds' teachers stacked. Any other strategy, or a
backbone other than ``mlp:`` (convolutions, batch-norm buffers), runs its seeds one at a time
(``can_batch`` says why).

Each seed's arithmetic is its own run's (``_StackedLinear``): on the CPU with one thread the
records are bitwise equal to the per-seed runs; with kernels that split work differently they
agree to float rounding. Records have the per-seed schema and run ids. Costs are the job's
divided by K (``train_seconds``, ``eval_seconds``), and ``cost["batched_seeds"] = K`` says so;
FLOPs are per seed as the loop counts them (the first step of each task: the job's / K);
``state_bytes`` is each seed's own; peak memory is the job's.

A job that fails in any way (a non-finite loss in one seed, a hook raising, running out of
memory) is abandoned with a warning saying why, and its seeds are rerun one at a time with
``execute``: every record, failed ones included, is then exactly its per-seed run's.

Where it pays: a GPU runs one small MLP far below its capacity, so K seeds cost little more
than one. A CPU is already busy with one run's matrix products, so there K seeds cost about K
runs' arithmetic and batching saves only the per-step overhead.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state, vmap
from torch.utils.flop_counter import FlopCounterMode

from cfbench.cost import Stopwatch, peak_gpu_bytes, peak_rss_bytes, reset_peak_memory
from cfbench.errors import CfbenchError
from cfbench.experiment import (
    execute,
    initial_model,
    run_metrics,
    run_scenario,
    source_state,
    task_summaries,
    utc_now,
)
from cfbench.records import RunConfig, RunRecord, environment
from cfbench.scenario import apply_mask
from cfbench.strategies.distillation import LwF, grouped_kl, old_unit_groups
from cfbench.strategies.regularization import Quadratic
from cfbench.strategy import (
    Compose,
    Strategy,
    TrainContext,
    TrainData,
    build_strategy,
    overrides,
    strategy_names,
)
from cfbench.train import (
    NONFINITE_CHECK_EVERY,
    NonFiniteLoss,
    TaskCost,
    make_optimizer,
    minibatch_indices,
    reads_are_free,
    warm_up,
)

Params = dict[str, torch.Tensor]


class _InStep:
    """The batched form of one strategy's in-step hooks, for all seeds at once; each seed's
    strategy object (its state estimated per seed) is in `seeds`."""

    def __init__(self, job: _SeedJob, seeds: list[Any]) -> None:
        self.job, self.seeds = job, seeds

    def start_task(self) -> None:
        """Gather the seeds' state for the task (after their ``before_task``)."""

    def penalty(self, x: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        """Each seed's penalty, shape (K,), from inputs (K, B, ...) and raw outputs (K, B, U)."""
        return None

    def after_backward(self) -> None:
        """Edit the stacked gradients."""


def _stack(values: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-seed tensors (a parameter's shape, or 0-d constants) stacked so that they broadcast
    against the stacked parameter `like` of shape (K, ...)."""
    stacked = torch.stack(list(values))
    return stacked.view(len(values), *[1] * (like.dim() - stacked.dim()), *values[0].shape)


class _Quadratic(_InStep):
    """``Quadratic.after_backward`` for K seeds: grad += lam * importance * (p - anchor), each
    seed's importance and anchor (estimated by its own strategy object) stacked per task."""

    seeds: list[Quadratic]

    def __init__(self, job: _SeedJob, seeds: list[Quadratic]) -> None:
        super().__init__(job, seeds)
        self.terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def start_task(self) -> None:
        params, seeds = self.job.params, self.seeds
        self.terms = [] if seeds[0].lam == 0 else [
            (params[n], _stack([s.importance[n] for s in seeds], params[n]),
             _stack([s.anchor[n] for s in seeds], params[n])) for n in seeds[0].importance]

    def after_backward(self) -> None:
        for p, omega, anchor in self.terms:
            if p.grad is not None:
                p.grad.addcmul_(omega, p.detach() - anchor, value=self.seeds[0].lam)


class _LwF(_InStep):
    """LwF's penalty for K seeds: each seed's teacher (taken by its own strategy object in
    ``before_task``) stacked, run on that seed's batch, and each seed's KL returned."""

    seeds: list[LwF]

    def __init__(self, job: _SeedJob, seeds: list[LwF]) -> None:
        super().__init__(job, seeds)
        self.teacher: Params | None = None
        self.groups: torch.Tensor | None = None

    def start_task(self) -> None:
        teachers = [s.teacher for s in self.seeds if s.teacher is not None]
        if len(teachers) < len(self.seeds):  # no teacher before the second task
            self.teacher = None
            return
        self.teacher = {n: torch.stack([t.get_parameter(n) for t in teachers])
                        for n in self.job.params}
        self.groups = old_unit_groups(self.job.setting, self.job.task_index)

    def penalty(self, x: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            target = self.job.forward(self.teacher, x)
        lwf = self.seeds[0]
        kl = vmap(grouped_kl, in_dims=(0, 0, None, None))(outputs, target, self.groups,
                                                           lwf.temperature)
        return lwf.alpha * kl


_PARTS: dict[str, type[_InStep] | None] = {
    "naive": None, "joint": None, "replay": None,  # no in-step hook but the model-free `batch`
    "ewc": _Quadratic, "online-ewc": _Quadratic, "mas": _Quadratic, "l2": _Quadratic,
    "l2-sp": _Quadratic, "lwf": _LwF,
}
"""Strategies whose seeds can be batched, with the batched form of their in-step hooks."""


def can_batch(config: RunConfig) -> str | None:
    """None if seeds of `config` can be trained as one batched job, else why not."""
    if config.protocol.model.partition(":")[0] != "mlp":
        return (f"model '{config.protocol.model}' is not batched (only mlp: backbones, which "
                "have no buffers)")
    protocol = config.protocol
    if protocol.precision != "fp32" or protocol.compile or protocol.fused_optimizer:
        # A fused optimizer rounds a stacked tensor's elements differently from a seed's own
        # (measured: 0.3% of a layer's weights off by up to 1e-3 after 25 Adam steps).
        return ("bf16, compiled and fused-optimizer runs are not batched (each seed would not "
                "get its own run's numbers)")
    for name in strategy_names(config.strategy):
        if name not in _PARTS:
            return f"strategy '{name}' has no batched form (batched: {', '.join(_PARTS)})"
    return None


def _without_seed(config: RunConfig) -> str:
    return json.dumps({k: v for k, v in config.to_dict().items() if k != "seed"},
                      sort_keys=True)


@dataclass(frozen=True)
class SeedGroup:
    """Configurations that differ only in their seed, and why they do not run as one batched
    job (None: they do)."""

    configs: tuple[RunConfig, ...]
    reason: str | None


def seed_groups(configs: Iterable[RunConfig]) -> list[SeedGroup]:
    """`configs` grouped by everything but the seed (in order of first appearance), each group
    with the reason it cannot be batched, if any."""
    groups: dict[str, list[RunConfig]] = {}
    for config in configs:
        groups.setdefault(_without_seed(config), []).append(config)
    return [SeedGroup(tuple(g), "a single seed" if len(g) == 1 else can_batch(g[0]))
            for g in groups.values()]


def execute_many(configs: Sequence[RunConfig], data_root: Path, *, batch: bool = True,
                 on_task: Callable[[int, int], None] | None = None,
                 on_record: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """The record of every configuration, in the order given: the seeds of one configuration as
    one batched job where they can be (see `seed_groups`; `batch=False`: never), every other
    run on its own with ``execute``. `on_record` gets each record as soon as its job ends."""
    groups = (seed_groups(configs) if batch
              else [SeedGroup((c,), "batching is off") for c in configs])
    done: dict[str, RunRecord] = {}
    for group in groups:
        records = (execute_batched(group.configs, data_root, on_task) if group.reason is None
                   else [execute(c, data_root, on_task) for c in group.configs])
        for record in records:
            done[record.run_id] = record
            if on_record:
                on_record(record)
    return [done[c.run_id] for c in configs]


def execute_batched(configs: Sequence[RunConfig], data_root: Path,
                    on_task: Callable[[int, int], None] | None = None) -> list[RunRecord]:
    """Run configurations that differ only in their seed as one batched job: one record per
    seed, as ``execute`` would give it, up to float rounding (see the module doc). A job that
    fails is rerun seed by seed, with a warning. `on_task` is called as each seed's own run
    would call it."""
    configs = list(configs)
    if len({_without_seed(c) for c in configs}) != 1:
        raise ValueError("execute_batched takes configurations that differ only in their seed")
    reason = can_batch(configs[0])
    if reason is not None:
        raise CfbenchError(f"cannot batch seeds: {reason}")
    records = [RunRecord(run_id=c.run_id, config=c.to_dict(), started_at=utc_now(),
                         env=environment(c.device)) for c in configs]
    try:
        _SeedJob(configs, data_root).fill(records, on_task)
    except CfbenchError:
        raise
    except Exception as exc:
        warnings.warn(f"batched job of seeds {[c.seed for c in configs]} of "
                      f"{configs[0].strategy} abandoned ({type(exc).__name__}: {exc}); running "
                      "them one at a time", RuntimeWarning, stacklevel=2)
        return [execute(c, data_root, on_task) for c in configs]
    for record in records:
        record.finished_at = utc_now()
    return records


class _SeedJob:
    """K seeds of one configuration: the stacked parameters, and per seed an ordinary model,
    strategy object and context for the hooks that run outside the step."""

    def __init__(self, configs: list[RunConfig], data_root: Path) -> None:
        config = configs[0]
        self.configs, self.data_root, self.k = configs, data_root, len(configs)
        self.device = torch.device(config.device)
        self.scenario, self.setting = run_scenario(config, data_root)
        self.models = [initial_model(c, self.scenario, self.setting, self.device)
                       for c in configs]
        self.strategies = [build_strategy(c.strategy, c.hparams, c.setting) for c in configs]
        self.ctxs = [TrainContext.create(m, self.scenario, self.setting, c.seed, self.device)
                     for m, c in zip(self.models, configs, strict=True)]
        self.layers = _layers(self.models[0])
        self.params: Params = {}
        self.stack()
        self.task_index = -1
        self.optimizer: torch.optim.Optimizer | None = None
        self.in_step = [factory(self, [_part(s, i) for s in self.strategies])
                        for i, name in enumerate(strategy_names(config.strategy))
                        if (factory := _PARTS[name]) is not None]

    def stack(self) -> None:
        """Take the stacked parameters from the per-seed models."""
        self.params = stack_module_state(self.models)[0]

    @torch.no_grad()
    def unstack(self) -> None:
        """Copy each seed's parameters into its model, for the hooks run per seed."""
        for k, model in enumerate(self.models):
            for name, p in model.named_parameters():
                p.copy_(self.params[name][k])

    def each(self, hook: str, *args: Any) -> None:
        """Run a hook of every seed's strategy on that seed's model and context."""
        self.unstack()
        for strategy, ctx in zip(self.strategies, self.ctxs, strict=True):
            getattr(strategy, hook)(ctx, *args)

    def set_task(self, index: int) -> None:
        """Where the sequence is, for the job and every seed's context."""
        self.task_index = index
        for ctx in self.ctxs:
            ctx.task_index = index

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Outputs (K, B, U) of every seed's network on its own inputs x (K, B, ...)."""
        for name, module in self.layers:
            if isinstance(module, nn.Flatten):
                x = x.flatten(2)
            elif isinstance(module, nn.Linear):
                x = _StackedLinear.apply(x, params[f"{name}.weight"], params[f"{name}.bias"])
            else:
                x = x.relu()
        return x

    @torch.inference_mode()
    def evaluate(self) -> list[list[float]]:
        """Each seed's row of R, as ``evaluate`` computes it, with one host sync."""
        ctx, size = self.ctxs[0], self.scenario.protocol.eval_batch_size
        correct = []
        for i in range(len(self.scenario.tasks)):
            data = ctx.task_data(i, "test")
            hits = torch.zeros(self.k, dtype=torch.long, device=self.device)
            for start in range(0, len(data), size):
                batch = ctx.make_batch(data, slice(start, start + size))
                x = batch.x.expand(self.k, *batch.x.shape)
                scores = apply_mask(self.forward(self.params, x),
                                    self.setting.mask(batch.task, self.task_index))
                hits += (scores.argmax(2) == batch.y).sum(1)
            correct.append(hits)
        counts = torch.stack(correct, 1).tolist()
        return [[c / len(t.y_test) for c, t in zip(row, self.scenario.tasks, strict=True)]
                for row in counts]

    def forward_backward(self, data: list[TrainData], idx: tuple[torch.Tensor, ...],
                         has_batch: bool, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One step's gradients for every seed; returns each seed's loss (K,)."""
        batches = []
        for strategy, ctx, d, i in zip(self.strategies, self.ctxs, data, idx, strict=True):
            batch = ctx.make_batch(d, i, augment=True)
            batches.append(strategy.batch(ctx, batch) if has_batch else batch)
        x = torch.stack([b.x for b in batches])
        y, task = torch.cat([b.y for b in batches]), torch.cat([b.task for b in batches])
        outputs = self.forward(self.params, x)
        logits = apply_mask(outputs.flatten(0, 1), self.setting.mask(task, self.task_index))
        losses = F.cross_entropy(logits, y, reduction="none").view(self.k, -1).mean(1)
        for part in self.in_step:
            extra = part.penalty(x, outputs)
            if extra is not None:
                losses = losses + extra
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        return losses.detach()

    def train_task(self, t: int) -> TaskCost:
        """``train_task`` for every seed at once (a seed's TaskCost: all seeds take the same
        steps)."""
        task, protocol = self.scenario.tasks[t], self.scenario.protocol
        self.each("before_task", task)
        for part in self.in_step:
            part.start_task()
        data = [s.train_data(c, task, c.task_data(t))
                for s, c in zip(self.strategies, self.ctxs, strict=True)]
        size = len(data[0])
        if any(len(d) != size for d in data):
            raise RuntimeError("the seeds' strategies train on different numbers of samples")
        for ctx in self.ctxs:
            ctx.stop_task, ctx.task_size = False, size
        if protocol.reset_optimizer or self.optimizer is None:
            self.optimizer = make_optimizer(protocol, list(self.params.values()))
        optimizer = self.optimizer
        steps = protocol.steps(size)
        orders = [minibatch_indices(size, protocol.batch_size, steps, c.batch_generator,
                                    self.device) for c in self.ctxs]
        has_batch = overrides(self.strategies[0], "batch")
        first_bad = (None if reads_are_free(self.device)
                     else torch.full((self.k,), -1, dtype=torch.long, device=self.device))
        step_flops = 0
        for i, idx in enumerate(zip(*orders, strict=True)):
            if i == 0:
                with FlopCounterMode(display=False) as counter:
                    losses = self.forward_backward(data, idx, has_batch, optimizer)
                step_flops = counter.get_total_flops() // self.k
            else:
                losses = self.forward_backward(data, idx, has_batch, optimizer)
            if first_bad is None:
                bad = [v for v in losses.tolist() if not math.isfinite(v)]
                if bad:
                    raise NonFiniteLoss(task, t, i, bad[0])
            else:
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses), i, first_bad)
                if (i + 1) % NONFINITE_CHECK_EVERY == 0:
                    _check_flags(first_bad, task, t)
            for part in self.in_step:
                part.after_backward()
            optimizer.step()
            for ctx in self.ctxs:
                ctx.step += 1
        if first_bad is not None:
            _check_flags(first_bad, task, t)
        self.each("after_task", task)
        return TaskCost(steps, step_flops * steps)

    def fill(self, records: list[RunRecord], on_task: Callable[[int, int], None] | None
             ) -> None:
        """Fill one record per seed, as ``experiment._fill`` fills a single run's."""
        scenario, device, tasks = self.scenario, self.device, self.scenario.tasks
        for record in records:
            record.tasks = task_summaries(scenario)
        warm_up()
        train_clock, eval_clock = Stopwatch(device), Stopwatch(device)
        reset_peak_memory(device)
        rows: list[list[list[float]]] = [[] for _ in records]

        def evaluate() -> None:
            with eval_clock:
                for R, row in zip(rows, self.evaluate(), strict=True):
                    R.append(row)

        first = 0
        if scenario.source is not None:
            evaluate()
            for model, config in zip(self.models, self.configs, strict=True):
                model.load_state_dict(source_state(config, scenario, self.setting,
                                                   self.data_root))
            self.stack()
            self.set_task(0)
            first = 1
        start = [{id(p): p.detach().clone() for p in m.parameters()} for m in self.models]
        self.each("setup")
        if first:
            self.each("before_task", tasks[0])
            self.each("after_task", tasks[0])
        evaluate()
        costs = []
        for t in range(first, len(tasks)):
            self.set_task(t)
            with train_clock:
                costs.append(self.train_task(t))
            evaluate()
            for record in records:
                record.tasks[t]["steps"] = costs[-1].steps
                if on_task:
                    on_task(t + 1, len(tasks))
        self.unstack()
        for k, record in enumerate(records):
            record.R = rows[k]
            record.metrics = run_metrics(rows[k], self.models[k], start[k], transfer=bool(first))
            record.strategy_log = self.ctxs[k].log
            record.cost = {
                "train_seconds": train_clock.seconds / self.k,
                "eval_seconds": eval_clock.seconds / self.k,
                "steps": sum(c.steps for c in costs),
                "train_flops": sum(c.flops for c in costs),
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_gpu_bytes": peak_gpu_bytes(device),
                "state_bytes": self.strategies[k].state_bytes(),
                "batched_seeds": self.k,
            }


class _StackedLinear(torch.autograd.Function):
    """K linear layers at once: x (K, B, in) @ weight (K, out, in)^T + bias (K, out).

    Differentiated as ``nn.Linear`` is (the weight's gradient computed as g^T x, in the
    weight's own layout), not as autograd differentiates the batched product (x^T g, then
    transposed), which sums in another order: each seed's gradient is then the one its own
    run computes, bit for bit with single-threaded CPU kernels, so Adam, which turns rounding
    noise in a near-zero gradient into a learning-rate-sized step, has none to amplify."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_x, torch.bmm(grad.transpose(1, 2), x), grad.sum(1)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of an ``mlp:`` backbone (Flatten, Linear with bias, ReLU), in order."""
    layers = list(model.named_children())
    for name, module in layers:
        if not (isinstance(module, nn.Flatten | nn.ReLU)
                or (isinstance(module, nn.Linear) and module.bias is not None)):
            raise RuntimeError(f"layer {name} ({type(module).__name__}) has no batched form")
    return layers


def _part(strategy: Strategy, index: int) -> Strategy:
    """Part `index` of a (possibly composed) strategy."""
    return strategy.parts[index] if isinstance(strategy, Compose) else strategy


def _check_flags(first_bad: torch.Tensor, task: Any, task_index: int) -> None:
    """Read the seeds' device-side non-finite flags (one sync); raise if any is set."""
    bad = [step for step in first_bad.tolist() if step >= 0]
    if bad:
        raise NonFiniteLoss(task, task_index, min(bad), None)
