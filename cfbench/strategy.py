"""The strategy hook protocol, the context hooks see, and composition (``ewc+replay``).

A strategy never owns the training loop: the one loop in ``cfbench.train`` calls these hooks at
fixed points, so every strategy trains under the same budget and can be composed with others.
The same hooks can be called from a user's own PyTorch loop (see the README).

Hook order per task::

    before_task -> train_data -> param_groups -> [batch -> forward -> loss + penalty
    -> backward -> after_backward -> optimizer.step -> after_step] x steps -> after_task

and at every evaluation, ``predict`` turns a test batch into class scores.

Inside the step, ``batch``, ``loss`` and ``penalty`` are pure: they return values and change
no state besides the draws they take from ``ctx.generator``. What else a step changes (a
buffer fed with the stream, reference gradients, a path integral, a learning rate) happens in
``after_backward`` (gradients in place, parameters as the forward saw them) or ``after_step``
(after the update); both receive the step's stream minibatch. A model that routes samples by
task reads the task ids of the batch being forwarded from ``forward_tasks`` (set by
``TrainContext.forward``), not from a hook.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from cfbench import registry
from cfbench.errors import CfbenchError
from cfbench.scenario import Scenario, Setting, Task, apply_mask

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


@dataclass
class TrainData:
    """What one task trains on: stored inputs (uint8 pixels, token ids), targets (global
    labels, next tokens) and each sample's task index."""

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @staticmethod
    def cat(parts: Iterable[TrainData]) -> TrainData:
        parts = list(parts)
        return TrainData(*(torch.cat([getattr(p, f) for p in parts]) for f in ("x", "y", "task")))


@dataclass
class Batch:
    """A minibatch as the model sees it: inputs prepared by the scenario's objective, targets
    (output units), task indices."""

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor


_FORWARD_TASKS: ContextVar[torch.Tensor | None] = ContextVar("cfbench_forward_tasks",
                                                              default=None)


def forward_tasks() -> torch.Tensor | None:
    """The task index of each sample of the forward pass under way (None: the model was called
    outside ``TrainContext.forward``). Per-task adapters and columns route by it, so every
    forward pass, the loop's, a teacher's, one on memory samples, routes by its own batch."""
    return _FORWARD_TASKS.get()


@contextmanager
def routed_by(task: torch.Tensor | None) -> Iterator[None]:
    """Forward passes inside see `task` as ``forward_tasks()``."""
    token = _FORWARD_TASKS.set(task)
    try:
        yield
    finally:
        _FORWARD_TASKS.reset(token)


@dataclass
class TrainContext:
    """Everything a hook may read: the model, the scenario and setting, where training is."""

    model: nn.Module
    scenario: Scenario
    setting: Setting
    device: torch.device
    generator: torch.Generator
    """Seeded from the training seed; use it for any randomness a strategy needs."""
    batch_generator: torch.Generator
    """Draws the minibatch order; kept apart so a strategy's sampling never changes it."""
    augment_generator: torch.Generator | None = None
    """Draws the scenario's training augmentation (on the device); None: no augmentation."""
    task_index: int = -1
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    task_size: int = 0
    """Samples the current task trains on (after every ``train_data`` hook), set before
    ``param_groups``: what epoch- and budget-based schedules count with."""
    stop_task: bool = False
    """Set by a hook to end the current task after this step (early stopping); the loop
    clears it when a task starts."""
    log: dict[str, Any] = field(default_factory=dict)
    """What strategies report about the run (JSON-serialisable); saved in the run record."""
    extra: dict[str, Any] = field(default_factory=dict)

    def task_data(self, index: int, split: str = "train") -> TrainData:
        """Task `index`'s train, val or test split, each sample tagged with the task index."""
        task = self.scenario.tasks[index]
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        if x is None:
            raise CfbenchError(f"task '{task.name}' has no {split} split")
        return TrainData(x, y, torch.full((len(y),), index, dtype=torch.long, device=y.device))

    def make_batch(self, data: TrainData, idx: torch.Tensor | slice, augment: bool = False
                   ) -> Batch:
        """The model's view of samples `idx` of `data`; `augment` applies the scenario's
        training augmentation (the training loop asks for it, evaluation never does)."""
        generator = self.augment_generator if augment else None
        return Batch(self.scenario.prepare(data.x[idx], generator),
                     self.setting.targets(data.y[idx]), data.task[idx])

    def forward(self, batch: Batch, model: nn.Module | None = None) -> torch.Tensor:
        """Unmasked outputs of `model` (default: the trained one) for a batch, with the batch's
        task ids in ``forward_tasks`` while it runs (for models that route by task)."""
        with routed_by(batch.task):
            return (model or self.model)(batch.x)

    def logits(self, batch: Batch, model: nn.Module | None = None) -> torch.Tensor:
        """Masked logits of `model` (default: the trained one) for a batch at this point."""
        return apply_mask(self.forward(batch, model), self.setting.mask(batch.task,
                                                                         self.task_index))

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The scenario's training loss (cross-entropy for classification)."""
        return self.scenario.objective.loss(logits, batch.y)

    @classmethod
    def create(cls, model: nn.Module, scenario: Scenario, setting: str | Setting = "class",
               seed: int = 0, device: torch.device | str = "cpu") -> TrainContext:
        """A context for `model` on `scenario`, seeded as the evaluator seeds its runs.

        This is also the entry point for a user's own training loop: wrap your tensors in
        ``Task``s and a ``Scenario``, build a context, and call a strategy's hooks yourself.
        """
        if isinstance(setting, str):
            setting = Setting(scenario, setting)
        device = torch.device(device)
        augment = (torch.Generator(device).manual_seed(seed + 2_000_003)
                   if scenario.augmentation is not None else None)
        return cls(model=model, scenario=scenario, setting=setting, device=device,
                   generator=torch.Generator().manual_seed(seed),
                   batch_generator=torch.Generator().manual_seed(seed + 1_000_003),
                   augment_generator=augment)


class Strategy:
    """Base class: every hook is a no-op. Subclass, override what you need, register it.

    Hyperparameters are the keyword-only, typed, defaulted arguments of ``__init__``.
    """

    stacked: ClassVar[type[Stacked] | None] = None
    """The form of this class's in-step hooks for K stacked members (stacked runs), or None:
    its runs are not stacked (see `stacked_form`)."""

    def refuses(self, scenario: Scenario) -> str | None:
        """Why this strategy's mechanism does not apply to `scenario` (e.g. it generates
        images, and the samples are text), or None. Checked when runs are planned."""
        return None

    def setup(self, ctx: TrainContext) -> None:
        """Once, after the model is built and before row 0 of R is evaluated."""

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        """Freeze modules, add adapters, snapshot a teacher."""

    def train_data(self, ctx: TrainContext, task: Task, data: TrainData) -> TrainData:
        """The samples this task's minibatches are drawn from (joint training widens them)."""
        return data

    def param_groups(self, ctx: TrainContext) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups for this task; None means every trainable parameter.

        In a composition the groups intersect: a parameter is trained only if every part that
        defines groups includes it, with the options (e.g. lr) all of them give it."""
        return None

    def batch(self, ctx: TrainContext, batch: Batch) -> Batch:
        """The minibatch the model trains on, made from the one before (replay appends memory
        samples). Pure: it returns a batch and changes no state."""
        return batch

    def loss(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """The task loss; cross-entropy on the masked logits unless a strategy replaces it
        (iCaRL's per-class sigmoid loss). Pure."""
        return ctx.loss(logits, batch)

    def penalty(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor
                ) -> torch.Tensor | None:
        """A term added to the loss (L2-SP, distillation, DER's logit match), or None. Pure:
        `batch` is the one trained on (after every ``batch`` hook), `logits` its forward."""
        return None

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        """Before the optimizer step, with the step's gradients in ``.grad``: edit them
        (projection, protection, EWC's term) or read them, and compute what needs the
        parameters as the forward saw them (reference gradients, logits to store). `batch`
        is the step's stream minibatch: as drawn from the task's data, before any ``batch``
        hook (the samples a reservoir stores)."""

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        """After each optimizer step (path integrals, feeding a reservoir, early-stopping
        checks); `batch` is the step's stream minibatch, as for ``after_backward``."""

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        """After a task's last step (Fisher, importances, buffer update)."""

    def predict(self, ctx: TrainContext, batch: Batch) -> torch.Tensor:
        """Class scores for a test batch (argmax is the prediction); the masked logits unless a
        strategy classifies differently (iCaRL's nearest mean of exemplars)."""
        return ctx.logits(batch)

    def state_bytes(self) -> int:
        """Bytes the strategy keeps between tasks (buffers, Fisher, teacher copies)."""
        return 0


HOOKS = ("setup", "before_task", "train_data", "param_groups", "batch", "loss", "penalty",
         "after_backward", "after_step", "after_task", "predict")
EXCLUSIVE_HOOKS = ("loss", "predict")
"""Hooks whose results cannot be combined: at most one part of a composition may define each."""


def overrides(strategy: Strategy, hook: str) -> bool:
    """True if the strategy's class defines `hook` itself (the loop skips no-op hooks)."""
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)


class Stacked:
    """A strategy's in-step hooks for K members trained as one stacked job (``cfbench.batched``;
    the members may differ in seed and hyperparameters). A class that names its form in
    `Strategy.stacked` promises that its ``batch`` and ``after_step`` hooks read no parameters:
    they run per member, on that member's context and strategy object. ``penalty`` and
    ``after_backward`` run here, once for all members. This base has neither: the form of a
    strategy whose in-step hooks read no parameters (replay).

    `job` is the stacked backend (its ``params``, ``forward`` and ``ctxs``); `members` holds each
    member's strategy object (the part of its composition this form stands for)."""

    per_member: ClassVar[tuple[str, ...]] = ()
    """Hyperparameters this form reads from each member, so runs differing in them may share a
    job (grid points stack as seeds do). Runs that differ in any other hyperparameter never
    share one (``cfbench.batched.stack_key``): it may change a batch's shape or the samples
    trained on, or state the form takes to be alike."""

    def __init__(self, job: Any, members: list[Strategy]) -> None:
        self.job, self.members = job, members

    def start_task(self) -> None:
        """Gather the members' state for the task (after their ``before_task``)."""

    def penalty(self, x: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        """Each member's penalty (K,), from inputs (K, B, ...) and raw outputs (K, B, U)."""
        return None

    def after_backward(self) -> None:
        """Edit the stacked gradients (``job.params[name].grad``, shape (K, ...))."""


STACKABLE_HOOKS = ("batch", "penalty", "after_backward", "after_step")
"""In-step hooks a stacked form covers; a strategy overriding ``loss``, ``param_groups`` or
``predict`` is never stacked."""


def stacked_form(strategy: Strategy) -> type[Stacked] | None:
    """The stacked form of `strategy`'s in-step hooks: `Stacked` itself where it overrides
    none, else the form its class declares, provided no class below the declaring one
    re-defined an in-step hook (SI inherits ``Quadratic``'s form but has its own
    ``after_backward``); None if it has none."""
    cls = type(strategy)
    hooks = [h for h in (*STACKABLE_HOOKS, "loss", "param_groups", "predict")
             if overrides(strategy, h)]
    if not hooks:
        return Stacked
    owner = next(c for c in cls.__mro__ if "stacked" in vars(c))
    definers = [next(c for c in cls.__mro__ if h in vars(c)) for h in hooks]
    if (owner.stacked is None or not set(hooks) <= set(STACKABLE_HOOKS)
            or not all(issubclass(owner, d) for d in definers)):
        return None
    return owner.stacked


class Compose(Strategy):
    """Several strategies as one: training data and batches chain left to right, penalties
    add, parameter groups intersect, and every other hook runs left to right.

    The order written matters only where the mathematics makes it matter. Pure hooks cannot
    interfere, routing follows each forward's own batch, and buffers are fed the stream
    minibatch, so ``replay+lora`` and ``lora+replay`` train identically, as do ``ewc+replay``
    and ``replay+ewc``. Order matters where two parts edit the same gradient (in
    ``agem+grad-protect`` the gradient is projected first and then damped, in
    ``grad-protect+agem`` the damped gradient is projected), where two parts append to a
    batch (the rows come in the order written), and where two parts draw from
    ``ctx.generator`` in one hook. ``loss`` and ``predict`` have at most one owner."""

    def __init__(self, parts: list[Strategy]) -> None:
        self.parts = parts
        for hook in EXCLUSIVE_HOOKS:
            owners = [type(p).__name__ for p in parts if overrides(p, hook)]
            if len(owners) > 1:
                raise CfbenchError(f"cannot compose {' and '.join(owners)}: each defines the "
                                   f"'{hook}' hook, which only one strategy may own")

    def _with(self, hook: str) -> list[Strategy]:
        return [p for p in self.parts if overrides(p, hook)]

    def _each(self, hook: str, *args: Any) -> None:
        for part in self._with(hook):
            getattr(part, hook)(*args)

    def refuses(self, scenario: Scenario) -> str | None:
        return next((r for r in (p.refuses(scenario) for p in self.parts) if r), None)

    def setup(self, ctx: TrainContext) -> None:
        self._each("setup", ctx)

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        self._each("before_task", ctx, task)

    def train_data(self, ctx: TrainContext, task: Task, data: TrainData) -> TrainData:
        for p in self._with("train_data"):
            data = p.train_data(ctx, task, data)
        return data

    def _owner(self, hook: str) -> Strategy:
        """The one part defining an exclusive hook, or the base behaviour."""
        owners = self._with(hook)
        return owners[0] if owners else Strategy()

    def param_groups(self, ctx: TrainContext) -> list[dict[str, Any]] | None:
        proposals = [(type(p).__name__, groups) for p in self._with("param_groups")
                     if (groups := p.param_groups(ctx)) is not None]
        if len(proposals) <= 1:
            return proposals[0][1] if proposals else None
        return intersect_groups(proposals)

    def loss(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        return self._owner("loss").loss(ctx, batch, logits)

    def predict(self, ctx: TrainContext, batch: Batch) -> torch.Tensor:
        return self._owner("predict").predict(ctx, batch)

    def batch(self, ctx: TrainContext, batch: Batch) -> Batch:
        for p in self._with("batch"):
            batch = p.batch(ctx, batch)
        return batch

    def penalty(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor
                ) -> torch.Tensor | None:
        terms = [t for p in self._with("penalty") if (t := p.penalty(ctx, batch, logits))
                 is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        self._each("after_backward", ctx, batch)

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        self._each("after_step", ctx, batch)

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        self._each("after_task", ctx, task)

    def state_bytes(self) -> int:
        return sum(p.state_bytes() for p in self.parts)


def intersect_groups(proposals: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Parameter groups that every (owner, groups) proposal agrees on: the parameters all of
    them include, each with the union of the options they give it; two different values of
    one option for one parameter are an error naming both owners. Groups come out in the first
    proposal's parameter order, one per distinct set of options."""
    options: dict[int, dict[str, Any]] = {}
    given_by: dict[tuple[int, str], str] = {}
    counts: dict[int, int] = {}
    order: list[torch.nn.Parameter] = []
    for owner, groups in proposals:
        for group in groups:
            extra = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                key = id(p)
                counts[key] = counts.get(key, 0) + 1
                if key not in options:
                    options[key] = {}
                    order.append(p)
                for name, value in extra.items():
                    if name in options[key] and options[key][name] != value:
                        raise CfbenchError(
                            f"cannot compose {given_by[key, name]} and {owner}: they give a "
                            f"parameter different '{name}' values ({options[key][name]} and "
                            f"{value})")
                    options[key][name] = value
                    given_by[key, name] = owner
    merged: dict[tuple, dict[str, Any]] = {}
    for p in order:
        if counts[id(p)] < len(proposals):
            continue
        opts = options[id(p)]
        key = tuple(sorted(opts.items()))
        merged.setdefault(key, {"params": [], **opts})["params"].append(p)
    return list(merged.values())


def strategy_names(spec: str) -> list[str]:
    """``"ewc+replay"`` -> ``["ewc", "replay"]``; each must be registered.

    A '+' joins two names only where a name follows it, so names may end in '+'
    (``"ewc+der++"`` -> ``["ewc", "der++"]``).
    """
    names = [n.strip() for n in re.split(r"\+(?=\s*[A-Za-z0-9_])", spec)]
    if not all(names) or len(set(names)) != len(names):
        raise CfbenchError(f"bad strategy '{spec}': join distinct registered names with '+', "
                           "e.g. ewc+replay")
    for name in names:
        registry.strategies.get(name)
    return names


def resolve_hparams(spec: str, given: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, dict[str, Any]]:
    """Full, typed hyperparameters of each part of `spec` (defaults overlaid with `given`)."""
    names = strategy_names(spec)
    stray = set(given) - set(names)
    if stray:
        raise CfbenchError(f"hyperparameters given for {', '.join(sorted(stray))}, which is not "
                           f"part of strategy '{spec}'")
    return {n: registry.strategies.get(n).resolve(given.get(n, {})) for n in names}


def build_strategy(spec: str, hparams: Mapping[str, Mapping[str, Any]], setting: str
                   ) -> Strategy:
    """Instantiate a (possibly composed) strategy with resolved hyperparameters."""
    parts = []
    for name in strategy_names(spec):
        entry = registry.strategies.get(name)
        if setting not in entry.settings:
            raise CfbenchError(f"strategy '{name}' does not support the {setting} setting; it "
                               f"supports {', '.join(entry.settings)}")
        try:
            parts.append(entry.factory(**hparams[name]))
        except ValueError as exc:
            raise CfbenchError(f"bad hyperparameters for strategy '{name}': {exc}") from None
    return parts[0] if len(parts) == 1 else Compose(parts)


def make_strategy(spec: str, setting: str = "class",
                  hparams: Mapping[str, Mapping[str, Any]] | None = None) -> Strategy:
    """A ready strategy for use in your own training loop, e.g.
    ``make_strategy("ewc+replay", "class", {"ewc": {"lam": 100}})``: values are checked and
    coerced as on the command line, missing ones take their defaults."""
    return build_strategy(spec, resolve_hparams(spec, hparams or {}), setting)
