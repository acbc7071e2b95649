"""Scenarios on MNIST and Fashion-MNIST (28x28 grey images, 10 classes, IDX files)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cfbench.cost import check_fits
from cfbench.data import CHECKSUMS, IdxDataset, load_idx_dataset
from cfbench.data.derived import cached_arrays
from cfbench.registry import register_scenario
from cfbench.scenario import Protocol, Scenario, Source, Task, class_groups, split_by_class

# Hsu et al. 2018 ("Re-evaluating continual learning scenarios"): MLP 400-400, Adam 1e-3,
# batch 128, 4 epochs per task.
SPLIT_PROTOCOL = Protocol(model="mlp:400,400", epochs=4, batch_size=128, optimizer="adam",
                          lr=1e-3)
PERMUTED_PROTOCOL = Protocol(model="mlp:400,400", epochs=1, batch_size=128, optimizer="adam",
                             lr=1e-3)
# Fine-tuning long enough that plain fine-tuning visibly forgets the source (REM ~80 in the
# task setting at 5 epochs, ~93 at 1).
TRANSFER_PROTOCOL = Protocol(model="mlp:400,400", epochs=5, batch_size=128, optimizer="adam",
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
    return split_by_class(_images(data.x_train), torch.from_numpy(data.y_train),
                          _images(data.x_test), torch.from_numpy(data.y_test), groups)


@register_scenario("split-mnist", family="mnist", reference="Zenke et al. 2017; Hsu et al. 2018")
def split_mnist(*, data_root: Path, seed: int, shuffle_classes: bool = False, pad: int = 0
                ) -> Scenario:
    """MNIST as 5 tasks of 2 digits (0/1, 2/3, ..., or pairs shuffled by the scenario seed).

    `pad=2` frames the images to 32x32 as Hsu et al. 2018 do (the MLP then sees 1024 inputs).
    """
    data, mean, std = padded(load_idx_dataset("mnist", data_root), pad, MNIST_MEAN, MNIST_STD)
    return Scenario("split-mnist", split_tasks(data, class_groups(10, 5, seed, shuffle_classes)),
                    SPLIT_PROTOCOL, mean=mean, std=std)


@register_scenario("split-fashion-mnist", family="mnist", reference="Xiao et al. 2017 (data)")
def split_fashion_mnist(*, data_root: Path, seed: int, shuffle_classes: bool = False
                        ) -> Scenario:
    """Fashion-MNIST as 5 tasks of 2 classes (0/1, 2/3, ...), Split-MNIST's protocol."""
    data = load_idx_dataset("fashion-mnist", data_root)
    return Scenario("split-fashion-mnist",
                    split_tasks(data, class_groups(10, 5, seed, shuffle_classes)), SPLIT_PROTOCOL,
                    mean=FASHION_MEAN, std=FASHION_STD)


def _check_tasks(tasks: int) -> None:
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")


def _check_room(tasks: int, data: IdxDataset) -> None:
    """Each task holds its own transformed copy of the images (and labels): refuse a count
    that cannot fit before building any."""
    per_task = data.x_train.nbytes + data.x_test.nbytes + 8 * (len(data.y_train)
                                                               + len(data.y_test))
    check_fits(tasks * per_task, f"{tasks} tasks", "use fewer tasks")


def _flat(data: IdxDataset) -> tuple[torch.Tensor, ...]:
    """Images as N x 784 uint8 and labels as int64 tensors, train then test."""
    return (torch.from_numpy(data.x_train.reshape(len(data.x_train), -1)),
            torch.from_numpy(data.y_train),
            torch.from_numpy(data.x_test.reshape(len(data.x_test), -1)),
            torch.from_numpy(data.y_test))


@register_scenario("permuted-mnist", family="mnist",
                   reference="Goodfellow et al. 2013; Kirkpatrick et al. 2017")
def permuted_mnist(*, data_root: Path, seed: int, tasks: int = 10) -> Scenario:
    """MNIST with one fixed random pixel permutation per task (drawn from the scenario seed).

    Task t's labels are 10*t + digit, so the task setting has a head per task and the domain
    setting one shared 10-way head. Permuted images are computed once per data root and cached
    there (``cfbench.data.derived``).
    """
    _check_tasks(tasks)
    data = load_idx_dataset("mnist", data_root)
    _check_room(tasks, data)
    x_train, y_train, x_test, y_test = _flat(data)

    def permute() -> dict[str, np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        images = {}
        for t in range(tasks):
            perm = torch.randperm(28 * 28, generator=generator)
            images[f"train{t}"] = x_train[:, perm].reshape(-1, 1, 28, 28).numpy()
            images[f"test{t}"] = x_test[:, perm].reshape(-1, 1, 28, 28).numpy()
        return images

    images = cached_arrays(data_root, "permuted-mnist",
                           {"seed": seed, "tasks": tasks, "mnist": CHECKSUMS["mnist"]}, permute)
    task_list = [Task(name=f"perm{t}", classes=tuple(range(10 * t, 10 * t + 10)),
                      x_train=images[f"train{t}"], y_train=y_train + 10 * t,
                      x_test=images[f"test{t}"], y_test=y_test + 10 * t)
                 for t in range(tasks)]
    return Scenario("permuted-mnist", task_list, PERMUTED_PROTOCOL, mean=MNIST_MEAN,
                    std=MNIST_STD)


def rotate(images: torch.Tensor, degrees: float, chunk: int = 8192) -> torch.Tensor:
    """uint8 N x 1 x H x W images rotated counter-clockwise about their centre (bilinear,
    zeros outside), a whole tensor at a time."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]])  # output -> input coordinates
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        grid = F.affine_grid(theta.expand(len(part), 2, 3), list(part.shape), align_corners=False)
        rotated = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        out[start:start + chunk] = rotated.round_().clamp_(0, 255).to(torch.uint8)
    return out


def rotation_angles(tasks: int, seed: int) -> list[float]:
    """GEM's rule: task t's angle is drawn uniformly from [t*180/N, (t+1)*180/N) degrees."""
    generator = torch.Generator().manual_seed(seed)
    width = 180.0 / tasks
    return [width * (t + float(torch.rand((), generator=generator))) for t in range(tasks)]


@register_scenario("rotated-mnist", family="mnist", reference="Lopez-Paz & Ranzato 2017 (GEM)")
def rotated_mnist(*, data_root: Path, seed: int, tasks: int = 10) -> Scenario:
    """MNIST rotated by one fixed angle per task (GEM's rule, drawn from the scenario seed).

    Labels as in permuted-mnist (10*t + digit). Each task's images are rotated once, on the
    first build in a data root, and cached there (``cfbench.data.derived``).
    """
    _check_tasks(tasks)
    data = load_idx_dataset("mnist", data_root)
    _check_room(tasks, data)
    angles = rotation_angles(tasks, seed)

    def rotated() -> dict[str, np.ndarray]:
        x_train, x_test = _images(data.x_train), _images(data.x_test)
        return {f"{split}{t}": rotate(x, angle).numpy() for t, angle in enumerate(angles)
                for split, x in (("train", x_train), ("test", x_test))}

    images = cached_arrays(data_root, "rotated-mnist",
                           {"seed": seed, "tasks": tasks, "mnist": CHECKSUMS["mnist"]}, rotated)
    y_train, y_test = torch.from_numpy(data.y_train), torch.from_numpy(data.y_test)
    task_list = [Task(name=f"rot{angle:.1f}", classes=tuple(range(10 * t, 10 * t + 10)),
                      x_train=images[f"train{t}"], y_train=y_train + 10 * t,
                      x_test=images[f"test{t}"], y_test=y_test + 10 * t)
                 for t, angle in enumerate(angles)]
    return Scenario("rotated-mnist", task_list, PERMUTED_PROTOCOL, mean=MNIST_MEAN,
                    std=MNIST_STD)


@register_scenario("mnist-to-fashion", family="transfer", reference="transfer: MNIST -> "
                   "Fashion-MNIST (Xiao et al. 2017)", settings=("task", "class"))
def mnist_to_fashion(*, data_root: Path, seed: int, target_tasks: int = 1,
                     source_epochs: float = 1.0, source_val: int = 5000) -> Scenario:
    """Pretrain on MNIST (the source, task 0, digits as labels 0-9), then fine-tune on
    Fashion-MNIST (labels 10-19, in `target_tasks` tasks of equal size).

    The source keeps its own units and is learned for `source_epochs` of plain fine-tuning,
    identically for every strategy; `source_val` MNIST training images (drawn by the scenario
    seed) are held out of that pretraining as the source's validation split. Inputs are
    normalised with MNIST's statistics, as the pretrained model expects. The small,
    always-available counterpart of imagenet-to-medmnist.
    """
    if target_tasks < 1 or 10 % target_tasks:
        raise ValueError(f"target_tasks must divide the 10 Fashion-MNIST classes, got "
                         f"{target_tasks}")
    if source_epochs <= 0:
        raise ValueError(f"source_epochs must be positive, got {source_epochs}")
    mnist = load_idx_dataset("mnist", data_root)
    if not 0 < source_val < len(mnist.y_train):
        raise ValueError(f"source_val must be between 1 and {len(mnist.y_train) - 1}, got "
                         f"{source_val}")
    order = torch.randperm(len(mnist.y_train), generator=torch.Generator().manual_seed(seed))
    train, val = order[source_val:].sort().values, order[:source_val].sort().values
    x, y = _images(mnist.x_train), torch.from_numpy(mnist.y_train)
    source = Task(name="mnist", classes=tuple(range(10)), x_train=x[train], y_train=y[train],
                  x_test=_images(mnist.x_test), y_test=torch.from_numpy(mnist.y_test),
                  x_val=x[val], y_val=y[val])
    fashion = load_idx_dataset("fashion-mnist", data_root)
    shifted = IdxDataset(fashion.x_train, fashion.y_train + 10, fashion.x_test,
                         fashion.y_test + 10)
    size = 10 // target_tasks
    groups = [tuple(range(10 + i, 10 + i + size)) for i in range(0, 10, size)]
    targets = split_tasks(shifted, groups)
    if target_tasks == 1:
        targets[0].name = "fashion"
    return Scenario("mnist-to-fashion", [source, *targets], TRANSFER_PROTOCOL,
                    settings=("task", "class"), mean=MNIST_MEAN, std=MNIST_STD,
                    source=Source(epochs=source_epochs))
