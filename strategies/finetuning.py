"""Fine-tuning practice: which parameters move, how fast, and for how long.

Freezing, gradual unfreezing and discriminative learning rates (ULMFiT), learning-rate warmup,
and early stopping that watches the earlier tasks. Each is one mechanism; they compose with each
other and with the rest of the zoo (``gradual-unfreeze+layerwise-lr+warmup`` is ULMFiT's recipe
with a warmup, ``freeze+ewc`` protects the body and regularises the rest).

**Layers.** A *layer* is a module that owns parameters directly (``parameters(recurse=False)`` is
not empty), in registration order (``model.modules()``), with the head
(``cfbench.models.split_head``) last wherever it was registered. In ``mlp:400,400`` the layers
are ``1``, ``3`` and the head ``5``; in a ResNet every convolution, every batch norm and the head
is a layer of its own. *Depth* counts from the top: the head is at depth 0, the last body layer
at depth 1, the first layer at depth ``len(layers) - 1``.

**Frozen** parameters get ``requires_grad=False`` (no gradient is computed, so neither the
optimizer nor its weight decay touch them: they stay bitwise unchanged), and a normalisation
layer whose parameters are all frozen runs in eval mode while training (normalising with its
running statistics, which then stay unchanged too). The loop puts the whole model in train mode
when a task starts, so a frozen norm layer carries a forward pre-hook that puts it back in eval
mode at every forward pass (``cfbench.models.hold_in_eval``).

**Epochs.** Strategies that count in epochs or need a task's step budget read
``ctx.task_size``, the samples the task trains on once every part's ``train_data`` has run (so
``warmup+joint`` counts joint's union).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cfbench.errors import CfbenchError
from cfbench.models import has_running_stats, hold_in_eval, split_head
from cfbench.registry import register_strategy
from cfbench.scenario import Task
from cfbench.strategy import Batch, Strategy, TrainContext, TrainData

FAMILY = "fine-tuning"


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer, bottom to top, the head last (see the module docstring)."""
    head = split_head(model)[1]
    named = [(name, m) for name, m in model.named_modules()
             if next(m.parameters(recurse=False), None) is not None]
    return [(n, m) for n, m in named if m is not head] + [(n, m) for n, m in named if m is head]


class _Freezing(Strategy):
    """Keeps the frozen normalisation layers it holds in eval mode at every forward pass."""

    def __init__(self) -> None:
        self.held: dict[nn.Module, RemovableHandle] = {}

    def hold(self, modules: list[nn.Module]) -> None:
        for module in modules:
            if module not in self.held:
                self.held[module] = hold_in_eval(module)

    def release(self, module: nn.Module) -> None:
        """Let a layer train again (it was unfrozen), in train mode from now on."""
        handle = self.held.pop(module, None)
        if handle is not None:
            handle.remove()
            module.train()


@register_strategy("freeze", family=FAMILY,
                   reference="Yosinski et al. 2014 (frozen transferred layers)")
class Freeze(_Freezing):
    """Freezes chosen parameters from task `from_task` on; the rest trains as usual.

    What is frozen: the parameters whose names (``named_parameters``) match one of the
    `modules` globs (fnmatch, e.g. ``0.*`` or ``features.*``), together with those of the first
    `first` layers (see the module docstring for what a layer is); with neither, every parameter
    but the head's (a linear probe on the body). A glob matching no parameter, or a choice that
    leaves nothing to train, is an error. Frozen parameters are bitwise unchanged (no gradient,
    no optimizer update, no weight decay) and also left out of this strategy's parameter groups,
    so no composed part can put them back into the optimizer (groups intersect); frozen batch
    norms run in eval mode, so their running statistics stay too.

    `from_task` is the first task trained with the parameters frozen: 1 (the default) learns the
    first task freely and protects it afterwards (in a transfer scenario: the source is learned,
    then frozen); 0 freezes from the start. Freezing more keeps more of the earlier tasks and
    leaves less capacity for new ones.
    """

    def __init__(self, *, modules: tuple[str, ...] = (), first: int = 0,
                 from_task: int = 1) -> None:
        super().__init__()
        if any(not g.strip() for g in modules):
            raise ValueError(f"modules must be non-empty name globs, got {modules}")
        if first < 0:
            raise ValueError(f"first must be >= 0 layers, got {first}")
        if from_task < 0:
            raise ValueError(f"from_task must be a task index >= 0, got {from_task}")
        self.modules, self.first, self.from_task = modules, first, from_task
        self.frozen: dict[int, nn.Parameter] = {}
        self._norms: list[nn.Module] = []

    def setup(self, ctx: TrainContext) -> None:
        named = dict(ctx.model.named_parameters())
        chosen: list[nn.Parameter] = []
        if self.modules:
            unknown = [g for g in self.modules if not any(fnmatch.fnmatchcase(n, g)
                                                          for n in named)]
            if unknown:
                raise CfbenchError(f"freeze: modules {', '.join(unknown)} match no parameter; "
                                   f"the model's parameters are {', '.join(named)}")
            chosen += [p for n, p in named.items()
                       if any(fnmatch.fnmatchcase(n, g) for g in self.modules)]
        all_layers = layers(ctx.model)
        if self.first > len(all_layers):
            raise CfbenchError(f"freeze: first={self.first}, but the model has only "
                               f"{len(all_layers)} layers ({', '.join(n for n, _ in all_layers)})")
        for _, layer in all_layers[:self.first]:
            chosen += layer.parameters(recurse=False)
        if not self.modules and not self.first:  # the body: every layer but the last, the head
            chosen = [p for _, layer in all_layers[:-1] for p in layer.parameters(recurse=False)]
        self.frozen = {id(p): p for p in chosen}
        if len(self.frozen) == len(named):
            raise CfbenchError("freeze: this choice freezes every parameter, leaving nothing to "
                               "train; freeze fewer modules or layers")
        self._norms = [m for _, m in all_layers if has_running_stats(m)
                       and all(id(p) in self.frozen for p in m.parameters(recurse=False))]

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        if ctx.task_index >= self.from_task:
            for p in self.frozen.values():
                p.requires_grad_(False)
            self.hold(self._norms)

    def param_groups(self, ctx: TrainContext) -> list[dict[str, Any]] | None:
        frozen = self.frozen if ctx.task_index >= self.from_task else {}
        return [{"params": [p for p in ctx.model.parameters() if id(p) not in frozen]}]


@register_strategy("gradual-unfreeze", family=FAMILY,
                   reference="Howard & Ruder 2018 (ULMFiT, gradual unfreezing)")
class GradualUnfreeze(_Freezing):
    """At each task's start every layer but the head is frozen; then one more layer, from the
    top down, is unfrozen after every `every` `unit`s (steps, or epochs of the task's training
    data) until the whole network trains.

    A layer still frozen is bitwise unchanged (no gradient; its batch norms in eval mode). The
    optimizer is built over every parameter at the task's start, so a layer unfrozen mid-task
    trains from the next step on: while frozen its ``.grad`` stays None, which SGD and Adam
    skip (and Adam's moments for it start at its first real gradient). Small `every` approaches
    plain fine-tuning; large `every` keeps the body longer as it was (protecting earlier tasks)
    at the price of training the new task mostly through the head. ULMFiT unfreezes one layer
    per epoch (the defaults). The schedule restarts with every task.
    """

    def __init__(self, *, every: int = 1, unit: Literal["steps", "epochs"] = "epochs") -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1 {unit}, got {every}")
        self.every, self.unit = every, unit
        self._body: list[nn.Module] = []  # top to bottom
        self._period = 1
        self._done = 0

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        self._body = [m for _, m in layers(ctx.model)[:-1]][::-1]
        for layer in self._body:
            for p in layer.parameters(recurse=False):
                p.requires_grad_(False)
        self.hold([m for m in self._body if has_running_stats(m)])
        self._done = 0

    def param_groups(self, ctx: TrainContext) -> list[dict[str, Any]] | None:
        per_epoch = math.ceil(ctx.task_size / ctx.scenario.protocol.batch_size)  # as the loop
        self._period = self.every * (per_epoch if self.unit == "epochs" else 1)
        return [{"params": list(ctx.model.parameters())}]

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        self._done += 1
        opened, due = divmod(self._done, self._period)
        if due == 0 and opened <= len(self._body):
            layer = self._body[opened - 1]
            for p in layer.parameters(recurse=False):
                p.requires_grad_(True)
            self.release(layer)


@register_strategy("layerwise-lr", family=FAMILY,
                   reference="Howard & Ruder 2018 (ULMFiT, discriminative fine-tuning)")
class LayerwiseLR(Strategy):
    """Discriminative fine-tuning: the layer at depth d (the head is depth 0, see the module
    docstring) trains with the protocol's learning rate times ``decay ** d``.

    Lower layers hold the more general features earlier tasks share, so they move more slowly.
    `decay` = 1 is plain fine-tuning; smaller values protect the body more and adapt it less.
    ULMFiT uses 1/2.6 per LSTM layer; 0.8 suits a few dense layers. In a deep network of many
    small layers (a ResNet counts each convolution and batch norm) take it closer to 1. The
    groups hold every parameter, frozen ones included (their gradient is None, so the optimizer
    skips them), so gradual unfreezing composes with it.
    """

    def __init__(self, *, decay: float = 0.8) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay

    def param_groups(self, ctx: TrainContext) -> list[dict[str, Any]] | None:
        base, seen, groups = ctx.scenario.protocol.lr, set(), []
        for depth, (_, layer) in enumerate(reversed(layers(ctx.model))):
            params = [p for p in layer.parameters(recurse=False) if id(p) not in seen]
            seen.update(map(id, params))  # a shared parameter trains at its top-most layer's rate
            if params:
                groups.append({"params": params, "lr": base * self.decay ** depth})
        return groups


def warmup_factor(k: int, steps: int, start_factor: float, total: int,
                  schedule: Literal["constant", "cosine"], min_factor: float) -> float:
    """The learning-rate multiplier of a task's step k (from 0) out of `total` steps."""
    if k < steps:
        return start_factor + (1 - start_factor) * (k + 1) / steps
    if schedule == "constant":
        return 1.0
    progress = (k + 1 - steps) / (total - steps)
    return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * progress)) / 2


@register_strategy("warmup", family=FAMILY,
                   reference="Goyal et al. 2017 (linear warmup); Loshchilov & Hutter 2017 "
                             "(cosine annealing)")
class Warmup(Strategy):
    """Learning-rate warmup at the start of every task, then constant or cosine decay.

    Step k of a task (from 0) trains with each parameter group's own learning rate times
    ``start_factor + (1 - start_factor) * (k + 1) / steps`` while ``k < steps`` (the last warmup
    step reaches the full rate). After it, `schedule` "constant" keeps the full rate and
    "cosine" anneals it as ``min_factor + (1 - min_factor) * (1 + cos(pi * p)) / 2`` with
    ``p = (k + 1 - steps) / (T - steps)``, reaching `min_factor` at the task's last step T - 1
    (T the task's step budget; with min_factor 0 that last step changes nothing). The schedule
    restarts with every task: each new task starts with small, gentle steps while its loss
    is at its largest, which is when plain fine-tuning moves the shared weights most.

    A group's own rate is read at the first step that sees the group (kept in it as
    ``initial_lr``, as torch's schedulers do: an optimizer carried over with
    ``reset_optimizer=False`` keeps its base rate), so the factor multiplies what other parts
    set: ``warmup+layerwise-lr`` trains each layer with the product. More `steps` or a smaller
    `start_factor` protect more and learn the new task more slowly.
    """

    def __init__(self, *, steps: int = 100, start_factor: float = 0.0,
                 schedule: Literal["constant", "cosine"] = "constant",
                 min_factor: float = 0.0) -> None:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not 0 <= start_factor <= 1:
            raise ValueError(f"start_factor must be in [0, 1], got {start_factor}")
        if not 0 <= min_factor <= 1:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor}")
        self.steps, self.start_factor = steps, start_factor
        self.schedule, self.min_factor = schedule, min_factor
        self._k = 0

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        self._k = 0

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        """Sets the rate of the step about to be taken."""
        assert ctx.optimizer is not None
        total = ctx.scenario.protocol.steps(ctx.task_size)
        factor = warmup_factor(self._k, self.steps, self.start_factor, total,
                               self.schedule, self.min_factor)
        for group in ctx.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        self._k += 1


def stratified_holdout(data: TrainData, fraction: float, generator: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (kept, held out) over `data`: round(fraction * n_c) random samples of each
    class c held out, drawn with `generator`; a sequence (a label per token) has no class, so
    sequences are held out at random, round(fraction * n) of them."""
    n = len(data)
    order = torch.randperm(n, generator=generator).to(data.y.device)
    if data.y.dim() > 1:
        held = torch.zeros(n, dtype=torch.bool, device=data.y.device)
        held[order[:round(fraction * n)]] = True
        return ~held, held
    order = order[data.y[order].argsort(stable=True)]  # grouped by class, random within each
    _, counts = torch.unique(data.y, return_counts=True)  # sorted classes, as `order` is
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    rank = torch.arange(n, device=data.y.device) - starts
    take = torch.repeat_interleave((counts * fraction).round().long(), counts)
    held = torch.zeros(n, dtype=torch.bool, device=data.y.device)
    held[order] = rank < take
    return ~held, held


def subset(data: TrainData, mask: torch.Tensor) -> TrainData:
    return TrainData(data.x[mask], data.y[mask], data.task[mask])


@register_strategy("early-stop", family=FAMILY,
                   reference="forgetting-aware early stopping (validation on earlier tasks)")
class EarlyStop(Strategy):
    """Stops a task's training once accuracy on the earlier tasks has fallen too far.

    During every task that has earlier ones (in a transfer scenario: from the first target task
    on, watching the source), every `every` steps the strategy measures the mean accuracy over
    the earlier tasks' validation samples and ends the task (``ctx.stop_task``) when it falls
    below ``(1 - threshold)`` times its value at the task's start, once at least `min_steps`
    steps were taken. Accuracy is measured as the evaluator does (the setting's masking via
    ``ctx.logits``, eval mode, inference mode); each measurement reads the result on the host,
    a synchronisation every `every` steps that the loop itself never makes.

    Validation samples are a task's own validation split where it has one (``x_val``: the
    transfer source's). Otherwise `holdout` of its training data (stratified by class, drawn
    from ``ctx.generator``) is removed in ``train_data`` and kept by the strategy, so it trains
    on that much less (10% by default); the last task keeps all its data, since nothing later
    watches it. A transfer source without a validation split is watched on a sample of its
    training data, which its pretraining saw.

    `threshold` trades the new task (a small one stops early, on the first dip) against the old
    ones; 1 never stops. `every` trades the cost of measuring against stopping late. The log
    (``ctx.log["early-stop"]``) has, per watched task, the accuracy at its start, each
    (step, accuracy) seen, and the step it stopped at (None: it ran its whole budget).
    """

    def __init__(self, *, every: int = 50, threshold: float = 0.1, holdout: float = 0.1,
                 min_steps: int = 0) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if not 0 < holdout < 1:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout}")
        if min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {min_steps}")
        self.every, self.threshold = every, threshold
        self.holdout, self.min_steps = holdout, min_steps
        self.held: dict[int, TrainData] = {}
        """Validation samples this strategy took from tasks without a validation split."""
        self._watch: list[TrainData] = []
        self._entry: dict[str, Any] = {}
        self._done = 0

    def _validation(self, ctx: TrainContext, index: int) -> TrainData:
        task = ctx.scenario.tasks[index]
        return ctx.task_data(index, "val") if task.x_val is not None else self.held[index]

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        if ctx.scenario.source is not None and ctx.task_index == 0 and task.x_val is None:
            data = ctx.task_data(0)
            self.held[0] = subset(data, stratified_holdout(data, self.holdout, ctx.generator)[1])

    def train_data(self, ctx: TrainContext, task: Task, data: TrainData) -> TrainData:
        t = ctx.task_index
        if task.x_val is None and t < len(ctx.scenario.tasks) - 1:
            own = data.task == t  # a composed part (joint) may have added earlier tasks' data
            mine = subset(data, own)
            keep, held = stratified_holdout(mine, self.holdout, ctx.generator)
            self.held[t] = subset(mine, held)
            data = TrainData.cat([subset(data, ~own), subset(mine, keep)])
        # Measured here, after every part's before_task: the model that trains (e.g. wrapped).
        self._watch = [self._validation(ctx, i) for i in range(t)]
        self._done = 0
        if self._watch:
            self._entry = {"task": t, "start": self.accuracy(ctx), "checks": [],
                           "stopped_at": None}
            ctx.log.setdefault("early-stop", []).append(self._entry)
        return data

    @torch.inference_mode()
    def accuracy(self, ctx: TrainContext) -> float:
        """Mean accuracy over the watched tasks' validation samples (one host sync)."""
        modes = [(m, m.training) for m in ctx.model.modules()]
        ctx.model.eval()
        size = ctx.scenario.protocol.eval_batch_size
        hits = []
        for data in self._watch:
            correct = torch.zeros((), dtype=torch.long, device=ctx.device)
            for start in range(0, len(data), size):
                batch = ctx.make_batch(data, slice(start, start + size))
                correct += (ctx.logits(batch).argmax(-1) == batch.y).sum()
            hits.append(correct)
        for module, mode in modes:  # each module as it was (frozen batch norms stay in eval)
            module.training = mode
        counts = torch.stack(hits).tolist()
        return sum(c / d.y.numel() for c, d in zip(counts, self._watch, strict=True)) / len(counts)

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        if not self._watch:
            return
        self._done += 1
        if self._done % self.every:
            return
        accuracy = self.accuracy(ctx)
        self._entry["checks"].append([self._done, accuracy])
        if (self._done >= self.min_steps
                and accuracy < (1 - self.threshold) * self._entry["start"]):
            ctx.stop_task = True
            self._entry["stopped_at"] = self._done

    def state_bytes(self) -> int:
        return sum(t.element_size() * t.numel() for d in self.held.values()
                   for t in (d.x, d.y, d.task))
