"""Seconds per epoch of one split-cifar10 task on the CPU, and augmentation's share of them.

One task of split-cifar10 (classes 0/1: 10,000 training images) under the scenario's own
protocol: reduced ResNet-18 (nf=20), SGD, batch 32, random crop and flip on every training
batch, through the engine's `train_task`. There is no real CIFAR here, so the files are
synthetic in the exact on-disk format, full size (50,000 + 10,000 images): the cost of a step
does not depend on the pixel values. A full epoch (313 steps) takes minutes on a shared 2-core
machine, so each round trains `STEPS` steps and the epoch time is extrapolated from the fastest
round (steps per epoch x seconds per step; the first step's FLOP counting is amortised over
`STEPS` steps instead of 313, so the estimate is slightly pessimistic). Augmentation is then
timed alone on the same minibatches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest
import torch

from cfbench.data import cifar
from cfbench.models import build_model
from cfbench.scenario import Setting
from cfbench.scenarios.cifar import split_cifar10
from cfbench.strategy import Strategy, TrainContext
from cfbench.train import minibatch_indices, train_task, warm_up
from tests.test_cifar import cifar10_dicts, pickled

ROUNDS = 3
STEPS = 20


@pytest.fixture(scope="module")
def synthetic_cifar10(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A data root with full-size CIFAR-10 files of random pixels, and their MD5s."""
    root = tmp_path_factory.mktemp("cifar-bench")
    directory = root / cifar.LAYOUTS["cifar10"].folder
    directory.mkdir()
    md5 = {}
    for filename, content in cifar10_dicts(5000, 1000).items():
        raw = pickled(content)
        (directory / filename).write_bytes(raw)
        md5[filename] = hashlib.md5(raw).hexdigest()
    return root, md5


def test_seconds_per_epoch_of_a_split_cifar10_task(benchmark, synthetic_cifar10, monkeypatch):
    root, md5 = synthetic_cifar10
    monkeypatch.setattr(cifar, "expected_md5", lambda name: md5)
    scenario = split_cifar10(data_root=root, seed=0)
    task = scenario.tasks[0]
    assert len(task.y_train) == 10_000 and scenario.augmentation is not None
    steps_per_epoch = scenario.protocol.steps(len(task.y_train))
    protocol = dataclasses.replace(scenario.protocol, epochs=None, iterations=STEPS)
    short = dataclasses.replace(scenario, protocol=protocol)
    setting = Setting(short, "class")
    warm_up()
    train_s = []

    def one_round() -> None:
        torch.manual_seed(0)
        model = build_model(protocol.model, short.input_shape, setting.n_outputs)
        ctx = TrainContext.create(model, short, setting, seed=0)
        ctx.task_index = 0
        start = time.perf_counter()
        cost = train_task(ctx, Strategy(), task)
        train_s.append(time.perf_counter() - start)
        assert cost.steps == STEPS

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)

    # Augmentation alone, on the minibatches the loop drew (the same seeded order).
    ctx = TrainContext.create(torch.nn.Identity(), short, setting, seed=0)
    batches = [task.x_train[idx].float() / 255 for idx in minibatch_indices(
        len(task.y_train), protocol.batch_size, STEPS, ctx.batch_generator, ctx.device)]
    augment_s = []
    for _ in range(ROUNDS):
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for pixels in batches:
            scenario.augmentation(pixels, generator)
        augment_s.append(time.perf_counter() - start)

    step_s = min(train_s) / STEPS
    epoch_s = step_s * steps_per_epoch
    share = min(augment_s) / min(train_s)
    benchmark.extra_info.update(train_seconds=train_s, augment_seconds=augment_s,
                                steps_per_round=STEPS, steps_per_epoch=steps_per_epoch,
                                seconds_per_epoch_extrapolated=epoch_s, augment_share=share,
                                torch_threads=torch.get_num_threads())
    print(f"\nsplit-cifar10 task (10,000 images, batch 32, resnet18-reduced:20, crop+flip): "
          f"{step_s:.3f} s/step, ~{epoch_s:.0f} s/epoch extrapolated from {STEPS} of "
          f"{steps_per_epoch} steps ({torch.get_num_threads()} torch threads); augmentation "
          f"{1e3 * min(augment_s) / STEPS:.2f} ms/batch = {100 * share:.2f}% of training time")
    assert share < 0.05  # batched on the device, augmentation is a small part of a step
