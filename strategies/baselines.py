"""The two reference points every leaderboard needs: the lower and the upper bound."""

from __future__ import annotations

from typing import Literal

from cfbench.registry import register_strategy
from cfbench.scenario import Task
from cfbench.strategy import Strategy, TrainContext, TrainData


@register_strategy("naive", family="baseline", reference="fine-tuning (lower bound)")
class Naive(Strategy):
    """Plain fine-tuning on each task in turn: no protection against forgetting."""


@register_strategy("joint", family="baseline",
                   reference="joint training (upper bound): cumulative, or offline (van de Ven "
                             "et al.; Hsu et al. 2018's Offline)")
class Joint(Strategy):
    """Trains on the union of all tasks: the upper bound.

    `form="cumulative"`: each task trains on the union of all tasks seen so far, so every row
    of R is a model fitted to the tasks so far. `form="offline"`: nothing is trained until the
    last task, which trains once on the union of all tasks, as van de Ven et al.'s ``--joint``
    and Hsu et al. 2018's ``--offline_training`` do (an epoch is a pass over the union; with
    ``iterations`` the union gets one task's steps, as in van de Ven et al.'s code). Offline,
    the rows of R before the last are the untrained model's scores (under each row's masks in
    the class setting), so only the last row (ACC) compares with other strategies; BWT, FM
    and LA are not meaningful.

    Keeps references to earlier tasks' training tensors: its state is all the data seen. A
    transfer source counts as seen (its training data joins the union).
    """

    LATER_HPARAMS = ("form",)

    def __init__(self, *, form: Literal["cumulative", "offline"] = "cumulative") -> None:
        if form not in ("cumulative", "offline"):
            raise ValueError(f"form must be cumulative or offline, got {form!r}")
        self.form = form
        self.seen: list[TrainData] = []

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        self.seen.append(ctx.task_data(ctx.task_index))

    def train_data(self, ctx: TrainContext, task: Task, data: TrainData) -> TrainData:
        if self.form == "offline" and ctx.task_index < len(ctx.scenario.tasks) - 1:
            return TrainData(data.x[:0], data.y[:0], data.task[:0])  # no samples: no steps
        return TrainData.cat([*self.seen, data])

    def state_bytes(self) -> int:
        return sum(t.element_size() * t.numel() for d in self.seen for t in (d.x, d.y, d.task))
