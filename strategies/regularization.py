"""Regularisation strategies: a quadratic penalty keeps important parameters near old values."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from cfbench.registry import register_strategy
from cfbench.scenario import Task, apply_mask
from cfbench.strategy import Strategy, TrainContext

Params = dict[str, torch.Tensor]


def diagonal_fisher(ctx: TrainContext, task_index: int, samples: int | None,
                    labels: Literal["empirical", "sampled"], chunk: int = 128) -> Params:
    """Diagonal Fisher information of the model on a task's training data.

    The mean over samples of the squared per-sample gradient of log p(y|x), computed exactly
    with vmap (a batch gradient squared is not the Fisher). `labels="empirical"` uses the true
    labels, `"sampled"` draws y from the model's own predictive distribution (the true Fisher).
    """
    model = ctx.model
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    data = ctx.task_data(task_index)
    n = len(data)
    if samples is not None and samples < n:
        order = torch.randperm(n, generator=ctx.generator)[:samples].to(ctx.device)
    else:
        order = torch.arange(n, device=ctx.device)

    def log_likelihood(p: Params, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                       ) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return -F.cross_entropy(apply_mask(logits, mask.unsqueeze(0)), y.unsqueeze(0))

    per_sample_grad = vmap(grad(log_likelihood), in_dims=(None, 0, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
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
        for name, g in per_sample_grad(params, batch.x, y, mask).items():
            fisher[name] += g.pow(2).sum(0)
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
