"""Scenarios on MNIST and Fashion-MNIST (28x28 grey images, 10 classes, IDX files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cfbench.data import IdxDataset, load_idx_dataset
from cfbench.registry import register_scenario
from cfbench.scenario import Protocol, Scenario, Task

# Hsu et al. 2018 ("Re-evaluating continual learning scenarios"): MLP 400-400, Adam 1e-3,
# batch 128, 4 epochs per task.
SPLIT_PROTOCOL = Protocol(model="mlp:400,400", epochs=4, batch_size=128, optimizer="adam",
                          lr=1e-3)
PERMUTED_PROTOCOL = Protocol(model="mlp:400,400", epochs=1, batch_size=128, optimizer="adam",
                             lr=1e-3)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def _images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)  # N x 1 x 28 x 28 uint8


def padded(data: IdxDataset, pad: int, mean: float, std: float
           ) -> tuple[IdxDataset, float, float]:
    """Images framed by `pad` zero pixels, and the normalisation statistics of the padded
    images, derived exactly from those of the originals: zeros scale the mean and the second
    moment by the fraction of original pixels (MNIST padded to 32x32: mean 0.1000, std 0.2752,
    the values Hsu et al. 2018 normalise with)."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0:
        return data, mean, std
    width = ((0, 0), (pad, pad), (pad, pad))
    side = data.x_train.shape[1]
    kept = side * side / (side + 2 * pad) ** 2
    new_mean = mean * kept
    new_std = ((std ** 2 + mean ** 2) * kept - new_mean ** 2) ** 0.5
    return (IdxDataset(np.pad(data.x_train, width), data.y_train, np.pad(data.x_test, width),
                       data.y_test), new_mean, new_std)


def split_tasks(data: IdxDataset, groups: list[tuple[int, ...]]) -> list[Task]:
    """One task per group of classes, keeping the dataset's own train/test split."""
    tasks = []
    for classes in groups:
        train = np.isin(data.y_train, classes)
        test = np.isin(data.y_test, classes)
        tasks.append(Task(
            name="/".join(map(str, classes)), classes=tuple(classes),
            x_train=_images(data.x_train[train]), y_train=torch.from_numpy(data.y_train[train]),
            x_test=_images(data.x_test[test]), y_test=torch.from_numpy(data.y_test[test]),
        ))
    return tasks


def class_pairs(seed: int, shuffle: bool) -> list[tuple[int, ...]]:
    """(0,1), (2,3), ... or, shuffled by the scenario seed, five random disjoint pairs."""
    order = torch.randperm(10, generator=torch.Generator().manual_seed(seed)).tolist() \
        if shuffle else list(range(10))
    return [tuple(sorted(order[i:i + 2])) for i in range(0, 10, 2)]


@register_scenario("split-mnist", family="mnist", reference="Zenke et al. 2017; Hsu et al. 2018")
def split_mnist(*, data_root: Path, seed: int, shuffle_classes: bool = False, pad: int = 0
                ) -> Scenario:
    """MNIST as 5 tasks of 2 digits (0/1, 2/3, ..., or pairs shuffled by the scenario seed).

    `pad=2` frames the images to 32x32 as Hsu et al. 2018 do (the MLP then sees 1024 inputs).
    """
    data, mean, std = padded(load_idx_dataset("mnist", data_root), pad, MNIST_MEAN, MNIST_STD)
    return Scenario("split-mnist", split_tasks(data, class_pairs(seed, shuffle_classes)),
                    SPLIT_PROTOCOL, mean=mean, std=std)


@register_scenario("split-fashion-mnist", family="mnist", reference="Xiao et al. 2017 (data)")
def split_fashion_mnist(*, data_root: Path, seed: int, shuffle_classes: bool = False
                        ) -> Scenario:
    """Fashion-MNIST as 5 tasks of 2 classes (0/1, 2/3, ...), Split-MNIST's protocol."""
    data = load_idx_dataset("fashion-mnist", data_root)
    return Scenario("split-fashion-mnist",
                    split_tasks(data, class_pairs(seed, shuffle_classes)), SPLIT_PROTOCOL,
                    mean=FASHION_MEAN, std=FASHION_STD)


@register_scenario("permuted-mnist", family="mnist",
                   reference="Goodfellow et al. 2013; Kirkpatrick et al. 2017")
def permuted_mnist(*, data_root: Path, seed: int, tasks: int = 10) -> Scenario:
    """MNIST with one fixed random pixel permutation per task (drawn from the scenario seed).

    Task t's labels are 10*t + digit, so the task setting has a head per task and the domain
    setting one shared 10-way head. Permuted images are precomputed once per task.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    data = load_idx_dataset("mnist", data_root)
    generator = torch.Generator().manual_seed(seed)
    x_train = torch.from_numpy(data.x_train.reshape(len(data.x_train), -1))
    x_test = torch.from_numpy(data.x_test.reshape(len(data.x_test), -1))
    y_train, y_test = torch.from_numpy(data.y_train), torch.from_numpy(data.y_test)
    task_list = []
    for t in range(tasks):
        perm = torch.randperm(28 * 28, generator=generator)
        task_list.append(Task(
            name=f"perm{t}", classes=tuple(range(10 * t, 10 * t + 10)),
            x_train=x_train[:, perm].reshape(-1, 1, 28, 28), y_train=y_train + 10 * t,
            x_test=x_test[:, perm].reshape(-1, 1, 28, 28), y_test=y_test + 10 * t,
        ))
    return Scenario("permuted-mnist", task_list, PERMUTED_PROTOCOL, mean=MNIST_MEAN,
                    std=MNIST_STD)
