"""The one training loop and the evaluator, shared by every strategy and every backend.

Data stays on the device; minibatches are index slices of a seeded permutation (no DataLoader,
no per-sample Python). Hooks a strategy does not override are never called, so naive fine-tuning
costs what a bare PyTorch loop costs. Nothing in the step loop synchronises with the host: a
non-finite loss stops the run at once on the CPU (reading a CPU scalar is free) and within
`NONFINITE_CHECK_EVERY` steps on an accelerator, where a device-side flag is read that often.

The loop drives a backend: K >= 1 members (configurations sharing a scenario, setting and
protocol), each with its own context (so its own minibatch order) and strategy object, trained
in lockstep. `ModelBackend` trains one ordinary model; ``cfbench.batched.StackedBackend`` trains
K stacked networks as one job. A backend supplies the forward and backward pass, the hooks
around the optimizer step and the evaluation outputs; the budget, the minibatch order, the FLOP
count, the non-finite check and the evaluator exist once, here.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from cfbench.scenario import Protocol, Setting, Task, apply_mask
from cfbench.strategy import Batch, Strategy, TrainContext, TrainData, overrides


def minibatch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator,
                      device: torch.device) -> Iterator[torch.Tensor]:
    """`steps` index batches: consecutive slices of fresh permutations of range(n).

    Each pass over the data is one permutation, split into batches of `batch_size` (the last one
    of a pass may be shorter), so an integer number of epochs visits every sample exactly once
    per epoch.
    """
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator).to(device)
        for idx in perm.split(batch_size):
            yield idx
            done += 1
            if done == steps:
                return


def make_optimizer(protocol: Protocol, params: list) -> torch.optim.Optimizer:
    fused = protocol.fused_optimizer or None  # None: torch's default (foreach) kernel
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(params, lr=protocol.lr, fused=fused)
    return torch.optim.Adam(params, lr=protocol.lr, fused=fused)


def autocast(protocol: Protocol, device: torch.device) -> contextlib.AbstractContextManager:
    """The precision forward passes run in: bfloat16 autocast for ``precision="bf16"``."""
    if protocol.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def warm_up() -> None:
    """Pay one-time process costs (the FLOP counter's lazy imports, about a second) once, before
    any clock runs, so the first run in a process is not charged for them."""
    layer = torch.nn.Linear(2, 2)
    with FlopCounterMode(display=False):
        layer(torch.zeros(1, 2)).sum().backward()


NONFINITE_CHECK_EVERY = 50
"""On an accelerator, steps between reads of the non-finite-loss flag (each read syncs)."""


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a scalar of `device` on the host costs no synchronisation (the CPU)."""
    return device.type == "cpu"


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite: the run stops and is recorded as failed.
    `member`: whose loss it was, of the K members a backend trains."""

    def __init__(self, task: Task, task_index: int, step: int, value: float | None,
                 member: int = 0) -> None:
        self.member = member
        what = "non-finite loss" + (f" {value}" if value is not None else " (nan or inf)")
        super().__init__(f"{what} at task {task_index + 1} ('{task.name}'), step {step + 1} "
                         "of that task; the run was stopped")


def _check_flags(first_bad: torch.Tensor, task: Task, task_index: int) -> None:
    """Read the members' device-side non-finite flags (one sync); stop the run if one is set."""
    bad = [(step, member) for member, step in enumerate(first_bad.tolist()) if step >= 0]
    if bad:
        step, member = min(bad)
        raise NonFiniteLoss(task, task_index, step, None, member)


CURVE_POINTS = 50
"""Points per task of a run's training-loss curve (``RunRecord.curves``): each the mean loss
over one of this many equal chunks of the task's steps (one per step when there are fewer)."""


@dataclass(frozen=True)
class TaskCost:
    """What training one task took: optimizer steps and their floating-point operations (per
    member), and each member's training-loss curve (`CURVE_POINTS` chunk means at most)."""

    steps: int
    flops: int
    losses: tuple[tuple[float, ...], ...] = ()


def _chunk_means(sums: torch.Tensor, steps: int, done: int) -> tuple[tuple[float, ...], ...]:
    """Each member's mean loss per chunk from `sums` (chunks x K, one host sync): chunk j
    holds steps [ceil(j*steps/n), ceil((j+1)*steps/n)) of which the first `done` ran; chunks
    no step reached are left out (a task stopped early)."""
    n = len(sums)
    counts = [min(-(-(j + 1) * steps // n), done) - -(-j * steps // n) for j in range(n)]
    return tuple(tuple(s / c for s, c in zip(member, counts, strict=True) if c > 0)
                 for member in sums.T.tolist())


_STEP_HOOKS = ("batch", "loss", "penalty", "after_backward", "after_step", "predict")


class ModelBackend:
    """One member, one ordinary model: every hook runs on it directly."""

    batched = False
    """Whether members share one stacked job (their records say so, with its costs / K)."""

    def __init__(self, ctxs: list[TrainContext], strategies: list[Strategy]) -> None:
        if len(ctxs) != 1 and not self.batched:
            raise ValueError("a ModelBackend trains one member; stack several with batched")
        self.ctxs, self.strategies, self.k = ctxs, strategies, len(ctxs)
        self.scenario, self.device = ctxs[0].scenario, ctxs[0].device
        self.has = {hook: overrides(strategies[0], hook) for hook in _STEP_HOOKS}
        self.optimizer: torch.optim.Optimizer | None = None
        self.batches: list[Batch] = []
        """Each member's stream minibatch of the current step, as drawn from its task (before
        any ``batch`` hook): what the after-hooks receive."""

    def sync(self) -> None:
        """Make each member's ``ctx.model`` hold its current parameters (a stacked backend
        trains its own copy of them)."""

    def each(self, hook: str, *args: object) -> None:
        """Run a hook of every member's strategy on its context, outside the step."""
        self.sync()
        for strategy, ctx in zip(self.strategies, self.ctxs, strict=True):
            getattr(strategy, hook)(ctx, *args)

    def set_task(self, index: int) -> None:
        for ctx in self.ctxs:
            ctx.task_index = index

    def load(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Load a state dict into each member's model (the learned transfer source)."""
        for ctx, state in zip(self.ctxs, states, strict=True):
            ctx.model.load_state_dict(state)

    def begin_task(self, task: Task) -> list[TrainData]:
        """``before_task`` and ``train_data`` of every member, then the optimizer; returns what
        each member trains on."""
        self.each("before_task", task)
        data = [s.train_data(c, task, c.task_data(c.task_index))
                for s, c in zip(self.strategies, self.ctxs, strict=True)]
        if len({len(d) for d in data}) > 1:
            raise RuntimeError("the members' strategies train on different numbers of samples")
        for ctx in self.ctxs:
            ctx.stop_task, ctx.task_size = False, len(data[0])
        self.ready()
        return data

    def ready(self) -> None:
        """The task's optimizer (rebuilt unless the protocol keeps one), the model in training
        mode. The model is read after ``before_task``: a strategy may have replaced it."""
        ctx, strategy, protocol = self.ctxs[0], self.strategies[0], self.scenario.protocol
        if protocol.reset_optimizer or ctx.optimizer is None:
            groups = (strategy.param_groups(ctx)
                      or [p for p in ctx.model.parameters() if p.requires_grad])
            ctx.optimizer = make_optimizer(protocol, groups)
        self.optimizer = ctx.optimizer
        ctx.model.train()

    def forward_backward(self, data: list[TrainData], idx: tuple[torch.Tensor, ...]
                         ) -> torch.Tensor:
        """One step's gradients; returns each member's loss (detached)."""
        ctx, strategy, has = self.ctxs[0], self.strategies[0], self.has
        with autocast(self.scenario.protocol, self.device):
            stream = ctx.make_batch(data[0], idx[0], augment=True)
            batch = strategy.batch(ctx, stream) if has["batch"] else stream
            logits = ctx.logits(batch)
            loss = strategy.loss(ctx, batch, logits) if has["loss"] else ctx.loss(logits, batch)
            if has["penalty"]:
                extra = strategy.penalty(ctx, batch, logits)
                if extra is not None:
                    loss = loss + extra
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.batches = [stream]
        return loss.detach()

    def after_backward(self) -> None:
        if self.has["after_backward"]:
            self.strategies[0].after_backward(self.ctxs[0], self.batches[0])

    def after_step(self) -> None:
        """After the optimizer step (and ``ctx.step`` counted it)."""
        if self.has["after_step"]:
            for strategy, ctx, batch in zip(self.strategies, self.ctxs, self.batches,
                                            strict=True):
                strategy.after_step(ctx, batch)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        model = self.ctxs[0].model
        was_training = model.training
        model.eval()
        yield
        model.train(was_training)

    def scores(self, batch: Batch, predict: bool) -> torch.Tensor:
        """What the objective scores on a test batch: the strategy's ``predict`` scores (with
        `predict`, where it has its own), else the masked logits; stacked: (K, B, ...)."""
        ctx, strategy = self.ctxs[0], self.strategies[0]
        with autocast(self.scenario.protocol, self.device):
            if predict and self.has["predict"]:
                return strategy.predict(ctx, batch)
            return ctx.logits(batch)


def run_task(backend: ModelBackend, task: Task) -> TaskCost:
    """Train every member of `backend` on the task at its ``ctx.task_index`` for the protocol's
    budget.

    With ``iterations`` every strategy takes exactly that many steps. With ``epochs``, an epoch
    is one pass over the data the strategy trains on: the task's own data for all but
    strategies that widen it in ``train_data`` (joint training passes over the union, as
    cumulative training does in the literature, and its cost shows it).

    A hook may end the task early by setting ``ctx.stop_task`` (the steps taken are
    reported). FLOPs are counted once per task over its whole first step (batch, forward,
    penalty, backward, after_backward, optimizer step, after_step: replayed samples and
    reference gradients included) and multiplied by the number of steps; work a strategy does
    outside the step (a Fisher estimate, a buffer rebuilt at a task's end) is not counted.
    """
    ctxs, protocol, device = backend.ctxs, backend.scenario.protocol, backend.device
    index = ctxs[0].task_index
    data = backend.begin_task(task)
    size = len(data[0])
    steps = protocol.steps(size)
    orders = [minibatch_indices(size, protocol.batch_size, steps, c.batch_generator, device)
              for c in ctxs]
    # Accelerator: each member's first step whose loss was not finite (-1: none), on the device.
    first_bad = (None if reads_are_free(device)
                 else torch.full((backend.k,), -1, dtype=torch.long, device=device))
    # The loss curve: each member's loss summed per chunk of steps, on the device (no sync).
    points = min(CURVE_POINTS, steps)
    loss_sums = torch.zeros(points, backend.k, device=device)

    def step(i: int, idx: tuple[torch.Tensor, ...]) -> None:
        nonlocal first_bad
        losses = backend.forward_backward(data, idx)
        loss_sums[i * points // steps].add_(losses.view(-1))
        if first_bad is None:
            for member, value in enumerate(losses.view(-1).tolist()):
                if not math.isfinite(value):
                    raise NonFiniteLoss(task, index, i, value, member)
        else:
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses), i, first_bad)
            if (i + 1) % NONFINITE_CHECK_EVERY == 0:
                _check_flags(first_bad, task, index)
        backend.after_backward()
        assert backend.optimizer is not None
        backend.optimizer.step()
        for ctx in ctxs:
            ctx.step += 1
        backend.after_step()

    step_flops, done = 0, 0
    for i, idx in enumerate(zip(*orders, strict=True)):
        if i == 0:
            with FlopCounterMode(display=False) as counter:
                step(i, idx)
            step_flops = counter.get_total_flops() // backend.k
        else:
            step(i, idx)
        done = i + 1
        if any(ctx.stop_task for ctx in ctxs):
            break
    if first_bad is not None:
        _check_flags(first_bad, task, index)
    backend.each("after_task", task)
    return TaskCost(done, step_flops * done, _chunk_means(loss_sums, steps, done))


def train_task(ctx: TrainContext, strategy: Strategy, task: Task) -> TaskCost:
    """Train one model on the task at ``ctx.task_index`` (see `run_task`)."""
    return run_task(ModelBackend([ctx], [strategy]), task)


def _task_sums(backend: ModelBackend, predict: bool, setting: Setting | None = None
               ) -> torch.Tensor:
    """The objective's sums on every task's test split, (K, T, S) stacked or (T, S); scores
    masked to `setting`'s units too where given (a strategy's ``predict`` may ignore masks)."""
    ctx, scenario = backend.ctxs[0], backend.scenario
    objective, size = scenario.objective, scenario.protocol.eval_batch_size
    sums = []
    for i in range(len(scenario.tasks)):
        data = ctx.task_data(i, "test")
        parts = []
        for start in range(0, len(data), size):
            batch = ctx.make_batch(data, slice(start, start + size))
            scores = backend.scores(batch, predict)
            if setting is not None:
                scores = apply_mask(scores, setting.mask(batch.task, ctx.task_index))
            parts.append(objective.measure(scores, batch.y))
        sums.append(sum(parts[1:], parts[0]))
    return torch.stack(sums, -2)


@contextlib.contextmanager
def _scored_in(backend: ModelBackend, setting: Setting) -> Iterator[None]:
    """Every member's context in `setting` while the model is scored in it (logits and a
    strategy's ``predict`` read its masks), then back in the run's own."""
    own = [ctx.setting for ctx in backend.ctxs]
    for ctx in backend.ctxs:
        ctx.setting = setting
    try:
        yield
    finally:
        for ctx, setting_of_run in zip(backend.ctxs, own, strict=True):
            ctx.setting = setting_of_run


@torch.inference_mode()
def evaluate_members(backend: ModelBackend, predict: bool = True
                     ) -> list[dict[str, list[float]]]:
    """Each member's row of R (key ``"R"``) and of every matrix its scenario's objective keeps,
    as of ``ctx.task_index``, with one host sync. For each setting the protocol's
    `also_evaluate` names, the same rows of the same model scored in that setting, keyed
    ``"R@task"``, ``"loss@task"``... `predict`: use the strategies' ``predict``."""
    scenario, objective = backend.scenario, backend.scenario.objective
    others = [Setting(scenario, name) for name in scenario.protocol.also_evaluate]
    with backend.evaluating():
        sums = [_task_sums(backend, predict)]
        for setting in others:
            with _scored_in(backend, setting):
                sums.append(_task_sums(backend, predict, setting))
    table = torch.stack(sums).view(len(sums), backend.k, len(scenario.tasks), -1).tolist()
    rows: list[dict[str, list[float]]] = [{} for _ in range(backend.k)]  # the one sync above
    for suffix, members in zip(["", *(f"@{s.name}" for s in others)], table, strict=True):
        for row, member in zip(rows, members, strict=True):
            scores = [objective.summarise(task_sums) for task_sums in member]
            row[f"R{suffix}"] = [score for score, _ in scores]
            for name in objective.matrices:
                row[f"{name}{suffix}"] = [extra[name] for _, extra in scores]
    return rows


def evaluate(ctx: TrainContext, strategy: Strategy | None = None) -> list[float]:
    """One model's row of R: its score on every task (as of ``ctx.task_index``), predicting
    with the strategy's ``predict`` where it has one."""
    backend = ModelBackend([ctx], [strategy or Strategy()])
    return evaluate_members(backend, predict=strategy is not None)[0]["R"]
