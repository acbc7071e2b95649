"""Distillation: a frozen copy of the model taken before each task (the teacher) anchors what the
model outputs (LwF) or computes inside (feature distillation) on the current task's own data.

No old data is kept; the state is the teacher, one copy of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cfbench.errors import CfbenchError
from cfbench.models import split_head
from cfbench.registry import register_strategy
from cfbench.scenario import Setting, Task, token_rows
from cfbench.strategy import Batch, Stacked, Strategy, TrainContext
from cfbench.taps import Tap, frozen_copy, module_bytes

HEAD_INPUT = "<head input>"
"""The point feature distillation matches by default: the feature extractor's output."""


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
    return temperature ** 2 * _batch_kl(student, teacher, groups, temperature)


def _batch_kl(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor,
              temperature: float | torch.Tensor) -> torch.Tensor:
    """`grouped_kl` without the T^2 factor; leading dimensions before (batch, units) are
    stacked members, whose temperatures broadcast as (K, 1, 1)."""
    hidden = ~groups  # (groups, units), broadcast against (..., batch, 1, units)

    def log_probs(logits: torch.Tensor) -> torch.Tensor:
        scaled = (logits / temperature).unsqueeze(-2).masked_fill(hidden, float("-inf"))
        return scaled.log_softmax(-1).masked_fill(hidden, 0.0)  # no -inf left to make NaNs

    target = log_probs(teacher)
    kl = (target.exp().masked_fill(hidden, 0.0) * (target - log_probs(student))).sum((-2, -1))
    return kl.mean(-1)


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
        student = student_tap.read(batch)
        with torch.no_grad():
            teacher = teacher_tap.run(batch)
        return self.alpha * self.distance(student, teacher)

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        if self._taps is not None:  # evaluation and later copies see an untapped model
            for tap in self._taps:
                tap.remove()
            self._taps = None

    def state_bytes(self) -> int:
        return module_bytes(self.teacher)


class _StackedLwF(Stacked):
    """LwF's penalty for K stacked members: each member's teacher (taken by its own strategy
    object in ``before_task``) stacked and run on that member's batch, with its own alpha and
    temperature, multiplied in the single run's order."""

    members: list[LwF]
    per_member = ("alpha", "temperature")

    def start_task(self) -> None:
        members, job = self.members, self.job
        self.teacher: dict[str, torch.Tensor] | None = None
        if any(m.teacher is None for m in members):  # no teacher before the second task
            return
        self.teacher = {n: torch.stack([m.teacher.get_parameter(n) for m in members])
                        for n in job.params}
        self.groups = old_unit_groups(job.ctxs[0].setting, job.ctxs[0].task_index)
        temperatures = [m.temperature for m in members]
        # One temperature for all divides by a Python number, as a single run does.
        self.temperature = (temperatures[0] if len(set(temperatures)) == 1 else
                            torch.tensor(temperatures, device=job.device).view(-1, 1, 1))
        self.alpha, self.squared = (torch.tensor(v, device=job.device) for v in (
            [m.alpha for m in members], [t ** 2 for t in temperatures]))

    def penalty(self, x: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            target = self.job.forward(self.teacher, x)
        return self.alpha * (self.squared * _batch_kl(outputs, target, self.groups,
                                                      self.temperature))


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

    stacked = _StackedLwF

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
        # A sequence's positions are predictions of their own: one KL each, averaged.
        return grouped_kl(token_rows(student["logits"])[0], token_rows(teacher["logits"])[0],
                          self._groups, self.temperature)


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
