"""The one training loop and the evaluator, shared by every strategy.

Data stays on the device; minibatches are index slices of a seeded permutation (no DataLoader,
no per-sample Python). Hooks a strategy does not override are never called, so naive fine-tuning
costs what a bare PyTorch loop costs. Nothing in the step loop synchronises with the host: a
non-finite loss stops the run at once on the CPU (reading a CPU scalar is free) and within
`NONFINITE_CHECK_EVERY` steps on an accelerator, where a device-side flag is read that often.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from cfbench.scenario import Protocol, Task
from cfbench.strategy import Strategy, TrainContext, overrides


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
    """The training loss became NaN or infinite: the run stops and is recorded as failed."""

    def __init__(self, task: Task, task_index: int, step: int, value: float | None) -> None:
        what = "non-finite loss" + (f" {value}" if value is not None else " (nan or inf)")
        super().__init__(f"{what} at task {task_index + 1} ('{task.name}'), step {step + 1} "
                         "of that task; the run was stopped")


def _check_flag(first_bad: torch.Tensor, task: Task, task_index: int) -> None:
    """Read the device-side non-finite flag (one sync) and stop the run if it is set."""
    bad = int(first_bad)
    if bad >= 0:
        raise NonFiniteLoss(task, task_index, bad, None)


@dataclass(frozen=True)
class TaskCost:
    """What training one task took: optimizer steps and their floating-point operations."""

    steps: int
    flops: int


def train_task(ctx: TrainContext, strategy: Strategy, task: Task) -> TaskCost:
    """Train on the task at ``ctx.task_index`` for the protocol's budget.

    With ``iterations`` every strategy takes exactly that many steps. With ``epochs``, an epoch
    is one pass over the data the strategy trains on: the task's own data for all but
    strategies that widen it in ``train_data`` (joint training passes over the union, as
    cumulative training does in the literature, and its cost shows it).

    A hook may end the task early by setting ``ctx.stop_task`` (the steps taken are
    reported). FLOPs are counted once per task, on its first step (forward, penalty and backward,
    replayed samples included), and multiplied by the number of steps; work a strategy does
    outside the step (a Fisher estimate, a buffer update) is not counted.
    """
    protocol = ctx.scenario.protocol
    has_batch = overrides(strategy, "batch")
    has_loss = overrides(strategy, "loss")
    has_penalty = overrides(strategy, "penalty")
    has_after_backward = overrides(strategy, "after_backward")
    has_after_step = overrides(strategy, "after_step")

    strategy.before_task(ctx, task)
    model = ctx.model  # read after before_task: a strategy may grow the model (a new column)
    ctx.stop_task = False
    data = strategy.train_data(ctx, task, ctx.task_data(ctx.task_index))
    ctx.task_size = len(data)
    if protocol.reset_optimizer or ctx.optimizer is None:
        groups = strategy.param_groups(ctx) or [p for p in model.parameters() if p.requires_grad]
        ctx.optimizer = make_optimizer(protocol, groups)
    optimizer = ctx.optimizer

    def forward_backward(idx: torch.Tensor) -> torch.Tensor:
        with autocast(protocol, ctx.device):
            batch = ctx.make_batch(data, idx, augment=True)
            if has_batch:
                batch = strategy.batch(ctx, batch)
            logits = ctx.logits(batch)
            loss = strategy.loss(ctx, batch, logits) if has_loss else ctx.loss(logits, batch)
            if has_penalty:
                extra = strategy.penalty(ctx, batch, logits)
                if extra is not None:
                    loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    steps = protocol.steps(len(data))
    step_flops = 0
    # Accelerator: the first step whose loss was not finite (-1: none), kept on the device.
    first_bad = (None if reads_are_free(ctx.device)
                 else torch.full((), -1, dtype=torch.long, device=ctx.device))
    model.train()
    done = 0
    for i, idx in enumerate(minibatch_indices(len(data), protocol.batch_size, steps,
                                              ctx.batch_generator, ctx.device)):
        if i == 0:
            with FlopCounterMode(display=False) as counter:
                loss = forward_backward(idx)
            step_flops = counter.get_total_flops()
        else:
            loss = forward_backward(idx)
        if first_bad is None:
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(task, ctx.task_index, i, value)
        else:
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
            if (i + 1) % NONFINITE_CHECK_EVERY == 0:
                _check_flag(first_bad, task, ctx.task_index)
        if has_after_backward:
            strategy.after_backward(ctx)
        optimizer.step()
        ctx.step += 1
        done = i + 1
        if has_after_step:
            strategy.after_step(ctx)
        if ctx.stop_task:
            break
    if first_bad is not None:
        _check_flag(first_bad, task, ctx.task_index)
    strategy.after_task(ctx, task)
    return TaskCost(done, step_flops * done)


@torch.inference_mode()
def evaluate(ctx: TrainContext, strategy: Strategy | None = None) -> list[float]:
    """Test accuracy on every task of the scenario: one row of R (as of ``ctx.task_index``).

    Predictions are the argmax of the strategy's ``predict`` scores (the masked logits unless
    the strategy classifies differently)."""
    scenario, model = ctx.scenario, ctx.model
    predict = strategy.predict if strategy and overrides(strategy, "predict") else None
    was_training = model.training
    model.eval()
    correct = []
    size = scenario.protocol.eval_batch_size
    for i in range(len(scenario.tasks)):
        data = ctx.task_data(i, "test")
        hits = torch.zeros((), dtype=torch.long, device=ctx.device)
        for start in range(0, len(data), size):
            batch = ctx.make_batch(data, slice(start, start + size))
            with autocast(scenario.protocol, ctx.device):
                scores = predict(ctx, batch) if predict else ctx.logits(batch)
            hits += (scores.argmax(1) == batch.y).sum()
        correct.append(hits)
    counts = torch.stack(correct).tolist()  # the one host sync of an evaluation
    model.train(was_training)
    return [c / len(t.y_test) for c, t in zip(counts, scenario.tasks, strict=True)]
