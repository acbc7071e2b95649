"""Validation splits carved from training data, for choosing hyperparameters without the test set.

`validation_split` is a scenario transform: the returned scenario's tasks train on part of their
training data and are evaluated on the held-out rest, so the training loop and the evaluator run
unchanged and the test split is never read.
"""

from __future__ import annotations

import dataclasses

import torch

from cfbench.errors import CfbenchError
from cfbench.scenario import Classification, Scenario


def validation_split(scenario: Scenario, fraction: float, seed: int, tasks: int | None = None
                     ) -> Scenario:
    """`scenario` with each task's test split replaced by a held-out part of its train split.

    Classification (the scenario's objective is `Classification`) is stratified: `fraction` of
    each class's training samples is held out. Any other objective's samples are token windows
    whose labels are per token, so there are no classes to stratify: `fraction` of the task's
    training windows is held out, whole windows. Either way the count is rounded, at least one,
    never all, and drawn by a generator seeded with `seed`, so the split depends on nothing
    else; samples keep their original order within each part. A task's own validation split
    (``x_val``, a transfer source's) is not training data and stays as it is. `tasks` keeps
    only the first k tasks (Chaudhry et al. 2019 tune on the first tasks of the stream); None
    keeps them all.
    """
    if not 0 < fraction < 1:
        raise CfbenchError(f"validation fraction must be in (0, 1), got {fraction}")
    count = len(scenario.tasks)
    if tasks is not None and not 1 <= tasks <= count:
        raise CfbenchError(f"cannot tune on the first {tasks} tasks: scenario '{scenario.name}' "
                           f"has {count}")
    generator = torch.Generator().manual_seed(seed)
    stratified = isinstance(scenario.objective, Classification)
    carved = []
    for task in scenario.tasks[:tasks]:
        if stratified:
            labels = task.y_train.cpu()
            cuts = [_cut(torch.nonzero(labels == label).flatten(), fraction, generator,
                         f"task '{task.name}': class {label} has")
                    for label in torch.unique(labels).tolist()]
        else:
            cuts = [_cut(torch.arange(len(task.x_train)), fraction, generator,
                         f"task '{task.name}' has")]
        device = task.x_train.device
        val = torch.cat([held for held, _ in cuts]).sort().values.to(device)
        train = torch.cat([kept for _, kept in cuts]).sort().values.to(device)
        carved.append(dataclasses.replace(
            task, x_train=task.x_train[train], y_train=task.y_train[train],
            x_test=task.x_train[val], y_test=task.y_train[val]))
    return dataclasses.replace(scenario, tasks=carved)


def _cut(idx: torch.Tensor, fraction: float, generator: torch.Generator, owner: str
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`idx` shuffled by `generator` and cut into (held out, kept): `fraction` of it, rounded,
    at least one and never all; `owner` starts the error that says it is too small."""
    idx = idx[torch.randperm(len(idx), generator=generator)]
    n_val = max(1, round(len(idx) * fraction))
    if n_val >= len(idx):
        raise CfbenchError(f"{owner} {len(idx)} training sample(s), too few to hold out a "
                           f"validation fraction of {fraction}")
    return idx[:n_val], idx[n_val:]
