"""Distillation: a frozen copy of the model taken before each task (the teacher) anchors what the
model outputs (LwF) or computes inside (feature distillation) on the current task's own data.

No old data is kept; the state is the teacher, one copy of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cfbench.errors import CfbenchError
from cfbench.models import split_head
from cfbench.registry import register_strategy
from cfbench.scenario import Setting, Task
from cfbench.strategy import Batch, Strategy, TrainContext

HEAD_INPUT = "<head input>"
"""The point feature distillation matches by default: the feature extractor's output."""


def frozen_copy(model: nn.Module) -> nn.Module:
    """A snapshot of `model` with its own detached tensors: eval mode, no gradients, no hooks.

    Forward hooks stay behind: a copied hook would keep writing into whatever the original's
    hook writes into (another strategy's tap), and copying a bound-method hook would copy its
    owner. Pre-seeding deepcopy's memo with empty dicts leaves them out without touching them.
    """
    memo = {id(hooks): type(hooks)() for module in model.modules()
            for name, hooks in vars(module).items()
            if name.startswith("_forward") and "hooks" in name}
    teacher = copy.deepcopy(model, memo)
    teacher.requires_grad_(False)
    return teacher.eval()


def module_bytes(module: nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (0 for None)."""
    if module is None:
        return 0
    return sum(t.element_size() * t.numel()
               for t in (*module.parameters(), *module.buffers()))


class Tap:
    """The outputs (or inputs) of chosen submodules in a model's latest forward pass.

    The training step's own forward fills it, so reading costs nothing; `read` runs the model
    again when that forward was on another input (a composed strategy ran one since), or ran
    without gradient where the reader needs one (a composed strategy's no-grad pass).
    `points` maps a name to (module, True to take its input / False to take its output).
    """

    def __init__(self, model: nn.Module, points: Mapping[str, tuple[nn.Module, bool]]) -> None:
        self.model = model
        self.values: dict[str, torch.Tensor] = {}
        self._source: torch.Tensor | None = None
        self._with_grad = False
        self._names = tuple(points)

        def start(module: nn.Module, args: tuple) -> None:
            self.values.clear()
            self._source = args[0] if args else None
            self._with_grad = torch.is_grad_enabled()

        def keep(name: str, take_input: bool):
            if take_input:
                return lambda module, args: self.values.__setitem__(name, args[0])
            return lambda module, args, out: self.values.__setitem__(name, out)

        self._handles = [model.register_forward_pre_hook(start)]
        for name, (module, take_input) in points.items():
            register = module.register_forward_pre_hook if take_input \
                else module.register_forward_hook
            self._handles.append(register(keep(name, take_input)))

    def read(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tapped tensors of the model applied to `x` (reusing the last forward if on x)."""
        if self._source is not x or (torch.is_grad_enabled() and not self._with_grad):
            self.model(x)
        missing = [n for n in self._names if n not in self.values]
        if missing:
            raise CfbenchError(f"layer(s) {', '.join(missing)} took no part in the forward pass; "
                               "choose modules the model calls")
        return self.values

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Apply the model to `x` and return the tapped tensors."""
        self.model(x)
        return self.read(x)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def old_unit_groups(setting: Setting, task_index: int) -> torch.Tensor:
    """(groups, units) boolean: the output units that hold what was learnt before `task_index`,
    one row per softmax.

    Task setting: one row per earlier task, its own head (each head is its own classifier).
    Class setting: one row, every unit of the earlier tasks (the old head of Li & Hoiem).
    Domain setting: one row, all units (every task shares them).
    """
    if setting.name == "task":
        return setting.task_masks[:task_index]
    if setting.name == "class":
        return setting.seen_masks[task_index - 1:task_index]
    return torch.ones(1, setting.n_outputs, dtype=torch.bool, device=setting.seen_masks.device)


def grouped_kl(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), each softmax over one group's units,
    summed over groups and averaged over the batch. Zero exactly when the logits agree."""
    hidden = ~groups  # (groups, units), broadcast against (batch, 1, units)

    def log_probs(logits: torch.Tensor) -> torch.Tensor:
        scaled = (logits / temperature).unsqueeze(1).masked_fill(hidden, float("-inf"))
        return scaled.log_softmax(-1).masked_fill(hidden, 0.0)  # no -inf left to make NaNs

    target = log_probs(teacher)
    kl = (target.exp().masked_fill(hidden, 0.0) * (target - log_probs(student))).sum((1, 2))
    return temperature ** 2 * kl.mean()


class _Distiller(Strategy):
    """Shared life cycle: from the second task on, a teacher snapshot and taps on the model and
    the teacher at the same points; the penalty compares the two on the current batch."""

    def __init__(self, alpha: float) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.teacher: nn.Module | None = None
        self._taps: tuple[Tap, Tap] | None = None

    def points(self, model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
        """Where to tap `model` (the trained model or its teacher: the names are the same)."""
        raise NotImplementedError

    def distance(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
        """The penalty before the alpha weight."""
        raise NotImplementedError

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        if ctx.task_index == 0:
            return
        self.teacher = frozen_copy(ctx.model)
        self._taps = (Tap(ctx.model, self.points(ctx.model)),
                      Tap(self.teacher, self.points(self.teacher)))

    def penalty(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor
                ) -> torch.Tensor | None:
        if self._taps is None:
            return None
        student_tap, teacher_tap = self._taps
        student = student_tap.read(batch.x)
        with torch.no_grad():
            teacher = teacher_tap.run(batch.x)
        return self.alpha * self.distance(student, teacher)

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        if self._taps is not None:  # evaluation and later copies see an untapped model
            for tap in self._taps:
                tap.remove()
            self._taps = None

    def state_bytes(self) -> int:
        return module_bytes(self.teacher)


@register_strategy("lwf", family="distillation",
                   reference="Li & Hoiem 2017 (Learning without Forgetting)")
class LwF(_Distiller):
    """Learning without Forgetting: the outputs the model gave for earlier tasks, on the new
    task's inputs, are kept by distilling them from a frozen copy taken before the task.

    Penalty: alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) on the current batch,
    over the units of earlier tasks only (see `old_unit_groups`): the earlier tasks' heads in
    the task setting (one KL per head, summed, as Li & Hoiem sum one term per old task), all
    units in the domain setting, the earlier tasks' units in the class setting (both softmaxes
    over those units only, as Li & Hoiem's old head and Avalanche's LwF: nothing stops the new
    units from outgrowing them, so there LwF is little better than fine-tuning). The current
    task keeps its usual cross-entropy.

    alpha: weight of the old tasks' outputs against the new task (Li & Hoiem's lambda_o = 1);
        larger keeps more of the old behaviour at the cost of learning the new task.
    temperature: of the softened softmax (Hinton et al. 2015); 2 as in Li & Hoiem. Higher T
        transfers more of the teacher's ranking of the unlikely classes.
    """

    def __init__(self, *, alpha: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__(alpha)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self._groups: torch.Tensor | None = None

    def points(self, model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
        # The raw outputs: in the task setting the loop's logits hide the old heads.
        return {"logits": (model, False)}

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        super().before_task(ctx, task)
        if ctx.task_index > 0:
            self._groups = old_unit_groups(ctx.setting, ctx.task_index)

    def distance(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
        assert self._groups is not None  # set with the teacher
        return grouped_kl(student["logits"], teacher["logits"], self._groups, self.temperature)


@register_strategy("feature-distill", family="distillation",
                   reference="Jung et al. 2016 (Less-forgetting learning); Hou et al. 2019")
class FeatureDistill(_Distiller):
    """Feature distillation: chosen intermediate features of the model stay close, on the new
    task's inputs, to those of a frozen copy taken before the task.

    Penalty: alpha * sum over layers of MSE(features, teacher features), each the mean over the
    batch and the layer's units, so one alpha means the same for layers of any width. Unlike
    LwF it constrains the representation, not the outputs, so it is the same in every setting.

    alpha: weight of the feature match; larger keeps the representation fixed at the cost of
        plasticity. 10 is this project's choice, not a paper's: on split-digits it leaves every
        task learnt and the penultimate features move about a third as far as naive's.
    layers: names from ``model.named_modules()`` whose outputs are matched (e.g. ``2,4``, the
        ReLUs of ``mlp:400,400``); empty (the default) matches the feature extractor's output,
        the head's input, as less-forgetting learning does with its penultimate layer.
    """

    def __init__(self, *, alpha: float = 10.0, layers: tuple[str, ...] = ()) -> None:
        super().__init__(alpha)
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {', '.join(layers)}")
        self.layers = layers

    def points(self, model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
        if not self.layers:
            return {HEAD_INPUT: (split_head(model)[1], True)}
        modules = dict(model.named_modules())
        unknown = [n for n in self.layers if not n or n not in modules]
        if unknown:
            available = ", ".join(n for n in modules if n)
            raise CfbenchError(f"unknown layer(s) {', '.join(unknown)} in hyperparameter "
                               f"'layers' of feature-distill; available: {available}")
        return {n: (modules[n], False) for n in self.layers}

    def setup(self, ctx: TrainContext) -> None:
        self.points(ctx.model)  # bad layer names fail before anything trains

    def distance(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
        return torch.stack([F.mse_loss(student[n], teacher[n]) for n in student]).sum()
