"""Gradient protection: damp the learning of parameters whose gradients varied on earlier tasks.

A bounded, vectorised form of a common sketch (a ``GradientProtector`` that keeps every
parameter's gradient history, takes importance = sigmoid(variance of the history) and multiplies
the gradient by (1 - importance) where importance exceeds a threshold). What changes, and why:

- Per element, not per tensor. The sketch's ``torch.var`` of the stacked history is one number
  per tensor, so a whole layer is protected or not; here each element has its own importance.
- Bounded memory. The sketch keeps all gradients (it trims to 100, i.e. 100 copies of the
  model). Two estimators of each element's gradient variance over a task: ``window``, the exact
  variance of the last `window` gradients in a ring buffer (``window`` floats per parameter),
  and ``ema``, an exponentially weighted variance updated in place (West's incremental
  weighted form of Welford's algorithm: weight max(1 - beta, 1/n) at step n, so the first
  1/(1 - beta) steps are exactly Welford's running variance and later steps forget with rate
  beta; two floats per parameter). Both are the population variance (the n - 1 correction
  cancels in the normalisation below).
- Earlier tasks only. The sketch mixes the current task's gradients into the importance, which
  damps whatever is noisy *now*: it slows the current task, not forgetting. Here statistics are
  gathered during a task and become importance only when it ends; importance is the maximum
  over finished tasks (a parameter that mattered to any earlier task stays protected), fixed
  during the next task. A task learned in fewer than two steps (the source of a transfer
  scenario, which the run learns before the strategy starts) has its variance estimated at
  its end from gradients of its own training minibatches (`window` of them, or 1/(1 - beta)).
- A meaningful threshold. sigmoid(v) >= 0.5 for every v >= 0, so with raw variances a
  threshold below 0.5 protects everything and, since gradient variances are tiny, every
  importance is about 0.5: the sketch's rule halves every gradient. Here the variance is
  normalised by its mean over the tensor (score s = v / mean v: scale-free, mean 1) before the
  sigmoid, and thresholds below 0.5 are rejected. With the default 0.9 an element is protected
  when its gradient varied more than ln 9 = 2.2 times its tensor's average, and its learning is
  multiplied by 1 - sigmoid(s) <= 0.1.
- Damping that works with any optimizer. Multiplying a gradient element by a factor fixed for the
  whole task does nothing under Adam (its update m / sqrt(v) is invariant to a constant scale
  of an element's gradients), and the default protocols use Adam. ``damp="update"`` (the
  default) therefore scales the optimizer's *step* of each protected element by the factor
  (theta <- theta - (1 - f) * step after the optimizer's update); ``damp="gradient"`` is the
  sketch's rule, the gradient multiplied by f before the step (equivalent under plain SGD).

Cost, float32: 16 bytes per trainable parameter with ``ema`` (running mean, running variance,
importance, factor) and 4 * (window + 2) with ``window`` (ring buffer, importance, factor), all
counted in ``state_bytes``; ``damp="update"`` also copies the parameters each step (4 bytes per
parameter, transient).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cfbench.registry import register_strategy
from cfbench.scenario import Task
from cfbench.strategy import Batch, Strategy, TrainContext

Params = dict[str, torch.Tensor]


class WindowVariance:
    """Exact variance of each element's last `window` gradients, kept in a ring buffer."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.ring: Params = {}
        self.steps = 0

    def reset(self, params: dict[str, nn.Parameter]) -> None:
        self.ring = {n: self.ring[n] if n in self.ring and self.ring[n].shape[1:] == p.shape
                     else torch.zeros(self.window, *p.shape, dtype=p.dtype, device=p.device)
                     for n, p in params.items()}
        self.steps = 0

    def update(self, grads: Params) -> None:
        slot = self.steps % self.window
        for name, g in grads.items():
            self.ring[name][slot].copy_(g)
        self.steps += 1

    def variance(self) -> Params:
        filled = min(self.steps, self.window)
        return {n: r[:filled].var(dim=0, correction=0) for n, r in self.ring.items()}

    def buffers(self) -> list[torch.Tensor]:
        return list(self.ring.values())


class EmaVariance:
    """Exponentially weighted mean and variance of each element's gradients, in place."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.mean: Params = {}
        self.var: Params = {}
        self.steps = 0

    def reset(self, params: dict[str, nn.Parameter]) -> None:
        self.mean = {n: torch.zeros_like(p) for n, p in params.items()}
        self.var = {n: torch.zeros_like(p) for n, p in params.items()}
        self.steps = 0

    def update(self, grads: Params) -> None:
        self.steps += 1
        a = max(1.0 - self.beta, 1.0 / self.steps)
        for name, g in grads.items():
            diff = g - self.mean[name]
            self.mean[name].add_(diff, alpha=a)
            self.var[name].addcmul_(diff, diff, value=a).mul_(1.0 - a)

    def variance(self) -> Params:
        return dict(self.var)

    def buffers(self) -> list[torch.Tensor]:
        return [*self.mean.values(), *self.var.values()]


@register_strategy("grad-protect", family="gradient",
                   reference="GradientProtector sketch: sigmoid of gradient variance")
class GradientProtection(Strategy):
    """Damps the learning of each parameter element in proportion to how much its gradient
    varied on earlier tasks: importance = sigmoid(variance / mean variance of its tensor), and
    where importance > `threshold` the element learns at (1 - importance) of its rate.

    See the module docstring for the exact rule and its departures from the sketch it bounds.
    `threshold` (in [0.5, 1)) trades plasticity for stability: lower protects more elements
    (0.5 protects every element whose gradient varied at all) with a milder damping at the
    threshold itself (factor 1 - threshold). `estimator` picks the variance estimate:
    ``ema`` (16 bytes per parameter in all; `beta` is its memory, about 1/(1 - beta) steps) or
    ``window`` (exact over the last `window` steps; 4 * (window + 2) bytes per parameter).
    `damp` scales the optimizer's step (``update``, effective under any optimizer) or the
    gradient (``gradient``, the sketch's rule; a no-op under Adam, see the module docstring).
    """

    def __init__(self, *, threshold: float = 0.9, estimator: Literal["ema", "window"] = "ema",
                 window: int = 100, beta: float = 0.99,
                 damp: Literal["update", "gradient"] = "update") -> None:
        if not 0.5 <= threshold < 1:
            raise ValueError(f"threshold must be in [0.5, 1) (importance is a sigmoid of a "
                             f"non-negative score, never below 0.5), got {threshold}")
        if window < 2:
            raise ValueError(f"window must be at least 2 gradients, got {window}")
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        self.threshold, self.damp = threshold, damp
        self.estimator: WindowVariance | EmaVariance = (
            WindowVariance(window) if estimator == "window" else EmaVariance(beta))
        self.memory = window if estimator == "window" else round(1 / (1 - beta))
        self.params: dict[str, nn.Parameter] = {}
        self.importance: Params = {}
        self.factor: Params = {}
        self.before: Params = {}

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        self.params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        self.estimator.reset(self.params)

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        self.estimator.update(grads)
        if self.damp == "gradient":
            for name, g in grads.items():
                if name in self.factor:
                    g.mul_(self.factor[name])
        else:
            self.before = {n: self.params[n].detach().clone() for n in grads
                           if n in self.factor}

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        """``damp="update"``: theta <- theta - (1 - f) * (theta - theta_before); elements with
        f = 1 keep the optimizer's value bit for bit."""
        with torch.no_grad():
            for name, before in self.before.items():
                p = self.params[name]
                p.sub_((p - before).mul_(1.0 - self.factor[name]))
        self.before = {}

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        if self.estimator.steps < 2:
            self._estimate_on_data(ctx)
        for name, var in self.estimator.variance().items():
            score = var / var.mean().clamp_min(torch.finfo(var.dtype).tiny)
            importance = torch.sigmoid(score)
            if name in self.importance:
                importance = torch.maximum(self.importance[name], importance)
            self.importance[name] = importance
            self.factor[name] = torch.where(importance > self.threshold, 1.0 - importance, 1.0)
        protected = sum(int((f < 1).sum()) for f in self.factor.values())
        total = sum(f.numel() for f in self.factor.values())
        ctx.log.setdefault("grad-protect", []).append(
            {"task": ctx.task_index, "protected_fraction": protected / max(total, 1)})

    def _estimate_on_data(self, ctx: TrainContext) -> None:
        """Gradient statistics of the task at the current parameters, from `memory` minibatches
        of its training data (a task learned before the strategy saw it train)."""
        data = ctx.task_data(ctx.task_index)
        size = ctx.scenario.protocol.batch_size
        order = torch.randperm(len(data), generator=ctx.generator).to(ctx.device)
        names = list(self.params)
        for idx in order.split(size)[:self.memory]:
            batch = ctx.make_batch(data, idx)
            loss = ctx.loss(ctx.logits(batch), batch)
            grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
            self.estimator.update({n: g for n, g in zip(names, grads, strict=True)
                                   if g is not None})

    def state_bytes(self) -> int:
        tensors = [*self.estimator.buffers(), *self.importance.values(), *self.factor.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
