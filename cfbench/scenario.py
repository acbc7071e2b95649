"""Tasks, scenarios, training protocols and the three incremental settings.

A Scenario is an ordered list of Tasks plus the Protocol every strategy trains under. Labels are
stored once, in the *global* label space (split-mnist: the digit; permuted-mnist task t: 10*t +
digit); the setting decides what the network is asked to output:

- task:   one unit per global label; each sample's logits are masked to its own task's labels
          (the usual "multi-head" evaluation, with the task label known at test).
- domain: one shared unit per within-task label (the position of the label in ``task.classes``).
- class:  one unit per global label, no task label; logits are masked to the labels of the tasks
          seen so far (``Protocol.class_scope="seen"``, the default) or not at all ("all").

A scenario's `objective` says what its samples are to the engine: how a stored batch becomes
model input, which loss trains the model and which score fills R (`Objective`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cfbench.errors import CfbenchError
from cfbench.protocol import Protocol
from cfbench.registry import SETTINGS

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""A seeded transform of a whole training batch of float pixels in [0, 1] (N x C x H x W)."""


@dataclass
class Task:
    """One task: uint8 inputs and int64 global labels, resident on the scenario's device.

    A validation split (`x_val`, `y_val`) is optional: a transfer source keeps one that its
    pretraining never sees, for strategies that watch the source during fine-tuning.
    """

    name: str
    classes: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    data: dict[str, Any] = field(default_factory=dict)
    """Where the samples came from (e.g. a text corpus, its SHA-256 and the split), copied
    into every run record so a run names the exact data it saw."""

    def to(self, device: torch.device | str) -> Task:
        fields = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in fields
                                            if getattr(self, f) is not None})


def class_groups(n_classes: int, tasks: int, seed: int, shuffle: bool
                 ) -> list[tuple[int, ...]]:
    """`tasks` disjoint groups of consecutive classes (0/1, 2/3, ...) or, shuffled by the
    scenario seed, of a random class order; each group sorted."""
    if tasks < 1 or n_classes % tasks:
        raise ValueError(f"tasks must divide the {n_classes} classes, got {tasks}")
    order = (torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()
             if shuffle else list(range(n_classes)))
    size = n_classes // tasks
    return [tuple(sorted(order[i:i + size])) for i in range(0, n_classes, size)]


def split_by_class(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                   y_test: torch.Tensor, groups: list[tuple[int, ...]]) -> list[Task]:
    """One task per group of (global) labels, keeping the dataset's own train/test split and
    its sample order; a task is named after its labels ("0/1")."""
    tasks = []
    for classes in groups:
        wanted = torch.tensor(classes, dtype=y_train.dtype)
        train, test = torch.isin(y_train, wanted), torch.isin(y_test, wanted)
        tasks.append(Task(name="/".join(map(str, classes)), classes=tuple(classes),
                          x_train=x_train[train], y_train=y_train[train],
                          x_test=x_test[test], y_test=y_test[test]))
    return tasks


def train_subset(scenario: Scenario, n: int, seed: int) -> Scenario:
    """`scenario` with each task training on at most `n` of its training samples, drawn
    uniformly without replacement by a generator seeded with `seed` (in their original order),
    as GEM's code takes ``--samples_per_task`` per task; test and validation splits unchanged."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for task in scenario.tasks:
        keep = torch.randperm(len(task.y_train), generator=generator)[:n].sort().values
        keep = keep.to(task.y_train.device)
        tasks.append(dataclasses.replace(task, x_train=task.x_train[keep],
                                         y_train=task.y_train[keep]))
    return dataclasses.replace(scenario, tasks=tasks)


class Objective:
    """What a scenario's samples are to the engine; the loop, the evaluator and every strategy
    reach them only through it, so a task need not be an image.

    Methods that take outputs accept a leading member dimension (K models trained as one
    stacked job, ``cfbench.batched``): outputs (K, B, ...) with targets (K, B, ...) or (B, ...).
    """

    matrices: tuple[str, ...] = ()
    """Measurements a record keeps beside R, one matrix each (``RunRecord.matrices``)."""

    def prepare(self, scenario: Scenario, x: torch.Tensor, augment: torch.Generator | None
                ) -> torch.Tensor:
        """Stored inputs of a minibatch -> model inputs; `augment` (training batches only)
        draws the scenario's augmentation."""
        raise NotImplementedError

    def stored(self, scenario: Scenario, inputs: torch.Tensor) -> torch.Tensor:
        """The exact inverse of `prepare` without augmentation (model inputs -> stored inputs),
        so a minibatch can be kept as compactly as the task data (replay memories)."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss, a mean over the batch (one per member)."""
        raise NotImplementedError

    def measure(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sums (..., S) over one evaluation batch (targets (B, ...), shared by the members),
        added up over a task's batches on the device; `summarise` turns a task's sums into its
        entries of R and of the matrices."""
        raise NotImplementedError

    def summarise(self, sums: list[float]) -> tuple[float, dict[str, float]]:
        """A task's score (its entry of R: in [0, 1], higher is better) and its entry of each
        matrix in `matrices`."""
        raise NotImplementedError


class Classification(Objective):
    """Images with class labels: uint8 pixels normalised per batch (augmented for training),
    cross-entropy on the (masked) logits, and top-1 accuracy in R."""

    def prepare(self, scenario: Scenario, x: torch.Tensor, augment: torch.Generator | None
                ) -> torch.Tensor:
        # One fresh float copy, then in place: the same rounding as out-of-place operations,
        # without allocating (and page-faulting) temporaries for an evaluation batch.
        pixels = x.to(torch.float32, copy=True).mul_(1.0 / 255.0)
        if augment is not None and scenario.augmentation is not None:
            pixels = scenario.augmentation(pixels, augment)
        return scenario.normalise(pixels, in_place=True)

    def stored(self, scenario: Scenario, inputs: torch.Tensor) -> torch.Tensor:
        raw = scenario.pixels(inputs) * 255.0
        return raw.round_().clamp_(0, 255).to(torch.uint8)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 1:
            return F.cross_entropy(outputs, targets)
        losses = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none")
        return losses.view(targets.shape).mean(-1)

    def measure(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hits = (scores.argmax(-1) == targets).sum(-1)
        return torch.stack([hits, torch.full_like(hits, targets.shape[-1])], -1)

    def summarise(self, sums: list[float]) -> tuple[float, dict[str, float]]:
        hits, count = sums
        return hits / count, {}


class NextToken(Objective):
    """Next-token prediction, trained by cross-entropy per token; R holds next-token accuracy
    and ``loss`` the held-out cross-entropy in nats per token.

    A sample is a sequence of token ids (L,) with a target per position (``windowed=False``), or
    a window of the previous tokens with one target, the next token (``windowed=True``: a model
    that reads a fixed context, such as textgenrnn). Token ids may be stored in any integer type
    (int16 keeps windows small) and reach the model as int64.
    """

    matrices = ("loss",)

    def __init__(self, windowed: bool = False) -> None:
        self.windowed = windowed

    def _token_dims(self) -> int:
        """How many trailing dimensions a batch's targets span: (B,) windowed, else (B, L)."""
        return 1 if self.windowed else 2

    def prepare(self, scenario: Scenario, x: torch.Tensor, augment: torch.Generator | None
                ) -> torch.Tensor:
        return x.long()

    def stored(self, scenario: Scenario, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.to(scenario.tasks[0].x_train.dtype)

    def _token_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every token (..., B[, L]); targets broadcast against outputs."""
        targets = targets.expand(outputs.shape[:-1])
        losses = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none")
        return losses.view(targets.shape)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._token_losses(outputs, targets).flatten(-self._token_dims()).mean(-1)

    def measure(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dims = self._token_dims()
        hits = (scores.argmax(-1) == targets).flatten(-dims).sum(-1).double()
        nats = self._token_losses(scores, targets).flatten(-dims).sum(-1).double()
        return torch.stack([hits, torch.full_like(hits, targets.numel()), nats], -1)

    def summarise(self, sums: list[float]) -> tuple[float, dict[str, float]]:
        hits, count, nats = sums
        return hits / count, {"loss": nats / count}


@dataclass(frozen=True)
class Source:
    """How task 0 of a transfer scenario is learned before the sequence, the same way for every
    strategy: loaded from pretrained weights (`load`), or else trained by plain fine-tuning for
    `epochs` under the run's protocol (model, optimiser, batch size)."""

    epochs: float = 1.0
    load: Callable[[nn.Module], None] | None = None
    """Puts pretrained weights into a freshly built model (its head keeps the source's units)."""


@dataclass
class Scenario:
    """An ordered list of tasks, their input normalisation, and the protocol they train under.

    `mean` and `std` are one value, or one per channel. `augmentation` transforms training
    batches only (never evaluation). A scenario with a `source` is a transfer scenario: task 0
    is the source, learned before the sequence (see `Source`), and the strategy trains tasks
    1..T-1 after it. `objective` says what the samples are (image classification by default).
    """

    name: str
    tasks: list[Task]
    protocol: Protocol
    settings: tuple[str, ...] = SETTINGS
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0
    augmentation: Augmentation | None = None
    source: Source | None = None
    objective: Objective = field(default_factory=Classification)
    n_classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_classes = 1 + max(c for t in self.tasks for c in t.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.tasks[0].x_train.shape[1:])

    def _stats(self, like: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """mean and 1/std, as floats or as (C, 1, 1) tensors on `like`'s device; 0 and 1 when
        the protocol leaves pixels unnormalised (`Protocol.normalize`)."""
        if not self.protocol.normalize:
            return 0.0, 1.0
        if isinstance(self.mean, float | int) and isinstance(self.std, float | int):
            return self.mean, 1.0 / self.std
        shape = (-1,) + (1,) * (like.dim() - 2)
        mean = torch.as_tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.as_tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, 1.0 / std

    def prepare(self, x: torch.Tensor, augment: torch.Generator | None = None) -> torch.Tensor:
        """Stored inputs of a minibatch -> model inputs (done per batch, never stored), by the
        scenario's objective; with a generator, training augmentation is applied."""
        return self.objective.prepare(self, x, augment)

    def stored(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model inputs -> stored inputs: the inverse of `prepare` without augmentation."""
        return self.objective.stored(self, inputs)

    def normalise(self, pixels: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        """Float pixels in [0, 1] -> model inputs (the scenario's normalisation, unless the
        protocol turns it off); `in_place` overwrites `pixels`."""
        mean, inv_std = self._stats(pixels)
        return (pixels if in_place else pixels.clone()).sub_(mean).mul_(inv_std)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of the normalisation: image model inputs -> pixels in [0, 1]."""
        mean, inv_std = self._stats(x)
        return x / inv_std + mean

    def to(self, device: torch.device | str) -> Scenario:
        return dataclasses.replace(self, tasks=[t.to(device) for t in self.tasks])


class Setting:
    """What the network outputs for each sample in one setting of a scenario."""

    def __init__(self, scenario: Scenario, name: str) -> None:
        if name not in scenario.settings:
            raise CfbenchError(f"scenario '{scenario.name}' has no setting '{name}'; choose one of "
                               f"{', '.join(scenario.settings)}")
        self.name = name
        self.scenario = scenario
        device = scenario.tasks[0].x_train.device
        n_tasks = len(scenario.tasks)
        if name == "domain":
            self.n_outputs = max(len(t.classes) for t in scenario.tasks)
            lookup = torch.full((scenario.n_classes,), -1, dtype=torch.long)
            for task in scenario.tasks:
                for position, label in enumerate(task.classes):
                    if int(lookup[label]) not in (-1, position):
                        raise CfbenchError(f"label {label} has two positions in domain setting")
                    lookup[label] = position
            self._target_lookup: torch.Tensor | None = lookup.to(device)
        else:
            self.n_outputs = scenario.n_classes
            self._target_lookup = None
        # task_masks[t, u]: unit u belongs to task t; seen_masks[t, u]: to a task <= t.
        self.task_masks = torch.zeros(n_tasks, scenario.n_classes, dtype=torch.bool)
        for t, task in enumerate(scenario.tasks):
            self.task_masks[t, list(task.classes)] = True
        self.seen_masks = self.task_masks.cumsum(0).bool()
        self.task_masks = self.task_masks.to(device)
        self.seen_masks = self.seen_masks.to(device)

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """Global labels -> output-unit indices."""
        return y if self._target_lookup is None else self._target_lookup[y]

    def mask(self, task_ids: torch.Tensor, current_task: int) -> torch.Tensor | None:
        """Boolean (batch, units) mask of the logits each sample may predict, or None for all.

        `current_task` is the last task trained on: in the class setting the model may choose
        among every label seen up to it (row 0 of R, before training, uses task 0's labels).
        """
        if self.name == "task":
            return self.task_masks[task_ids]
        if self.name == "class" and self.scenario.protocol.class_scope == "seen":
            return self.seen_masks[max(current_task, 0)].expand(len(task_ids), -1)
        return None


def apply_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits with the units a sample may not predict set to -inf (exactly excluded)."""
    return logits if mask is None else logits.masked_fill(~mask, float("-inf"))


def token_rows(outputs: torch.Tensor, *per_sample: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
    """A batch's outputs (B, ..., U) as one row per prediction (N, U), and each per-sample
    tensor (B, ...) repeated for every prediction of its sample (N, ...).

    A sequence model's outputs (B, L, V) make L predictions per sample; what is defined per
    prediction (a log-likelihood, a distillation KL, an output norm) treats the positions as
    more samples. Outputs with one prediction per sample (B, U) come back unchanged."""
    rows = outputs.reshape(-1, outputs.shape[-1])
    per = rows.shape[0] // max(1, outputs.shape[0])
    return (rows, *(t.repeat_interleave(per, 0) if per > 1 else t for t in per_sample))
