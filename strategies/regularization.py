"""Regularisation strategies: an importance-weighted quadratic keeps parameters near an anchor.

Every strategy here is one mechanism, ``Quadratic``, with its own importance estimate. It holds
an importance Omega and an anchor theta* per parameter and adds the penalty

    lam/2 * sum_i Omega_i (theta_i - theta*_i)^2

by adding its gradient, lam * Omega * (theta - theta*), straight to ``.grad`` in
``after_backward``: the same update as the loss term, without an autograd graph. Every strategy
uses this lam/2 convention. A paper that writes c * sum Omega (theta - theta*)^2 without the 1/2
(Zenke et al.'s SI, Aljundi et al.'s MAS, Hsu et al. 2018's ``reg_coef``) means lam = 2c.

After each task a strategy estimates new importances Omega_new at the parameters theta_t and
consolidates them in one of two ways:

- separate: one quadratic per task, sum_k Omega_k (theta - theta_k)^2. That sum equals
  Omega (theta - mu)^2 plus a constant, with Omega = sum_k Omega_k and mu the Omega_k-weighted
  mean of the theta_k. It is stored as that one quadratic: the same gradients, and a state and
  step cost that do not grow with the number of tasks.
- online: Omega <- gamma * Omega + Omega_new and theta* <- theta_t. gamma=1 accumulates and
  gamma=0 replaces.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from cfbench.models import split_head
from cfbench.registry import register_strategy
from cfbench.scenario import Classification, Scenario, Task, apply_mask, token_rows
from cfbench.strategy import Batch, Stacked, Strategy, TrainContext

Params = dict[str, torch.Tensor]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model: nn.Module, names: Iterable[str]) -> Params:
    """Real copies (never views) of the named parameters' current values."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def _decay(gamma: float) -> float:
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    return gamma


def _stack(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-member tensors (a parameter's shape, or 0-d constants) stacked to broadcast against
    the stacked parameter `like` (K, ...)."""
    stacked = torch.stack(values)
    return stacked.view(len(values), *[1] * (like.dim() - stacked.dim()), *values[0].shape)


class _StackedQuadratic(Stacked):
    """``Quadratic.after_backward`` for K stacked members: grad += lam * Omega * (p - anchor),
    each member's lam, importance and anchor stacked once per task. lam is folded into Omega,
    which rounds as ``addcmul``'s `value` does (a member with lam = 0 adds zeros). gamma only
    decays each member's own importance, after its task."""

    members: list[Quadratic]
    per_member = ("lam", "gamma")

    def start_task(self) -> None:
        params, members = self.job.params, self.members
        self.terms = [] if all(m.lam == 0 for m in members) else [
            (params[n], _stack([m.lam * m.importance[n] for m in members], params[n]),
             _stack([m.anchor[n] for m in members], params[n])) for n in members[0].importance]

    def after_backward(self) -> None:
        for p, scaled, anchor in self.terms:
            if p.grad is not None:
                p.grad.addcmul_(scaled, p.detach() - anchor)


class Quadratic(Strategy):
    """The shared mechanism: lam/2 * sum Omega (theta - theta*)^2, consolidated after each task
    by the separate merge (`gamma=None`) or the online rule with decay `gamma`."""

    stacked = _StackedQuadratic

    def __init__(self, lam: float, gamma: float | None) -> None:
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam
        self.gamma = gamma if gamma is None else _decay(gamma)
        self.importance: Params = {}
        self.anchor: Params = {}

    def consolidate(self, new: Params, theta: Params) -> None:
        """Fold one task's importances `new`, estimated at parameters `theta`, into the state."""
        if not self.importance:
            self.importance, self.anchor = dict(new), dict(theta)
            return
        for name, omega_new in new.items():
            omega = self.importance.get(name)
            if omega is None:  # a parameter added since (an adapter, a new column)
                self.importance[name], self.anchor[name] = omega_new, theta[name]
            elif self.gamma is not None:
                self.importance[name] = self.gamma * omega + omega_new
                self.anchor[name] = theta[name]
            else:
                total = omega + omega_new
                weighted = omega * self.anchor[name] + omega_new * theta[name]
                self.anchor[name] = torch.where(total > 0, weighted / total, theta[name])
                self.importance[name] = total

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        if not self.importance or self.lam == 0:
            return
        for name, p in ctx.model.named_parameters():
            omega = self.importance.get(name)
            if omega is not None and p.grad is not None:
                p.grad.addcmul_(omega, p.detach() - self.anchor[name], value=self.lam)

    def state_bytes(self) -> int:
        return sum(t.element_size() * t.numel() for part in self._state() for t in part.values())

    def _state(self) -> tuple[Params, ...]:
        return self.importance, self.anchor


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Importances describe the model as it predicts: no dropout, no batch statistics."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def task_batches(ctx: TrainContext, task_index: int, size: int, samples: int | None = None,
                 shuffle: bool = True) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Batches of `size` over (a random subset of `samples` of) a task's training data, each
    with the boolean mask of the output units its samples may use."""
    data = ctx.task_data(task_index)
    n = len(data)
    if shuffle or (samples is not None and samples < n):
        order = torch.randperm(n, generator=ctx.generator)[:samples].to(ctx.device)
    else:
        order = torch.arange(n, device=ctx.device)
    for idx in order.split(size):
        batch = ctx.make_batch(data, idx)
        mask = ctx.setting.mask(batch.task, task_index)
        if mask is None:
            mask = torch.ones(len(idx), ctx.setting.n_outputs, dtype=torch.bool,
                              device=ctx.device)
        yield batch, mask


def param_grads(model: nn.Module, scalar: torch.Tensor) -> Params:
    """Gradient of `scalar` for each trainable parameter it depends on."""
    params = trainable(model)
    grads = torch.autograd.grad(scalar, list(params.values()), allow_unused=True)
    return {n: g for n, g in zip(params, grads, strict=True) if g is not None}


def _log_likelihood(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """log p(y|x) summed over the batch's predictions (a sequence's: over its tokens), each
    sample's multiplied by its `scale` where given (one prediction per sample)."""
    rows, mask = token_rows(logits, mask)
    if scale is None:
        return -F.cross_entropy(apply_mask(rows, mask), y.reshape(-1), reduction="sum")
    losses = F.cross_entropy(apply_mask(rows, mask), y.reshape(-1), reduction="none")
    return -(losses * scale).sum()


def squared_grads_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                       scale: torch.Tensor | None = None) -> Params:
    """Sum over the batch of each sample's squared gradient of log p(y|x), for any model
    (times the square of the sample's `scale`, where given)."""
    params = {n: p.detach() for n, p in trainable(model).items()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: Params, xi: torch.Tensor, yi: torch.Tensor, mi: torch.Tensor,
            *si: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return _log_likelihood(logits, yi.unsqueeze(0), mi.unsqueeze(0),
                               *(s.unsqueeze(0) for s in si))

    extra = () if scale is None else (scale,)
    grads = vmap(grad(one), in_dims=(None, 0, 0, 0, *(0,) * len(extra)))(params, x, y, mask,
                                                                         *extra)
    return {n: g.pow(2).sum(0) for n, g in grads.items()}


def squared_grads_looped(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                         scale: torch.Tensor | None = None) -> Params:
    """The same sum, one backward pass per sample: for models with recurrent layers, whose fused
    kernels vmap cannot batch (its fallback loops far slower than this)."""
    params = trainable(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        logits = model(x[i:i + 1])
        part = None if scale is None else scale[i:i + 1]
        grads = torch.autograd.grad(_log_likelihood(logits, y[i:i + 1], mask[i:i + 1], part),
                                    list(params.values()), allow_unused=True)
        for name, g in zip(params, grads, strict=True):
            if g is not None:
                total[name] += g.pow(2)
    return total


def squared_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                  scale: torch.Tensor | None = None) -> Params:
    """Sum over the batch of each sample's squared gradient of log p(y|x) (times its `scale`
    squared, where given), by the fastest exact route for this model. A sequence (a target per
    position) is one sample whose backward pass already batches its tokens: looping is as fast
    as vmap there, without vmap's memory."""
    if y.dim() > 1 or any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return squared_grads_looped(model, x, y, mask, scale)
    return (squared_grads_linear(model, x, y, mask, scale)
            or squared_grads_vmap(model, x, y, mask, scale))


def expected_squared_grads(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> Params:
    """Sum over the batch of sum_y p(y|x) (d log p(y|x))^2: every label a sample may predict,
    weighted by its predicted probability (van de Ven et al.'s ``fisher_labels='all'``), one
    exact pass per output unit (p times a label's squared gradient is the squared gradient of
    sqrt(p) log p(y|x)). One prediction per sample."""
    with torch.no_grad():
        probs = torch.softmax(apply_mask(model(x), mask), dim=1)
        fallback = probs.argmax(1)  # the label of a sample that may not predict the unit
    total: Params = {}
    for unit in mask.any(0).nonzero().flatten().tolist():
        allowed = mask[:, unit]
        y = torch.where(allowed, unit, fallback)
        weight = torch.where(allowed, probs[:, unit], 0.0)
        for name, g2 in squared_grads(model, x, y, mask, weight.sqrt()).items():
            total[name] = total[name] + g2 if name in total else g2
    return total


def squared_grads_linear(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                         scale: torch.Tensor | None = None) -> Params | None:
    """The same sum without materialising per-sample gradients, when every trainable parameter
    belongs to an nn.Linear fed 2-d inputs: sample i's weight gradient is the outer product
    d_i a_i^T, so sum_i (d_i a_i^T)^2 = (d^2)^T (a^2). Returns None where that does not hold."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and any(p.requires_grad for p in m.parameters())}  # frozen ones have no grad
    owned = {f"{n}.{k}" for n, m in linears.items() for k, p in m.named_parameters()
             if p.requires_grad}
    if owned != set(trainable(model)):
        return None
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0], out
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    try:
        total = _log_likelihood(model(x), y, mask, scale)
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


FisherLabels = Literal["sampled", "empirical", "predicted", "all"]


def _fisher_targets(model: nn.Module, batch: Batch, mask: torch.Tensor, labels: FisherLabels,
                    generator: torch.Generator) -> torch.Tensor:
    if labels == "empirical":
        return batch.y
    with torch.no_grad():
        rows, mask = token_rows(model(batch.x), mask)
        logits = apply_mask(rows, mask)
    if labels == "predicted":
        return logits.argmax(1).view(batch.y.shape)
    probs = torch.softmax(logits, dim=1).cpu()
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
    return drawn.view(batch.y.shape)


def diagonal_fisher(ctx: TrainContext, task_index: int, samples: int | None,
                    labels: FisherLabels, batch: int = 1, chunk: int = 256) -> Params:
    """Diagonal Fisher information of the model on (`samples` of) a task's training data, per
    prediction: a sequence is one sample whose log-likelihood sums its tokens (their sampled
    labels are independent given the text, so the cross terms vanish in expectation), and the
    sum is divided by the tokens counted, so `lam` weighs one prediction as in classification.

    With `batch=1`, the mean over samples of the squared per-sample gradient of log p(y|x)
    (a squared batch gradient is not the Fisher), computed in closed form for networks of
    Linear layers, per sample for recurrent models and sequences and with vmap for anything
    else, `chunk` samples at a time. With `batch=B>1`,
    Hsu et al. 2018's cheaper minibatch estimate: the mean over shuffled minibatches b of
    |b| * (mean gradient over b)^2, which equals the per-sample Fisher for B=1 and is close to
    it near a minimum. Labels: `"empirical"` the true ones, `"sampled"` drawn from the model's
    predictive distribution (the true Fisher, estimated), `"predicted"` its argmax (Hsu et
    al.), `"all"` every label weighted by its predicted probability (the true Fisher's
    expectation taken exactly, van de Ven et al.'s default; per-sample gradients only).
    """
    model = ctx.model
    fisher = {n: torch.zeros_like(p) for n, p in trainable(model).items()}
    groups = 0
    with eval_mode(model):
        for b, mask in task_batches(ctx, task_index, chunk if batch == 1 else batch, samples,
                                    shuffle=batch > 1):
            if labels == "all":
                squared = expected_squared_grads(model, b.x, mask)
                groups += len(b.x)
            elif batch == 1:
                y = _fisher_targets(model, b, mask, labels, ctx.generator)
                squared = squared_grads(model, b.x, y, mask)
                groups += y.numel()
            else:
                y = _fisher_targets(model, b, mask, labels, ctx.generator)
                mean_grad = param_grads(model, _log_likelihood(model(b.x), y, mask) / y.numel())
                squared = {n: g.pow(2) * y.numel() for n, g in mean_grad.items()}
                groups += 1
            for name, g2 in squared.items():
                fisher[name] += g2
    return {name: f / groups for name, f in fisher.items()}


def _check_fisher(samples: int | None, batch: int, labels: FisherLabels) -> None:
    if samples is not None and samples <= 0:
        raise ValueError(f"fisher_samples must be positive or none, got {samples}")
    if batch < 1:
        raise ValueError(f"fisher_batch must be >= 1, got {batch}")
    if labels == "all" and batch != 1:
        raise ValueError("fisher=all weighs each sample's own gradients: use fisher_batch=1")


@register_strategy("ewc", family="regularization", reference="Kirkpatrick et al. 2017")
class EWC(Quadratic):
    """Elastic weight consolidation: a diagonal-Fisher-weighted pull toward old tasks' weights.

    The penalty is lam/2 * sum_k F_k (theta - theta_k)^2 over earlier tasks k (separate
    consolidation, stored as one quadratic).

    `lam` trades plasticity for stability. The Fisher is estimated after each task from
    `fisher_samples` training samples (none: all; more is more accurate and slower) with
    `fisher` labels ("sampled" is the true Fisher, one label drawn per sample; "all" its exact
    expectation over every label weighted by the predicted probability, as van de Ven et al.'s
    code computes it, one backward pass per label; "empirical" uses the true labels;
    "predicted" the argmax as Hsu et al. 2018) and `fisher_batch` samples per gradient (1: the
    exact per-sample Fisher; >1: Hsu et al.'s faster minibatch estimate).
    """

    def __init__(self, *, lam: float = 1000.0, fisher: FisherLabels = "sampled",
                 fisher_samples: int | None = 1024, fisher_batch: int = 1) -> None:
        super().__init__(lam, gamma=None)
        _check_fisher(fisher_samples, fisher_batch, fisher)
        self.fisher_labels, self.fisher_samples, self.fisher_batch = (
            fisher, fisher_samples, fisher_batch)

    def refuses(self, scenario: Scenario) -> str | None:
        if self.fisher_labels == "all" and not isinstance(scenario.objective, Classification):
            return ("fisher=all takes a backward pass per label, and here a label is a token of "
                    "a whole vocabulary; use fisher=sampled")
        return None

    @property
    def fisher(self) -> Params:
        """The consolidated diagonal Fisher: EWC's importance."""
        return self.importance

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        new = diagonal_fisher(ctx, ctx.task_index, self.fisher_samples, self.fisher_labels,
                              self.fisher_batch)
        self.consolidate(new, snapshot(ctx.model, new))


@register_strategy("online-ewc", family="regularization", reference="Schwarz et al. 2018")
class OnlineEWC(EWC):
    """Online EWC: one running Fisher, decayed by gamma, anchored at the latest parameters.

    F <- gamma * F + F_new after each task, so old tasks' pull fades by `gamma` per task
    (1: never; 0: only the last task counts). Fisher options as for `ewc`."""

    def __init__(self, *, lam: float = 1000.0, gamma: float = 1.0,
                 fisher: FisherLabels = "sampled", fisher_samples: int | None = 1024,
                 fisher_batch: int = 1) -> None:
        super().__init__(lam=lam, fisher=fisher, fisher_samples=fisher_samples,
                         fisher_batch=fisher_batch)
        self.gamma = _decay(gamma)


@register_strategy("si", family="regularization", reference="Zenke, Poole & Ganguli 2017")
class SI(Quadratic):
    """Synaptic Intelligence: importance is each parameter's share of the path's loss decrease.

    Per step, w += -g * delta_theta, where g is the gradient of the loss without SI's own
    penalty (read in ``after_backward`` before the penalty's gradient is added) and delta_theta
    the step's actual change. After a task, Omega += w / (Delta^2 + xi), Delta being the task's
    total change, and the anchor moves to the current parameters (online, gamma=1).

    `lam` trades plasticity for stability (Zenke's c is lam/2; the default is Hsu et al.
    2018's Split MNIST task-setting coefficient, reg_coef 300, found with xi=0.1). `xi` damps
    the importance of parameters that barely moved (larger: smaller, steadier importances).
    Besides Omega and the anchor it keeps w, the task's starting parameters and two per-step
    buffers (the gradient and the pre-step parameters), all counted in ``state_bytes``.

    `clip` clips every element of the gradient (the penalty's included) to [-clip, clip] before
    the step, as Mammoth's SI does (``clip_grad_value_``, 1.0); the path integral still reads
    the unclipped task gradient and the step actually taken. Neither Zenke et al.'s nor van de
    Ven et al.'s code clips (none, the default).
    """

    LATER_HPARAMS = ("clip",)

    def __init__(self, *, lam: float = 600.0, xi: float = 0.1, clip: float | None = None
                 ) -> None:
        super().__init__(lam, gamma=1.0)
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or none, got {clip}")
        self.clip = clip
        if not xi > 0:
            raise ValueError(f"xi must be > 0, got {xi}")
        self.xi = xi
        self.path: Params = {}
        self.start: Params = {}
        self.grad: Params = {}
        self.before: Params = {}

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        params = trainable(ctx.model)
        self.start = snapshot(ctx.model, params)
        self.path = {n: torch.zeros_like(p) for n, p in params.items()}
        self.grad = {n: torch.zeros_like(p) for n, p in params.items()}
        self.before = {n: torch.zeros_like(p) for n, p in params.items()}

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        for name, p in ctx.model.named_parameters():
            if name in self.path and p.grad is not None:
                self.grad[name].copy_(p.grad)
                self.before[name].copy_(p.detach())
        super().after_backward(ctx, batch)
        if self.clip is not None:
            nn.utils.clip_grad_value_(trainable(ctx.model).values(), self.clip)

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        for name, p in ctx.model.named_parameters():
            if name in self.path and p.grad is not None:
                minus_delta = self.before[name].sub_(p.detach())
                self.path[name].addcmul_(self.grad[name], minus_delta)

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        theta = snapshot(ctx.model, self.path)
        new = {n: w / ((theta[n] - self.start[n]).pow(2) + self.xi)
               for n, w in self.path.items()}
        self.consolidate(new, theta)

    def _state(self) -> tuple[Params, ...]:
        return self.importance, self.anchor, self.path, self.start, self.grad, self.before


def output_sensitivity(ctx: TrainContext, task_index: int, batch: int,
                       units: Literal["sum", "mean"] = "sum") -> Params:
    """MAS importances: the mean over shuffled minibatches of the absolute gradient of the
    minibatch mean of ||F(x)||^2, F(x) being the outputs masked to the units the setting lets
    the task use (`units="mean"`: the mean square over those units instead, as Hsu et al.); a
    sequence's positions count as samples."""
    model = ctx.model
    total = {n: torch.zeros_like(p) for n, p in trainable(model).items()}
    count = 0
    with eval_mode(model):
        for b, mask in task_batches(ctx, task_index, batch):
            outputs, mask = token_rows(model(b.x), mask)
            squares = torch.where(mask, outputs, 0.0).pow(2).sum(1)
            if units == "mean":
                squares = squares / mask.sum(1)
            for name, g in param_grads(model, squares.mean()).items():
                total[name] += g.abs()
            count += 1
    return {n: t / count for n, t in total.items()}


@register_strategy("mas", family="regularization", reference="Aljundi et al. 2018")
class MAS(Quadratic):
    """Memory Aware Synapses: importance is the output norm's sensitivity to each parameter.

    The sensitivity of the squared L2 norm of the outputs is measured on the task's training
    data, without labels; online consolidation, accumulating (Omega += Omega_new), anchored at
    the latest parameters.

    Gradients are per minibatch of `importance_batch` samples (none: the protocol's batch size),
    as GT-RIPL's and Avalanche's implementations do; 1 gives the paper's per-sample gradients
    (slower). `reduce_units="mean"` averages the squares over the output units instead of summing
    them (Hsu et al. 2018's code). `lam` trades plasticity for stability (the paper's lambda is
    lam/2).
    """

    def __init__(self, *, lam: float = 2.0, reduce_units: Literal["sum", "mean"] = "sum",
                 importance_batch: int | None = None) -> None:
        super().__init__(lam, gamma=1.0)
        if importance_batch is not None and importance_batch < 1:
            raise ValueError(f"importance_batch must be >= 1 or none, got {importance_batch}")
        self.reduce_units, self.importance_batch = reduce_units, importance_batch

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        batch = self.importance_batch or ctx.scenario.protocol.batch_size
        new = output_sensitivity(ctx, ctx.task_index, batch, self.reduce_units)
        self.consolidate(new, snapshot(ctx.model, new))


def _constants(model: nn.Module, value: float) -> Params:
    """One 0-d tensor per trainable parameter: a unit importance or a zero anchor that
    broadcasts, without a parameter-sized copy."""
    return {n: torch.tensor(value, device=p.device) for n, p in trainable(model).items()}


@register_strategy("l2", family="regularization",
                   reference="weight decay; previous-task anchor: Hsu et al. 2018")
class L2(Quadratic):
    """Unit-importance pull toward zero (weight decay) or toward the previous task's weights.

    The penalty is lam/2 * ||theta - theta*||^2 on every parameter.

    `anchor="zero"` is plain L2 toward zero (weight decay: the gradient gains lam * theta; the
    control of the L2-SP paper). `anchor="previous-task"` pulls toward the parameters after the
    previous task, replaced after each task (online, gamma=0: Hsu et al. 2018's "L2"). `lam`
    trades plasticity for stability; the default is a common weight decay (1e-4), far too weak
    for "previous-task", whose useful strength depends on the scenario and setting.

    Under Adam, a parameter that gets no loss gradient (the head rows of output units the
    setting masks out) moves toward its anchor at about the learning rate per step, whatever
    `lam`: with a zero anchor, idle heads are erased (as with torch's own Adam weight_decay).
    """

    def __init__(self, *, lam: float = 1e-4,
                 anchor: Literal["zero", "previous-task"] = "zero") -> None:
        super().__init__(lam, gamma=0.0)
        self.toward = anchor

    def setup(self, ctx: TrainContext) -> None:
        if self.toward == "zero":
            self.importance, self.anchor = _constants(ctx.model, 1.0), _constants(ctx.model, 0.0)

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        if self.toward == "previous-task":
            ones = _constants(ctx.model, 1.0)
            self.consolidate(ones, snapshot(ctx.model, ones))


def _parse_groups(groups: tuple[str, ...]) -> list[tuple[str, float]]:
    parsed = []
    for item in groups:
        pattern, sep, value = item.rpartition("=")
        try:
            strength = float(value)
        except ValueError:
            strength = float("nan")
        if not sep or not pattern or not strength >= 0:
            raise ValueError(f"groups entries must look like 'glob=alpha' with alpha >= 0, "
                             f"e.g. '1.*=0.5'; got {item!r}")
        parsed.append((pattern, strength))
    return parsed


@register_strategy("l2-sp", family="regularization", reference="Li, Grandvalet & Davoine 2018")
class L2SP(Quadratic):
    """L2-SP: the body is pulled toward its starting weights, the head decays toward zero.

    The penalty is alpha/2 * ||w_S - w0_S||^2 toward the starting point w0 (the initial or
    pretrained weights, taken in ``setup``) for the shared body, plus beta/2 * ||w_head||^2 for
    the head (``cfbench.models.split_head``): the same importance-weighted quadratic, lam=1.

    `alpha` trades staying near the start against fitting new tasks; `groups` sets it per
    body parameter with "glob=alpha" entries matched against parameter names (fnmatch; the first
    match wins; unmatched parameters use `alpha`; a pattern matching no body parameter is an
    error). `beta` is the head's weight decay; `exclude_head` (the default) leaves the head
    unpenalised: here one output layer holds every task's units, and under Adam the decay
    erases the rows of units the setting masks out (see `l2`), which would undo old tasks' heads
    rather than regularise a new one. Set it False for a single-task fine-tune, as in the paper.
    """

    def __init__(self, *, alpha: float = 0.1, beta: float = 0.01, exclude_head: bool = True,
                 groups: tuple[str, ...] = ()) -> None:
        super().__init__(1.0, gamma=None)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.alpha, self.beta, self.exclude_head = alpha, beta, exclude_head
        self.groups = _parse_groups(groups)

    def setup(self, ctx: TrainContext) -> None:
        head = {id(p) for p in split_head(ctx.model)[1].parameters()}
        body = [n for n, p in trainable(ctx.model).items() if id(p) not in head]
        unused = [g for g, _ in self.groups if not any(fnmatch.fnmatchcase(n, g) for n in body)]
        if unused:
            raise ValueError(f"groups patterns {unused} match no parameter of the shared body "
                             f"({', '.join(body)})")
        for name, p in trainable(ctx.model).items():
            if id(p) in head:
                if self.exclude_head:
                    continue
                target, strength = torch.zeros((), device=p.device), self.beta
            else:
                target = p.detach()
                strength = next((a for g, a in self.groups if fnmatch.fnmatchcase(name, g)),
                                self.alpha)
            if strength > 0:
                self.importance[name] = torch.tensor(strength, device=p.device)
                self.anchor[name] = target.clone()  # a copy: the start must not move
