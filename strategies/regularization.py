"""Regularisation strategies: a quadratic penalty keeps important parameters near old values."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from cfbench.registry import register_strategy
from cfbench.scenario import Task, apply_mask
from cfbench.strategy import Strategy, TrainContext

Params = dict[str, torch.Tensor]


def _log_likelihood(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(apply_mask(logits, mask), y, reduction="sum")


def squared_grads_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                       ) -> Params:
    """Sum over the batch of each sample's squared gradient of log p(y|x), for any model."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: Params, xi: torch.Tensor, yi: torch.Tensor, mi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return _log_likelihood(logits, yi.unsqueeze(0), mi.unsqueeze(0))

    grads = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, x, y, mask)
    return {n: g.pow(2).sum(0) for n, g in grads.items()}


def squared_grads_linear(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                         ) -> Params | None:
    """The same sum without materialising per-sample gradients, when every trainable parameter
    belongs to an nn.Linear fed 2-d inputs: sample i's weight gradient is the outer product
    d_i a_i^T, so sum_i (d_i a_i^T)^2 = (d^2)^T (a^2). Returns None where that does not hold."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    owned = {f"{n}.{k}" for n, m in linears.items() for k, p in m.named_parameters()
             if p.requires_grad}
    if owned != {n for n, p in model.named_parameters() if p.requires_grad}:
        return None
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0], out
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    try:
        total = _log_likelihood(model(x), y, mask)
    finally:
        for h in handles:
            h.remove()
    if any(a.dim() != 2 for a in inputs.values()):
        return None
    names = list(outputs)
    deltas = torch.autograd.grad(total, [outputs[n] for n in names])
    result = {}
    for name, d in zip(names, deltas, strict=True):
        module, d2 = linears[name], d.pow(2)
        if module.weight.requires_grad:
            result[f"{name}.weight"] = d2.T @ inputs[name].detach().pow(2)
        if module.bias is not None and module.bias.requires_grad:
            result[f"{name}.bias"] = d2.sum(0)
    return result


def diagonal_fisher(ctx: TrainContext, task_index: int, samples: int | None,
                    labels: Literal["empirical", "sampled"], chunk: int = 256) -> Params:
    """Diagonal Fisher information of the model on a task's training data.

    The mean over samples of the squared per-sample gradient of log p(y|x) (a squared batch
    gradient is not the Fisher). `labels="empirical"` uses the true labels, `"sampled"` draws
    y from the model's own predictive distribution (the true Fisher). Computed in closed form
    for networks of Linear layers, with vmap for anything else.
    """
    model = ctx.model
    data = ctx.task_data(task_index)
    n = len(data)
    if samples is not None and samples < n:
        order = torch.randperm(n, generator=ctx.generator)[:samples].to(ctx.device)
    else:
        order = torch.arange(n, device=ctx.device)
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    model.eval()  # per-sample independence: no batch statistics
    for idx in order.split(chunk):
        batch = ctx.make_batch(data, idx)
        mask = ctx.setting.mask(batch.task, task_index)
        if mask is None:
            mask = torch.ones(len(idx), ctx.setting.n_outputs, dtype=torch.bool,
                              device=ctx.device)
        y = batch.y
        if labels == "sampled":
            with torch.no_grad():
                probs = torch.softmax(apply_mask(model(batch.x), mask), dim=1)
            y = torch.multinomial(probs.cpu(), 1, generator=ctx.generator).squeeze(1)
            y = y.to(ctx.device)
        squared = (squared_grads_linear(model, batch.x, y, mask)
                   or squared_grads_vmap(model, batch.x, y, mask))
        for name, g2 in squared.items():
            fisher[name] += g2
    model.train(was_training)
    return {name: f / len(order) for name, f in fisher.items()}


@register_strategy("ewc", family="regularization",
                   reference="Kirkpatrick et al. 2017 (online: Schwarz et al. 2018)")
class EWC(Strategy):
    """Elastic weight consolidation: a diagonal-Fisher-weighted pull toward old parameters.

    `mode="separate"` penalises lam/2 * sum_k F_k (theta - theta_k)^2 over every earlier task k.
    That sum equals lam/2 * F (theta - mu)^2 plus a constant, with F = sum_k F_k and mu the
    F_k-weighted mean of the theta_k, so it is stored and computed as one quadratic: the same
    gradients, and state and step cost that do not grow with the number of tasks.
    `mode="online"` keeps F <- gamma * F + F_new anchored at the latest parameters.
    """

    def __init__(self, *, lam: float = 1000.0, mode: Literal["separate", "online"] = "separate",
                 gamma: float = 1.0, fisher: Literal["empirical", "sampled"] = "sampled",
                 fisher_samples: int | None = 1024) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if fisher_samples is not None and fisher_samples <= 0:
            raise ValueError(f"fisher_samples must be positive or none, got {fisher_samples}")
        self.lam, self.mode, self.gamma = lam, mode, gamma
        self.fisher_labels, self.fisher_samples = fisher, fisher_samples
        self.fisher: Params = {}
        self.anchor: Params = {}

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        new = diagonal_fisher(ctx, ctx.task_index, self.fisher_samples, self.fisher_labels)
        theta = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if n in new}
        if not self.fisher:
            self.fisher, self.anchor = new, theta
            return
        for name, f_new in new.items():
            f_old = self.fisher[name]
            if self.mode == "online":
                self.fisher[name] = self.gamma * f_old + f_new
                self.anchor[name] = theta[name]
            else:
                total = f_old + f_new
                weighted = f_old * self.anchor[name] + f_new * theta[name]
                self.anchor[name] = torch.where(total > 0, weighted / total, theta[name])
                self.fisher[name] = total

    def after_backward(self, ctx: TrainContext) -> None:
        """Adds the penalty's gradient, lam * F * (theta - mu), straight to .grad: the same
        update as putting lam/2 * F (theta - mu)^2 in the loss, without an autograd graph."""
        if not self.fisher or self.lam == 0:
            return
        for name, p in ctx.model.named_parameters():
            if name in self.fisher and p.grad is not None:
                p.grad.addcmul_(self.fisher[name], p.detach() - self.anchor[name],
                                value=self.lam)

    def state_bytes(self) -> int:
        return sum(t.element_size() * t.numel()
                   for part in (self.fisher, self.anchor) for t in part.values())
