"""Avalanche 0.6.0 strategies in cfbench's loop and evaluator: ``avalanche:EWC`` and the rest.

Each ``avalanche:<Name>`` holds Avalanche's own plugin object (``EWCPlugin``, ``LwFPlugin``,
``ReplayPlugin``, ``AGEMPlugin``, ``GEMPlugin``) and calls its callbacks from cfbench's hooks,
handing it an ``AvalancheView`` in place of Avalanche's strategy: the attributes plugins read
and write (``model``, ``optimizer``, ``device``, ``experience.dataset``,
``clock.train_exp_counter``, ``mb_x``, ``mb_y``, ``mb_output``, ``loss``, ``train_mb_size``,
``_criterion``), backed by the ``TrainContext``. So the peer's rule runs unchanged under
cfbench's scenarios, budgets, seeds and evaluator, which is what a cross-check needs.

Callbacks per hook, in the order Avalanche's training iteration calls them::

    before_task     before_training, before_training_exp
    batch           before_training_iteration, before_forward
    penalty         after_forward, before_backward
    after_backward  after_backward, before_update
    after_step      after_update, after_training_iteration
    after_task      after_training_exp, after_training

Limits (what the hooks cannot express, and conventions):

- Avalanche's callbacks change state where cfbench's pure hooks may not (A-GEM and GEM take
  reference gradients before the forward, plugins write ``strategy.loss``), so these adapters
  are the one exception to the pure ``batch`` and ``penalty`` of ``cfbench.strategy``: they
  call the callbacks where Avalanche's iteration does, which is what a cross-check needs.
  Compose them with nothing whose hooks they could disturb.

- No DataLoader and no epochs: epoch callbacks never run, and a plugin that swaps
  ``strategy.dataloader`` cannot. ``avalanche:Replay`` therefore drives ReplayPlugin's storage
  policy (what is kept) and itself appends a uniformly drawn memory minibatch to each batch,
  as ReplayDataLoader does (which instead cycles shuffled passes over the memory).
- ``strategy.loss`` starts at zero in ``before_backward``: what plugins add to it is the
  penalty. A plugin that reads the task loss from it sees 0.
- Avalanche's task label is 0 for every sample (its class-incremental convention, which its
  single-head plugins assume). Logit masks are cfbench's setting's, so the plugins' own forward
  passes (EWC's Fisher, the memory gradients of A-GEM and GEM, LwF's teacher) see unmasked
  outputs, exactly as in Avalanche.
- ``experience.dataset`` is the current task's training split, normalised as float inputs on
  the CPU, with the setting's output units as targets.
- Avalanche draws from torch's and Python's global generators; each callback runs with them
  seeded from ``ctx.generator`` and restored afterwards, so a run is reproducible from its seed.

The same rules in cfbench's conventions (used by ``benchmarks/vs_avalanche.py``):

- EWC: Avalanche adds ewc_lambda * sum F (theta - theta*)^2 with F the mean over the task's
  minibatches (``train_mb_size`` B, in order, true labels) of the squared minibatch-mean
  gradient. cfbench's ``ewc`` with fisher=empirical fisher_batch=B fisher_samples=none
  estimates B*F and weights lam/2, so lam = 2 * ewc_lambda / B (with B=1 both Fishers are the
  exact per-sample empirical Fisher).
- LwF: Avalanche adds alpha * KL on the units of earlier classes, without the T^2 of cfbench's
  ``lwf``: cfbench alpha = Avalanche alpha / T^2 (the same in the class setting; in the task
  setting Avalanche's one softmax spans every earlier head, cfbench's has one per head).
- Replay: cfbench ``replay`` selection=per-task memory=mem_size mix=batch
  replay_batch_size=batch_size_mem.
- A-GEM: cfbench ``agem`` selection=per-task, per_class = patterns_per_exp / classes per
  task, ref_batch_size=sample_size (Avalanche draws sample_size // experiences from each).
- GEM: cfbench ``gem`` rehearse=false (Avalanche's GEM trains on the task's data only),
  per-task memory, margin=memory_strength; Avalanche adds 1e-3 * I to the dual QP.
- DER: cfbench ``der`` memory=mem_size alpha=alpha is Avalanche's ``DER`` strategy with
  beta=0 (both: alpha * the mean squared error over sample x unit on a memory minibatch of
  batch_size_mem, default the batch size). Their memories differ: cfbench's reservoir keeps
  each sample with the logits of the step that saw it, Avalanche's class-balanced memory is
  filled at the end of each experience with the logits then.

Importing this module registers the names but imports no Avalanche; building a strategy needs
``avalanche-lib`` 0.6 (``pip install 'cfbench[peers]'``) and says so in one line otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import random
from collections.abc import Iterator, Mapping
from types import ModuleType, SimpleNamespace
from typing import Any, Literal

import torch
from torch import nn

from cfbench.errors import CfbenchError
from cfbench.registry import register_strategy
from cfbench.scenario import Task
from cfbench.strategy import Batch, Strategy, TrainContext

INSTALL_HINT = "pip install 'cfbench[peers]'"
FAMILY = "peer"

CALLBACKS: dict[str, tuple[str, ...]] = {
    "before_task": ("before_training", "before_training_exp"),
    "batch": ("before_training_iteration", "before_forward"),
    "penalty": ("after_forward", "before_backward"),
    "after_backward": ("after_backward", "before_update"),
    "after_step": ("after_update", "after_training_iteration"),
    "after_task": ("after_training_exp", "after_training"),
}
"""cfbench hook -> the Avalanche callbacks it drives, in Avalanche's order."""


def avalanche(module: str = "avalanche.training.plugins") -> ModuleType:
    """A module of the peers extra (Avalanche's, or quadprog, its GEM's solver), or a
    CfbenchError with the one line that says how to get it."""
    try:
        version = importlib.import_module("avalanche").__version__
        loaded = importlib.import_module(module)
    except ImportError as exc:
        raise CfbenchError(f"the avalanche:* strategies need avalanche-lib 0.6 (and quadprog "
                           f"for GEM); {exc.name or module} is not installed: {INSTALL_HINT}"
                           ) from None
    if not version.startswith("0.6."):
        raise CfbenchError(f"the avalanche:* strategies are written for avalanche-lib 0.6, "
                           f"found {version}: {INSTALL_HINT}")
    return loaded


@contextlib.contextmanager
def seeded(generator: torch.Generator) -> Iterator[None]:
    """Seed torch's CPU and Python's global generators from `generator` for a block, and restore
    both after it: Avalanche's sampling becomes reproducible and nothing outside sees it."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def reachable_bytes(*roots: Any) -> int:
    """Bytes of the distinct tensor storages reachable from `roots` through containers, modules
    and Avalanche objects: plugin state, and whatever datasets its buffers keep alive."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, int | float | str | bool) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, nn.Module):
            stack += [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, Mapping):
            stack += obj.values()
        elif isinstance(obj, list | tuple | set | frozenset):
            stack += obj
        elif type(obj).__module__.startswith(("avalanche.", "torch.utils.data")) \
                and hasattr(obj, "__dict__"):
            stack += vars(obj).values()
    return sum(storages.values())


class _Clock:
    """Avalanche's clock as plugins read it: experiences trained before this one (cfbench's task
    index; a transfer source is experience 0) and iterations so far."""

    def __init__(self, ctx: TrainContext) -> None:
        self._ctx = ctx

    @property
    def train_exp_counter(self) -> int:
        return max(self._ctx.task_index, 0)

    @property
    def train_iterations(self) -> int:
        return self._ctx.step


class _ZeroGrad:
    """The optimizer outside training (a transfer source's zero-step task has none yet):
    plugins only clear gradients through it there."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


class AvalancheView:
    """What Avalanche plugins read from and write to their strategy, backed by a TrainContext."""

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.clock = _Clock(ctx)
        self._criterion = nn.CrossEntropyLoss()
        self.train_mb_size = ctx.scenario.protocol.batch_size
        self.eval_mb_size = ctx.scenario.protocol.eval_batch_size
        self.is_training = True
        self.mbatch: list[torch.Tensor] | None = None
        self.mb_output: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self._experience: SimpleNamespace | None = None

    @property
    def model(self) -> nn.Module:
        return self.ctx.model

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def optimizer(self) -> torch.optim.Optimizer | _ZeroGrad:
        return self.ctx.optimizer or _ZeroGrad(self.ctx.model)

    @property
    def mb_x(self) -> torch.Tensor:
        assert self.mbatch is not None
        return self.mbatch[0]

    @property
    def mb_y(self) -> torch.Tensor:
        assert self.mbatch is not None
        return self.mbatch[1]

    @property
    def mb_task_id(self) -> torch.Tensor:
        assert self.mbatch is not None
        return self.mbatch[-1]

    @property
    def experience(self) -> SimpleNamespace:
        """The current task as an Avalanche experience, built on first use in each task."""
        if self._experience is None:
            ctx = self.ctx
            data = ctx.task_data(ctx.task_index)
            x = ctx.scenario.prepare(data.x).cpu()
            y = ctx.setting.targets(data.y).cpu()
            utils = avalanche("avalanche.benchmarks.utils")
            dataset = utils._make_taskaware_tensor_classification_dataset(x, y, task_labels=0)
            self._experience = SimpleNamespace(
                dataset=dataset, current_experience=ctx.task_index, task_label=0,
                task_labels=[0], classes_in_this_experience=sorted(set(y.tolist())))
        return self._experience

    def new_task(self) -> None:
        self._experience = None

    def clear_step(self) -> None:
        """Drop the last minibatch and its graph (nothing is held between tasks)."""
        self.mbatch = self.mb_output = self.loss = None


class AvalanchePlugins(Strategy):
    """Avalanche plugins driven by cfbench's hooks (see the module doc); each registered
    subclass fixes which plugin and types its hyperparameters."""

    not_driven: tuple[str, ...] = ()
    """Callbacks of the plugins that this adapter must not call."""

    def __init__(self, plugins: list[Any]) -> None:
        base = avalanche("avalanche.core").BaseSGDPlugin
        self.plugins = plugins
        self._calls = {hook: [getattr(p, cb) for cb in callbacks for p in plugins
                              if cb not in self.not_driven
                              and getattr(type(p), cb) is not getattr(base, cb)]
                       for hook, callbacks in CALLBACKS.items()}
        self.view: AvalancheView | None = None
        self._forward: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _drive(self, ctx: TrainContext, hook: str) -> None:
        if self._calls[hook]:
            with seeded(ctx.generator):
                for call in self._calls[hook]:
                    call(self.view)

    def _keep_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._forward = (args[0], output)

    def setup(self, ctx: TrainContext) -> None:
        self.view = AvalancheView(ctx)

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        assert self.view is not None, "call setup(ctx) first"
        self.view.new_task()
        self._drive(ctx, "before_task")
        if self._calls["penalty"]:  # plugins read the model's raw output, before cfbench's mask
            self._handle = ctx.model.register_forward_hook(self._keep_output)

    def batch(self, ctx: TrainContext, batch: Batch) -> Batch:
        assert self.view is not None
        self.view.mbatch = [batch.x, batch.y, torch.zeros_like(batch.task)]
        self._drive(ctx, "batch")
        return batch

    def penalty(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor
                ) -> torch.Tensor | None:
        if not self._calls["penalty"]:
            return None
        view = self.view
        assert view is not None
        seen = self._forward
        view.mb_output = seen[1] if seen is not None and seen[0] is batch.x \
            else ctx.forward(batch)
        view.loss = torch.zeros((), device=ctx.device)
        self._drive(ctx, "penalty")
        return view.loss if view.loss.requires_grad else None

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        self._drive(ctx, "after_backward")

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        self._drive(ctx, "after_step")

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        assert self.view is not None
        if self._handle is not None:  # before plugins copy the model (LwF's teacher)
            self._handle.remove()
            self._handle = None
        self._forward = None
        self.view.clear_step()
        self._drive(ctx, "after_task")
        self.view.new_task()

    def state_bytes(self) -> int:
        return reachable_bytes(self.plugins)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of samples, got {value}")


@register_strategy("avalanche:Naive", family=FAMILY,
                   reference="Avalanche 0.6.0 Naive (Lomonaco et al. 2021)")
class AvalancheNaive(AvalanchePlugins):
    """Avalanche's Naive: fine-tuning with no plugin, so through cfbench's loop it is cfbench's
    ``naive`` step for step (a check that the adapter itself changes nothing)."""

    def __init__(self) -> None:
        super().__init__([])


@register_strategy("avalanche:EWC", family=FAMILY,
                   reference="Avalanche 0.6.0 EWCPlugin; Kirkpatrick et al. 2017")
class AvalancheEWC(AvalanchePlugins):
    """Avalanche's EWCPlugin: ewc_lambda * sum F (theta - theta*)^2 over earlier tasks, with F
    the mean squared minibatch gradient of the task's loss (see the module doc for cfbench's
    ``ewc`` in the same terms).

    ewc_lambda: the penalty's weight; the default is Avalanche's ewc_mnist example's, weak
        next to cfbench's ``ewc`` (lam = 2 * ewc_lambda / batch size). Larger is more stable,
        less plastic.
    mode: "separate" keeps a penalty per earlier task; "online" one, its importance decayed by
        `decay_factor` per task (0: only the last task counts, 1: none fades).
    """

    def __init__(self, *, ewc_lambda: float = 0.4,
                 mode: Literal["separate", "online"] = "separate",
                 decay_factor: float | None = None) -> None:
        if not ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda}")
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be separate or online, got {mode!r}")
        if mode == "online" and (decay_factor is None or not 0 <= decay_factor <= 1):
            raise ValueError(f"mode=online needs decay_factor in [0, 1], got {decay_factor}")
        if mode == "separate" and decay_factor is not None:
            raise ValueError("decay_factor applies to mode=online only; leave it none")
        plugin = avalanche().EWCPlugin(ewc_lambda, mode=mode, decay_factor=decay_factor)
        super().__init__([plugin])


@register_strategy("avalanche:LwF", family=FAMILY,
                   reference="Avalanche 0.6.0 LwFPlugin; Li & Hoiem 2017")
class AvalancheLwF(AvalanchePlugins):
    """Avalanche's LwFPlugin: alpha * KL(teacher || student) at temperature T on the output
    units of the classes of earlier tasks, the teacher a copy taken after each task.

    alpha: the distillation weight (Avalanche's default 1; cfbench's ``lwf`` alpha is this
        divided by temperature^2); larger keeps more of the old outputs.
    temperature: of both softmaxes; higher transfers more of the teacher's ranking of unlikely
        classes.
    """

    def __init__(self, *, alpha: float = 1.0, temperature: float = 2.0) -> None:
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__([avalanche().LwFPlugin(alpha=alpha, temperature=temperature)])


@register_strategy("avalanche:Replay", family=FAMILY,
                   reference="Avalanche 0.6.0 ReplayPlugin (ExperienceBalancedBuffer)")
class AvalancheReplay(AvalanchePlugins):
    """Avalanche's ReplayPlugin: a memory of `mem_size` samples split equally over the tasks seen
    (a random subset of each, Avalanche's ExperienceBalancedBuffer), and every minibatch
    extended by `batch_size_mem` memory samples (none: the protocol's batch size), one
    cross-entropy over both. More memory forgets less and keeps more state.

    The storage policy is Avalanche's; the mixing is done here (see the module doc).
    """

    not_driven = ("before_training_exp",)  # it swaps in a ReplayDataLoader

    def __init__(self, *, mem_size: int = 200, batch_size_mem: int | None = None) -> None:
        _positive("mem_size", mem_size)
        if batch_size_mem is not None:
            _positive("batch_size_mem", batch_size_mem)
        plugin = avalanche().ReplayPlugin(mem_size=mem_size, batch_size_mem=batch_size_mem)
        super().__init__([plugin])
        self.memory: Batch | None = None

    def batch(self, ctx: TrainContext, batch: Batch) -> Batch:
        if self.memory is not None:
            size = self.plugins[0].batch_size_mem or ctx.scenario.protocol.batch_size
            idx = torch.randperm(len(self.memory.y), generator=ctx.generator)[:size]
            idx = idx.to(ctx.device)
            batch = Batch(*(torch.cat([getattr(batch, f), getattr(self.memory, f)[idx]])
                            for f in ("x", "y", "task")))
        return super().batch(ctx, batch)

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        super().after_task(ctx, task)
        parts = []
        for index, group in self.plugins[0].storage_policy.buffer_groups.items():
            stored = group.buffer
            if len(stored):  # group keys count experiences, as cfbench's task index does
                x, y, _ = stored.collate_fn([stored[i] for i in range(len(stored))])
                parts.append(Batch(x, y, torch.full_like(y, index)))
        self.memory = Batch(*(torch.cat([getattr(p, f) for p in parts]).to(ctx.device)
                              for f in ("x", "y", "task"))) if parts else None

    def state_bytes(self) -> int:
        return reachable_bytes(self.plugins, *(vars(self.memory).values() if self.memory else ()))


@register_strategy("avalanche:AGEM", family=FAMILY,
                   reference="Avalanche 0.6.0 AGEMPlugin; Chaudhry et al. 2019")
class AvalancheAGEM(AvalanchePlugins):
    """Avalanche's AGEMPlugin: the update is projected so that, to first order, it does not
    increase the loss on a memory minibatch.

    patterns_per_exp: random samples kept from each task (250: A-GEM's MNIST memory per task);
        more gives a better constraint and more state.
    sample_size: memory samples per reference gradient, sample_size // tasks seen from each
        (Avalanche's default 64; it must be at least the number of tasks); larger is less noisy
        and costs more per step.
    """

    def __init__(self, *, patterns_per_exp: int = 250, sample_size: int = 64) -> None:
        _positive("patterns_per_exp", patterns_per_exp)
        _positive("sample_size", sample_size)
        plugin = avalanche().AGEMPlugin(patterns_per_experience=patterns_per_exp,
                                        sample_size=sample_size)
        super().__init__([plugin])

    def setup(self, ctx: TrainContext) -> None:
        tasks = len(ctx.scenario.tasks)
        if self.plugins[0].sample_size < tasks:
            raise CfbenchError(f"avalanche:AGEM needs sample_size >= the number of tasks "
                               f"({tasks}), got {self.plugins[0].sample_size}")
        super().setup(ctx)


@register_strategy("avalanche:GEM", family=FAMILY,
                   reference="Avalanche 0.6.0 GEMPlugin; Lopez-Paz & Ranzato 2017")
class AvalancheGEM(AvalanchePlugins):
    """Avalanche's GEMPlugin: each step, one gradient per earlier task on all of its memory; if
    the update would increase any of those losses (to first order) it is replaced by the
    solution of GEM's QP (quadprog).

    patterns_per_exp: the first samples of a shuffled pass over each task kept (256: GEM's
        MNIST memory per task); more is a better constraint at more compute per step.
    memory_strength: the QP's margin (GEM's gamma); larger pushes updates toward old tasks'
        gradients, at the new task's expense.
    """

    def __init__(self, *, patterns_per_exp: int = 256, memory_strength: float = 0.5) -> None:
        _positive("patterns_per_exp", patterns_per_exp)
        if not memory_strength >= 0:
            raise ValueError(f"memory_strength must be >= 0, got {memory_strength}")
        avalanche("quadprog")
        plugin = avalanche().GEMPlugin(patterns_per_experience=patterns_per_exp,
                                       memory_strength=memory_strength)
        super().__init__([plugin])
