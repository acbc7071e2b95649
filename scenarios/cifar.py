"""Scenarios on CIFAR-10 and CIFAR-100 (32x32 colour images; torchvision's pickle files).

Protocol: the reduced ResNet-18 (nf=20) of Lopez-Paz & Ranzato 2017 and Chaudhry et al. 2019;
SGD at lr 0.03 with batch 32, as Mammoth's seq-cifar10 (Buzzega et al. 2020) trains DER, DER++,
A-GEM, GEM, oEWC and SI (its plain-SGD baseline uses 0.1: one shared rate here, since every
strategy trains under the same protocol); training batches are randomly cropped from the image
zero-padded by 4 and flipped horizontally, as there. Mammoth trains 50 epochs per task with a
full-width ResNet-18; the default here is 1 epoch, so that a run fits on a CPU; set
``--epochs 50`` to match its budget.
"""

from __future__ import annotations

from pathlib import Path

from cfbench.augment import CropFlip
from cfbench.data.cifar import load_cifar
from cfbench.registry import register_scenario
from cfbench.scenario import Protocol, Scenario, class_groups, split_by_class

CIFAR_PROTOCOL = Protocol(model="resnet18-reduced:20", epochs=1, batch_size=32, optimizer="sgd",
                          lr=0.03)
# Per-channel mean and standard deviation of the pixels (in [0, 1]) over each training set.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR_AUGMENTATION = CropFlip(padding=4, flip=True)


def _split_cifar(name: str, dataset: str, data_root: Path, seed: int, tasks: int,
                 shuffle_classes: bool, augment: bool, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> Scenario:
    data = load_cifar(dataset, data_root)
    groups = class_groups(len(data.class_names), tasks, seed, shuffle_classes)
    task_list = split_by_class(data.x_train, data.y_train, data.x_test, data.y_test, groups)
    return Scenario(name, task_list, CIFAR_PROTOCOL, settings=("task", "class"),
                    mean=mean, std=std, augmentation=CIFAR_AUGMENTATION if augment else None)


@register_scenario("split-cifar10", family="cifar",
                   reference="Buzzega et al. 2020 (Mammoth seq-cifar10)")
def split_cifar10(*, data_root: Path, seed: int, shuffle_classes: bool = False,
                  augment: bool = True) -> Scenario:
    """CIFAR-10 as 5 tasks of 2 classes (0/1, 2/3, ..., or pairs shuffled by the scenario seed).

    `augment=False` trains on the images as they are (random crop and flip otherwise): faster
    per step, but the protocol's published numbers assume augmentation.
    """
    return _split_cifar("split-cifar10", "cifar10", data_root, seed, 5, shuffle_classes,
                        augment, CIFAR10_MEAN, CIFAR10_STD)


@register_scenario("split-cifar100", family="cifar",
                   reference="Rebuffi et al. 2017 (iCaRL); Boschini et al. 2022 (X-DER)")
def split_cifar100(*, data_root: Path, seed: int, tasks: int = 10,
                   shuffle_classes: bool = False, augment: bool = True) -> Scenario:
    """CIFAR-100 (fine labels) as `tasks` tasks of equal size: 10 of 10 classes by default,
    20 of 5 with tasks=20; classes in order or shuffled by the scenario seed.

    More tasks means fewer classes each: harder in the class setting, easier per task in the
    task setting. `augment` as in split-cifar10.
    """
    return _split_cifar("split-cifar100", "cifar100", data_root, seed, tasks, shuffle_classes,
                        augment, CIFAR100_MEAN, CIFAR100_STD)


@register_scenario("split-cifar100-20", family="cifar",
                   reference="Lopez-Paz & Ranzato 2017 (GEM); Chaudhry et al. 2019 (A-GEM)")
def split_cifar100_20(*, data_root: Path, seed: int, shuffle_classes: bool = False,
                      augment: bool = True) -> Scenario:
    """split-cifar100 with tasks=20 (20 tasks of 5 classes), as GEM and A-GEM split it."""
    return _split_cifar("split-cifar100-20", "cifar100", data_root, seed, 20, shuffle_classes,
                        augment, CIFAR100_MEAN, CIFAR100_STD)
