"""Split Digits: scikit-learn's bundled 8x8 digits, the scenario that needs no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cfbench.registry import register_scenario
from cfbench.scenario import Protocol, Scenario, Task

DIGITS_PROTOCOL = Protocol(model="mlp:100,100", epochs=5, batch_size=32, optimizer="adam",
                           lr=1e-3)


@register_scenario("split-digits", family="digits", reference="scikit-learn load_digits")
def split_digits(*, data_root: Path, seed: int, test_fraction: float = 0.3) -> Scenario:
    """1,797 8x8 digits as 5 tasks of 2 classes; a stratified test split drawn from the seed."""
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    # Pixel values are 0..16; scale to the uint8 range every scenario stores.
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    tasks = []
    for classes in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]:
        train_idx, test_idx = [], []
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            n_test = round(len(idx) * test_fraction)
            test_idx.append(idx[:n_test])
            train_idx.append(idx[n_test:])
        train, test = np.concatenate(train_idx), np.concatenate(test_idx)
        tasks.append(Task(
            name="/".join(map(str, classes)), classes=classes,
            x_train=torch.from_numpy(images[train]), y_train=torch.from_numpy(labels[train]),
            x_test=torch.from_numpy(images[test]), y_test=torch.from_numpy(labels[test]),
        ))
    return Scenario("split-digits", tasks, DIGITS_PROTOCOL, mean=0.0, std=1.0)
