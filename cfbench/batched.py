"""Stacked runs: K runs of one architecture, scenario, setting, protocol and strategy (seeds,
and grid points of a sweep or of ``cfbench tune``) trained as one stacked job, by a backend of
the one loop (``cfbench.train``).

Each member's model is built exactly as its own run builds it, and the K models are stacked into
one set of parameters of shape (K, ...) (``torch.func.stack_module_state``). `StackedBackend`
supplies only what differs from one model: the K networks' forward pass as batched matrix
products (one ``baddbmm`` per layer, `_StackedLinear`), the backward pass of the sum over
members of each member's loss and penalty (so member k's parameters get exactly member k's
gradient), the protocol's optimizer over the stacked parameters with each member's own
learning rate (`_MemberOptimizer`) and every member's outputs on a test batch at once. The loop
(each member's own minibatch order, the budget, FLOPs, the non-finite check), the evaluator and
the records are the single run's (``experiment.fill``).

Hooks outside the step run per member, on an ordinary model holding that member's parameters,
with its own strategy object and context. In-step hooks run in the stacked form that lives
beside each strategy (``Strategy.stacked``, see ``cfbench.strategy.Stacked``), which stacks
per-member state and the hyperparameters it names (``Stacked.per_member``). `stack_key` says
which runs may share a job; a strategy without a stacked form, or a backbone other than
``mlp:``, runs one run at a time (`can_batch` says why).

On the CPU with one thread each member's record is bitwise its own run's (`_StackedLinear`
differentiates as ``nn.Linear`` does); kernels that split work differently agree to float
rounding. Costs are the job's divided by K, and ``cost["stacked_runs"] = K`` says so. A
member whose loss stops being finite reruns alone (to its own failed record) and the others
stack again without it; a job that fails in any other way is abandoned with a warning and its
members rerun one at a time, so every record, a failed one included, is its own run's.

Where it pays: a GPU runs one small MLP far below its capacity, so K runs cost little more
than one; a CPU saves the per-step overhead, most of a small-batch step's time.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import stack_module_state
from torch.nn import functional as F

from cfbench.errors import CfbenchError
from cfbench.experiment import execute, fill, new_record, utc_now
from cfbench.records import RunConfig, RunRecord
from cfbench.scenario import Task, apply_mask
from cfbench.strategy import (
    Batch,
    Compose,
    Stacked,
    Strategy,
    TrainContext,
    TrainData,
    build_strategy,
    stacked_form,
    strategy_names,
)
from cfbench.train import ModelBackend, NonFiniteLoss


def _parts(strategy: Strategy) -> list[Strategy]:
    return strategy.parts if isinstance(strategy, Compose) else [strategy]


def can_batch(config: RunConfig) -> str | None:
    """None if runs like `config` can be trained as one stacked job, else why not."""
    protocol = config.protocol
    if protocol.model.partition(":")[0] != "mlp":
        return (f"model '{protocol.model}' is not batched (only mlp: backbones, which have no "
                "buffers)")
    if protocol.precision != "fp32" or protocol.compile or protocol.fused_optimizer:
        # A fused optimizer rounds a stacked tensor's elements differently from a seed's own
        # (measured: 0.3% of a layer's weights off by up to 1e-3 after 25 Adam steps).
        return ("bf16, compiled and fused-optimizer runs are not batched (each seed would not "
                "get its own run's numbers)")
    strategy = build_strategy(config.strategy, config.hparams, config.setting)
    for name, part in zip(strategy_names(config.strategy), _parts(strategy), strict=True):
        if stacked_form(part) is None:
            return f"strategy '{name}' has no batched form"
    return None


def stack_key(config: RunConfig) -> str:
    """What the runs of one stacked job share: the configuration less its seed, its learning
    rate (each member steps at its own, `_MemberOptimizer`) and the hyperparameters each part's
    stacked form reads per member (``Stacked.per_member``: EWC's lam, LwF's alpha). Every other
    field must be equal: the model, batch size and budget fix the stacked shapes and steps, and
    a strategy's other hyperparameters may change a member's batch shape or its data (replay's
    memory and replay batch size) or state its form takes to be alike (L2-SP's groups). A
    strategy without a stacked form varies in nothing but the seed and the learning rate."""
    d = config.to_dict()
    del d["seed"], d["protocol"]["lr"]
    strategy = build_strategy(config.strategy, config.hparams, config.setting)
    for name, part in zip(strategy_names(config.strategy), _parts(strategy), strict=True):
        form = stacked_form(part)
        for hparam in () if form is None else form.per_member:
            d["hparams"].get(name, {}).pop(hparam, None)
    return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class StackGroup:
    """Runs that may share a stacked job (one `stack_key`), and why they do not (None: they
    do)."""

    configs: tuple[RunConfig, ...]
    reason: str | None


def stack_groups(configs: Iterable[RunConfig]) -> list[StackGroup]:
    """`configs` grouped by `stack_key` (in order of first appearance), each group with the
    reason it cannot be stacked, if any."""
    groups: dict[str, list[RunConfig]] = {}
    for config in configs:
        groups.setdefault(stack_key(config), []).append(config)
    return [StackGroup(tuple(g), "a single run" if len(g) == 1 else can_batch(g[0]))
            for g in groups.values()]


def execute_batched(configs: Sequence[RunConfig], data_root: Path,
                    on_task: Callable[[int, int], None] | None = None) -> list[RunRecord]:
    """Run configurations of one `stack_key` as one stacked job: one record each, as
    ``execute`` would give it, up to float rounding (see the module doc). A job that fails is
    rerun run by run, with a warning."""
    configs = list(configs)
    if len({stack_key(c) for c in configs}) != 1:
        raise ValueError("execute_batched takes runs that differ only in their seeds, learning "
                         "rates and the hyperparameters their stacked form takes per member")
    reason = can_batch(configs[0])
    if reason is not None:
        raise CfbenchError(f"cannot stack runs: {reason}")
    records = [new_record(c) for c in configs]
    try:
        fill(records, configs, data_root, on_task, backend=StackedBackend)
    except (CfbenchError, TimeoutError):  # a timeout: the job's time (K x the limit) is up
        raise
    except NonFiniteLoss as exc:
        # A grid point diverging (too large a rate or lam) is common: it runs alone, to its own
        # failed record, and the others stack again without it.
        k = exc.member
        warnings.warn(f"run {k + 1} of a stacked job of {len(configs)} runs of "
                      f"{configs[k].strategy} diverged ({exc}); it runs alone and the others "
                      "stack again", RuntimeWarning, stacklevel=2)
        rest = [*configs[:k], *configs[k + 1:]]
        records = (execute_batched(rest, data_root, on_task) if len(rest) > 1
                   else [execute(c, data_root, on_task) for c in rest])
        return [*records[:k], execute(configs[k], data_root, on_task), *records[k:]]
    except Exception as exc:
        warnings.warn(f"stacked job of {len(configs)} runs of {configs[0].strategy} (seeds "
                      f"{sorted({c.seed for c in configs})}) abandoned ({type(exc).__name__}: "
                      f"{exc}); running them one at a time", RuntimeWarning, stacklevel=2)
        return [execute(c, data_root, on_task) for c in configs]
    for record in records:
        record.finished_at = utc_now()
    return records


class StackedBackend(ModelBackend):
    """K members' ``mlp:`` networks as one stacked job; each member's ``ctx.model`` holds its
    parameters whenever a hook outside the step runs."""

    batched = True

    def __init__(self, ctxs: list[TrainContext], strategies: list[Strategy]) -> None:
        super().__init__(ctxs, strategies)
        self.layers = _layers(ctxs[0].model)
        self.params: dict[str, torch.Tensor] = stack_module_state([c.model for c in ctxs])[0]
        forms = [stacked_form(part) for part in _parts(strategies[0])]
        if None in forms:
            raise RuntimeError("a part of the strategy has no stacked form (see can_batch)")
        self.forms = [form(self, [_parts(s)[i] for s in strategies])
                      for i, form in enumerate(forms) if form not in (None, Stacked)]

    @torch.no_grad()
    def sync(self) -> None:
        for k, ctx in enumerate(self.ctxs):
            for name, p in ctx.model.named_parameters():
                p.copy_(self.params[name][k])

    def load(self, states: list[dict[str, torch.Tensor]]) -> None:
        super().load(states)
        self.params = stack_module_state([c.model for c in self.ctxs])[0]

    def ready(self) -> None:
        protocol = self.scenario.protocol
        if protocol.reset_optimizer or self.optimizer is None:
            self.optimizer = _MemberOptimizer(list(self.params.values()), protocol.optimizer,
                                              [c.scenario.protocol.lr for c in self.ctxs])
        for form in self.forms:
            form.start_task()

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs (K, B, U) of every member's network on its own inputs x (K, B, ...)."""
        for name, module in self.layers:
            if isinstance(module, nn.Flatten):
                x = x.flatten(2)
            elif isinstance(module, nn.Linear):
                x = _StackedLinear.apply(x, params[f"{name}.weight"], params[f"{name}.bias"])
            else:
                x = x.relu()
        return x

    def begin_task(self, task: Task) -> list[TrainData]:
        data = super().begin_task(task)
        first = data[0]
        self.one_source = (all(c.augment_generator is None for c in self.ctxs)
                           and all(d.x is first.x and d.y is first.y
                                   and torch.equal(d.task, first.task) for d in data))
        return data

    def stream_batches(self, data: list[TrainData], idx: tuple[torch.Tensor, ...]
                       ) -> list[Batch]:
        """Each member's minibatch as drawn from the task. Members that draw from one dataset
        without augmentation are prepared in one call: preparation is per element, so each
        member gets the batch its own run prepares, for one call's overhead instead of K."""
        if not self.one_source:
            return [c.make_batch(d, i, augment=True)
                    for c, d, i in zip(self.ctxs, data, idx, strict=True)]
        joined = self.ctxs[0].make_batch(data[0], torch.cat(idx))
        sizes = [len(i) for i in idx]
        return [Batch(x, y, t) for x, y, t in zip(joined.x.split(sizes), joined.y.split(sizes),
                                                 joined.task.split(sizes), strict=True)]

    def forward_backward(self, data: list[TrainData], idx: tuple[torch.Tensor, ...]
                         ) -> torch.Tensor:
        streams = self.stream_batches(data, idx)
        batches = ([s.batch(c, b) for s, c, b in zip(self.strategies, self.ctxs, streams,
                                                      strict=True)]
                   if self.has["batch"] else streams)
        x, y = torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches])
        outputs = self.forward(self.params, x)
        mask = self.ctxs[0].setting.mask(torch.cat([b.task for b in batches]),
                                         self.ctxs[0].task_index)
        logits = apply_mask(outputs.flatten(0, 1), mask).view(outputs.shape)
        losses = self.scenario.objective.loss(logits, y)
        for form in self.forms:
            extra = form.penalty(x, outputs)
            if extra is not None:
                losses = losses + extra
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.batches = streams
        return losses.detach()

    def after_backward(self) -> None:
        for form in self.forms:
            form.after_backward()

    def member_forward(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Member k's network on inputs x (B, ...) shared by all members: ``nn.Linear``'s own
        call per layer, so no stacked copy of x is made and each output is its own run's."""
        for name, module in self.layers:
            if isinstance(module, nn.Flatten):
                x = x.flatten(1)
            elif isinstance(module, nn.Linear):
                x = F.linear(x, self.params[f"{name}.weight"][k], self.params[f"{name}.bias"][k])
            else:
                x = x.relu()
        return x

    def scores(self, batch: Batch, predict: bool) -> torch.Tensor:
        outputs = torch.stack([self.member_forward(k, batch.x) for k in range(self.k)])
        ctx = self.ctxs[0]  # its setting: the run's, or one it is also scored in
        return apply_mask(outputs, ctx.setting.mask(batch.task, ctx.task_index))


class _MemberOptimizer(torch.optim.Optimizer):
    """``train.make_optimizer``'s SGD or Adam (torch's defaults) over stacked parameters, each
    member at its own learning rate `lrs`: torch's single-tensor update with the rate a (K, 1,
    ...) tensor, in torch's operations and order, so on the CPU each member steps bitwise as its
    own run's optimizer. SGD's ``p.add_(g, alpha=-lr)`` is one fused multiply-add, as
    ``addcmul`` with a tensor factor computes it; Adam's ``addcdiv`` rounds -step_size * m, then
    the quotient, then the sum. Rates are formed in double and rounded once, as torch rounds
    its Python scalars."""

    def __init__(self, params: list[torch.Tensor], kind: str, lrs: Sequence[float]) -> None:
        super().__init__(params, {})
        self.adam = kind == "adam"
        self.lrs = torch.tensor(lrs, dtype=torch.float64, device=params[0].device)
        self.betas, self.eps = (0.9, 0.999), 1e-8
        self.rates: dict[tuple[torch.dtype, int], tuple[float, torch.Tensor]] = {}

    def _rate(self, divisor: float, like: torch.Tensor) -> torch.Tensor:
        """-lr / divisor per member, shaped to broadcast against `like` (K, ...); formed once
        per divisor for all parameters of one dtype and rank."""
        key = (like.dtype, like.dim())
        cached = self.rates.get(key)
        if cached is None or cached[0] != divisor:
            rate = (-(self.lrs / divisor)).to(like.dtype).view(-1, *[1] * (like.dim() - 1))
            cached = self.rates[key] = (divisor, rate)
        return cached[1]

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        beta1, beta2 = self.betas
        for p in self.param_groups[0]["params"]:
            g = p.grad
            if g is None:
                continue
            if not self.adam:
                p.addcmul_(g, self._rate(1.0, p))
                continue
            state = self.state[p]
            if not state:
                state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
            state["step"] += 1
            m, v = state["m"], state["v"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2 ** state["step"]) ** 0.5).add_(self.eps)
            p.add_(self._rate(1 - beta1 ** state["step"], p) * m / denom)


class _StackedLinear(torch.autograd.Function):
    """K linear layers at once: x (K, B, in) @ weight (K, out, in)^T + bias (K, out).

    Differentiated as ``nn.Linear`` is (the weight's gradient computed as g^T x, in the
    weight's own layout), not as autograd differentiates the batched product (x^T g, then
    transposed), which sums in another order: each member's gradient is then the one its own
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
