"""Validation splits carved from training data, for choosing hyperparameters without the test set.

`validation_split` is a scenario transform: the returned scenario's tasks train on part of their
training data and are evaluated on the held-out rest, so the training loop and the evaluator run
unchanged and the test split is never read.
"""

from __future__ import annotations

import dataclasses

import torch

from cfbench.errors import CfbenchError
from cfbench.scenario import Scenario


def validation_split(scenario: Scenario, fraction: float, seed: int, tasks: int | None = None
                     ) -> Scenario:
    """`scenario` with each task's test split replaced by a held-out part of its train split.

    Stratified: `fraction` of each class's training samples (rounded, at least one, never all)
    is held out, drawn by a generator seeded with `seed`, so the split depends on nothing else.
    `tasks` keeps only the first k tasks (Chaudhry et al. 2019 tune on the first tasks of the
    stream); None keeps them all. Samples keep their original order within each part.
    """
    if not 0 < fraction < 1:
        raise CfbenchError(f"validation fraction must be in (0, 1), got {fraction}")
    count = len(scenario.tasks)
    if tasks is not None and not 1 <= tasks <= count:
        raise CfbenchError(f"cannot tune on the first {tasks} tasks: scenario '{scenario.name}' "
                           f"has {count}")
    generator = torch.Generator().manual_seed(seed)
    carved = []
    for task in scenario.tasks[:tasks]:
        labels = task.y_train.cpu()
        held, kept = [], []
        for label in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == label).flatten()
            idx = idx[torch.randperm(len(idx), generator=generator)]
            n_val = max(1, round(len(idx) * fraction))
            if n_val >= len(idx):
                raise CfbenchError(f"task '{task.name}': class {label} has {len(idx)} training "
                                   f"sample(s), too few to hold out a validation fraction of "
                                   f"{fraction}")
            held.append(idx[:n_val])
            kept.append(idx[n_val:])
        device = task.x_train.device
        val = torch.cat(held).sort().values.to(device)
        train = torch.cat(kept).sort().values.to(device)
        carved.append(dataclasses.replace(
            task, x_train=task.x_train[train], y_train=task.y_train[train],
            x_test=task.x_train[val], y_test=task.y_train[val]))
    return dataclasses.replace(scenario, tasks=carved)
