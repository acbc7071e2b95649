"""The two reference points every leaderboard needs: the lower and the upper bound."""

from __future__ import annotations

from cfbench.registry import register_strategy
from cfbench.scenario import Task
from cfbench.strategy import Strategy, TrainContext, TrainData


@register_strategy("naive", family="baseline", reference="fine-tuning (lower bound)")
class Naive(Strategy):
    """Plain fine-tuning on each task in turn: no protection against forgetting."""


@register_strategy("joint", family="baseline",
                   reference="cumulative joint training (upper bound)")
class Joint(Strategy):
    """Trains on the union of all tasks seen so far (cumulative training, the upper bound).

    Keeps references to earlier tasks' training tensors: its state is all the data seen. A
    transfer source counts as seen (its training data joins every later task's).
    """

    def __init__(self) -> None:
        self.seen: list[TrainData] = []

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        self.seen.append(ctx.task_data(ctx.task_index))

    def train_data(self, ctx: TrainContext, task: Task, data: TrainData) -> TrainData:
        return TrainData.cat([*self.seen, data])

    def state_bytes(self) -> int:
        return sum(t.element_size() * t.numel() for d in self.seen for t in (d.x, d.y, d.task))
