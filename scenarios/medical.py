"""Transfer from natural to medical images: an ImageNet-pretrained ResNet-18 fine-tuned on a
sequence of MedMNIST datasets, and how much of ImageNet it keeps."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cfbench.data.imagenet import N_CLASSES, load_imagenet_val, load_resnet18, resnet18_weights
from cfbench.data.medmnist import DEFAULT_FLAGS, check_flag, check_size, load_medmnist
from cfbench.registry import register_scenario
from cfbench.scenario import Protocol, Scenario, Source, Task

# Fine-tuning a pretrained network: Adam with a small step (1e-4), so the first batches do not
# wreck the ImageNet features before the new head has learned anything; batch 64; one epoch
# per dataset. Evaluation in batches of 256 bounds the activations of a 224-pixel ResNet-18.
FINE_TUNE_PROTOCOL = Protocol(model="resnet18", epochs=1, batch_size=64, optimizer="adam",
                              lr=1e-4, eval_batch_size=256)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x C x H x W images resized to size x size (bilinear, antialiased when
    shrinking), in chunks of about 2^26 output values (256 MB as float); the input itself when
    it already has that size."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    chunk = max(1, 2 ** 26 // out[0].numel())
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        resized = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True)
        out[start:start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def stratified_subset(labels: np.ndarray, n: int, generator: torch.Generator) -> np.ndarray:
    """Sorted indices of `n` samples drawn without replacement, each class keeping its share
    (rounded by largest remainders; a class whose share rounds to 0 keeps one sample, which can
    add a few to `n`)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if n < len(classes):
        raise ValueError(f"max_train={n} cannot keep each of the {len(classes)} classes")
    if n >= len(labels):
        return np.arange(len(labels))
    share = counts * n / len(labels)
    quota = np.maximum(np.floor(share).astype(np.int64), 1)
    extra = n - int(quota.sum())
    if extra > 0:
        quota[np.argsort(-(share - np.floor(share)), kind="stable")[:extra]] += 1
    order = torch.randperm(len(labels), generator=generator).numpy()
    by_class = order[np.argsort(inverse[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(labels)) - np.repeat(starts, counts)
    return np.sort(by_class[rank < np.repeat(quota, counts)])


def _images(x: np.ndarray, size: int) -> torch.Tensor:
    return resize_images(torch.from_numpy(x), size)


@register_scenario("imagenet-to-medmnist", family="transfer",
                   reference="ResNet-18 on ImageNet (He et al. 2016) -> MedMNIST v2 (Yang et "
                             "al. 2023)", settings=("task", "class"))
def imagenet_to_medmnist(*, data_root: Path, seed: int, weights: str = "IMAGENET1K_V1",
                         imagenet_val: str = "", per_class: int = 10,
                         targets: tuple[str, ...] = DEFAULT_FLAGS, medmnist_size: int = 28,
                         image_size: int = 224, max_train: int | None = 10000) -> Scenario:
    """ImageNet-pretrained ResNet-18 (the source, task 0, labels 0-999) fine-tuned on MedMNIST
    datasets in the order of `targets`, each a task with its own labels after 1000.

    The source is torchvision's `weights` (IMAGENET1K_V1) or a local resnet18 state_dict file,
    loaded the same for every strategy (its `fc` fills the head's first 1000 units). Its data
    are `per_class` images of each class from the ImageNet validation folder `imagenet_val`
    (default ``<data root>/imagenet/val``), the first by file name: half of them (rounded down)
    are the source's training split, which strategies may use (Fisher, replay), and the rest its
    test split, on which forgetting of ImageNet is measured; more images per class mean a
    tighter estimate at the price of decoding and memory. MedMNIST files at `medmnist_size` are
    read from ``<data root>/medmnist/``; grey ones get three channels. All images are stored at
    `image_size` (resized once here, so replay can mix tasks in a batch): 224 is what the
    weights saw, smaller is far cheaper and degrades the source. `max_train` caps each
    target's training set (a class-stratified sample drawn from the scenario seed), bounding
    memory (224-pixel images take 150 KB each) and time; None keeps them whole. MedMNIST's
    validation split is not kept (`cfbench tune` carves validation from the training data).
    Inputs are normalised with ImageNet's per-channel statistics, as the weights expect.
    """
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"targets must name distinct MedMNIST datasets, got {targets}")
    for flag in targets:
        check_flag(flag)
    check_size(medmnist_size)
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (ResNet-18 downsamples 32x), got "
                         f"{image_size}")
    if max_train is not None and max_train < 1:
        raise ValueError(f"max_train must be positive or None, got {max_train}")
    generator = torch.Generator().manual_seed(seed)
    tasks, first = [], N_CLASSES
    for flag in targets:
        data = load_medmnist(flag, data_root, medmnist_size)
        train = (slice(None) if max_train is None
                 else stratified_subset(data.y_train, max_train, generator))
        tasks.append(Task(
            name=flag, classes=tuple(range(first, first + data.n_classes)),
            x_train=_images(data.x_train[train], image_size),
            y_train=torch.from_numpy(data.y_train[train] + first),
            x_test=_images(data.x_test, image_size),
            y_test=torch.from_numpy(data.y_test + first)))
        first += data.n_classes
    state = resnet18_weights(weights)
    folder = Path(imagenet_val).expanduser() if imagenet_val else data_root / "imagenet" / "val"
    imagenet = load_imagenet_val(folder, per_class, image_size, data_root / "cache")
    source = Task(name="imagenet", classes=tuple(range(N_CLASSES)), x_train=imagenet.x_train,
                  y_train=imagenet.y_train, x_test=imagenet.x_test, y_test=imagenet.y_test)
    return Scenario("imagenet-to-medmnist", [source, *tasks], FINE_TUNE_PROTOCOL,
                    settings=("task", "class"), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    source=Source(load=functools.partial(load_resnet18, state)))
