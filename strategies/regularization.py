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

    penalty = lam/2 * sum_k sum_j F_k,j (theta_j - theta*_k,j)^2. `mode="separate"` keeps one
    (Fisher, anchor) pair per task; `mode="online"` keeps one running Fisher
    F <- gamma*F + F_new anchored at the latest parameters, so its state does not grow.
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
        self.anchors: list[tuple[Params, Params]] = []  # (Fisher, parameters) per anchor

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        fisher = diagonal_fisher(ctx, ctx.task_index, self.fisher_samples, self.fisher_labels)
        theta = {n: p.detach().clone() for n, p in ctx.model.named_parameters()
                 if n in fisher}
        if self.mode == "online" and self.anchors:
            old, _ = self.anchors[0]
            fisher = {n: self.gamma * old[n] + f for n, f in fisher.items()}
            self.anchors = []
        self.anchors.append((fisher, theta))

    def penalty(self, ctx: TrainContext, batch, logits) -> torch.Tensor | None:
        if not self.anchors or self.lam == 0:
            return None
        params = dict(ctx.model.named_parameters())
        total = sum(
            (f * (params[n] - theta[n]).pow(2)).sum()
            for fisher, theta in self.anchors for n, f in fisher.items()
        )
        return 0.5 * self.lam * total

    def state_bytes(self) -> int:
        return sum(t.element_size() * t.numel()
                   for pair in self.anchors for part in pair for t in part.values())
