"""iCaRL: exemplars chosen by herding, a distilling sigmoid loss, nearest-mean classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cfbench.errors import CfbenchError
from cfbench.models import split_head
from cfbench.registry import register_strategy
from cfbench.scenario import Task
from cfbench.strategy import Batch, Strategy, TrainContext, TrainData
from cfbench.taps import frozen_copy, module_bytes


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of `m` distinct rows of `features` (n, d), in the order herding picks them: the
    k-th pick brings the mean of the first k as close as possible to the mean of all rows.

    Any prefix of the result is itself a herding selection, which is why iCaRL can shrink an
    exemplar set by truncation. One vectorised step per pick.
    """
    target = features.mean(0)
    by_column = features.t().contiguous()  # (d, n): `vector @ by_column` is the fast product
    chosen_sum = torch.zeros_like(target)
    sq_norms = features.pow(2).sum(1)
    taken = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    order = torch.empty(m, dtype=torch.long, device=features.device)
    for k in range(1, m + 1):
        # ||target - (chosen_sum + f) / k||^2 * k^2 = ||gap - f||^2, gap = k * target - sum.
        gap = k * target - chosen_sum
        cost = (sq_norms - 2 * (gap @ by_column)).masked_fill(taken, float("inf"))
        pick = cost.argmin().view(1)  # a 1-element index: no host sync, unlike a 0-d one
        order[k - 1:k] = pick
        taken[pick] = True
        chosen_sum += features[pick].squeeze(0)
    return order


def _take(data: TrainData, index: torch.Tensor) -> TrainData:
    """The samples at `index` (indices or a boolean mask), copied out of `data`."""
    return TrainData(data.x[index], data.y[index], data.task[index])


@register_strategy("icarl", family="replay",
                   reference="Rebuffi et al. 2017 (iCaRL: incremental classifier and "
                             "representation learning)", settings=("class",))
class ICaRL(Strategy):
    """iCaRL: a fixed budget of exemplars, a loss that distils the old classes, and
    classification by the nearest mean of exemplars.

    - Memory: `memory` exemplars in all, m = memory // (classes seen) per class. After each
      task the old classes' sets are cut to their first m and each new class gets m exemplars
      chosen by herding on L2-normalised features.
    - Training: on the task's data plus every exemplar, with a sigmoid binary cross-entropy on
      each output unit seen so far (summed over units, averaged over the batch); targets are
      one-hot for the new task's units and the previous model's sigmoid outputs for the units
      of earlier tasks.
    - Prediction: the class whose normalised mean of normalised exemplar features is nearest
      to the sample's normalised features (means recomputed after each task; before any
      training, the logits).

    memory: K, the total number of stored training images. 2000 as in Rebuffi et al.'s
        CIFAR-100 runs and van de Ven & Tolias 2019's Split MNIST iCaRL (their code's default
        budget): 200 per class at the end of Split MNIST, 3% of its training set. More
        exemplars buy accuracy on old classes with memory and steps (an epoch also passes
        over the exemplars).
    """

    def __init__(self, *, memory: int = 2000) -> None:
        if memory < 1:
            raise ValueError(f"memory must be a positive number of exemplars, got {memory}")
        self.memory = memory
        self.exemplars: TrainData | None = None
        self.rank: torch.Tensor | None = None
        """Each exemplar's position in its class's herding order (truncation keeps rank < m)."""
        self.means: torch.Tensor | None = None
        """(outputs, features): normalised class means; rows of classes without exemplars 0."""
        self.known: torch.Tensor | None = None
        self.teacher: nn.Module | None = None
        self._features: nn.Module | None = None
        self._seen: torch.Tensor | None = None
        self._old: torch.Tensor | None = None

    def setup(self, ctx: TrainContext) -> None:
        if self.memory < ctx.scenario.n_classes:
            raise CfbenchError(f"icarl: memory={self.memory} cannot hold one exemplar for each of "
                               f"the {ctx.scenario.n_classes} classes; use a larger memory")
        self._features = split_head(ctx.model)[0]

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        t = ctx.task_index
        self._seen = ctx.setting.seen_masks[t].nonzero().squeeze(1)
        if t > 0:
            self.teacher = frozen_copy(ctx.model)
            self._old = ctx.setting.seen_masks[t - 1][self._seen]

    def train_data(self, ctx: TrainContext, task: Task, data: TrainData) -> TrainData:
        return data if self.exemplars is None else TrainData.cat([data, self.exemplars])

    def loss(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        assert self._seen is not None, "before_task sets the units"
        targets = F.one_hot(batch.y, ctx.setting.n_outputs)[:, self._seen].float()
        if self.teacher is not None:
            with torch.no_grad():
                previous = torch.sigmoid(ctx.forward(batch, self.teacher)[:, self._seen])
            targets = torch.where(self._old, previous, targets)
        return F.binary_cross_entropy_with_logits(logits[:, self._seen], targets,
                                                  reduction="none").sum(1).mean()

    @torch.no_grad()
    def embed(self, ctx: TrainContext, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised features of uint8 inputs, in evaluation-sized chunks, eval mode."""
        assert self._features is not None, "setup finds the feature extractor"
        was_training = ctx.model.training
        ctx.model.eval()
        size = ctx.scenario.protocol.eval_batch_size
        out = torch.cat([self._features(ctx.scenario.prepare(x[i:i + size]))
                         for i in range(0, len(x), size)])
        ctx.model.train(was_training)
        return F.normalize(out.flatten(1), dim=1)

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        setting = ctx.setting
        per_class = self.memory // int(setting.seen_masks[ctx.task_index].sum())
        kept: list[TrainData] = []
        ranks: list[torch.Tensor] = []
        if self.exemplars is not None and self.rank is not None:
            keep = self.rank < per_class
            kept.append(_take(self.exemplars, keep))
            ranks.append(self.rank[keep])
        data = ctx.task_data(ctx.task_index)
        features = self.embed(ctx, data.x)
        for label in task.classes:
            members = (data.y == label).nonzero().squeeze(1)
            chosen = members[herding(features[members], min(per_class, len(members)))]
            kept.append(_take(data, chosen))
            ranks.append(torch.arange(len(chosen), device=chosen.device))
        self.exemplars, self.rank = TrainData.cat(kept), torch.cat(ranks)
        self._class_means(ctx)

    def _class_means(self, ctx: TrainContext) -> None:
        """Normalised mean of each class's normalised exemplar features, with the model now."""
        assert self.exemplars is not None
        features = self.embed(ctx, self.exemplars.x)
        units = ctx.setting.targets(self.exemplars.y)
        n = ctx.setting.n_outputs
        sums = features.new_zeros(n, features.shape[1]).index_add_(0, units, features)
        counts = torch.bincount(units, minlength=n)
        self.means = F.normalize(sums, dim=1)
        self.known = counts > 0

    def predict(self, ctx: TrainContext, batch: Batch) -> torch.Tensor:
        if self.means is None or self.known is None or self._features is None:
            return ctx.logits(batch)
        features = F.normalize(self._features(batch.x).flatten(1), dim=1)
        return (-torch.cdist(features, self.means)).masked_fill(~self.known, float("-inf"))

    def state_bytes(self) -> int:
        tensors = [] if self.exemplars is None else [
            self.exemplars.x, self.exemplars.y, self.exemplars.task, self.rank, self.means]
        return module_bytes(self.teacher) + sum(t.element_size() * t.numel()
                                                for t in tensors if t is not None)
