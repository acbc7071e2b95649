"""Scenarios build the task sequences the literature describes, from the real files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfbench import registry
from cfbench.errors import CfbenchError
from cfbench.scenario import Setting, apply_mask
from cfbench.scenarios.mnist import rotate, rotation_angles

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def build(name, root, seed=0, **options):
    return registry.scenarios.get(name).factory(data_root=root, seed=seed, **options)


def test_split_mnist_is_five_disjoint_pairs_of_digits(mnist_root):
    scenario = build("split-mnist", mnist_root)
    assert [t.classes for t in scenario.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for task, (a, b) in zip(scenario.tasks, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)],
                            strict=True):
        assert set(task.y_train.unique().tolist()) == {a, b}
        assert len(task.y_train) == MNIST_TRAIN_COUNTS[a] + MNIST_TRAIN_COUNTS[b]
        assert task.x_train.dtype == torch.uint8 and task.x_train.shape[1:] == (1, 28, 28)
    assert sum(len(t.y_test) for t in scenario.tasks) == 10_000
    assert scenario.protocol.epochs == 4 and scenario.protocol.model == "mlp:400,400"


def test_shuffled_class_order_follows_the_scenario_seed(mnist_root):
    a = build("split-mnist", mnist_root, seed=3, shuffle_classes=True)
    b = build("split-mnist", mnist_root, seed=3, shuffle_classes=True)
    c = build("split-mnist", mnist_root, seed=4, shuffle_classes=True)
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks]
    assert [t.classes for t in a.tasks] != [t.classes for t in c.tasks]
    assert sorted(c for t in a.tasks for c in t.classes) == list(range(10))


def test_permuted_mnist_permutes_pixels_per_task_from_the_scenario_seed(mnist_root):
    a = build("permuted-mnist", mnist_root, seed=0, tasks=3)
    b = build("permuted-mnist", mnist_root, seed=0, tasks=3)
    c = build("permuted-mnist", mnist_root, seed=1, tasks=3)
    assert len(a.tasks) == 3
    assert torch.equal(a.tasks[2].x_train[:50], b.tasks[2].x_train[:50])
    assert not torch.equal(a.tasks[0].x_train[:50], c.tasks[0].x_train[:50])
    first, second = a.tasks[0].x_train[:20].flatten(1), a.tasks[1].x_train[:20].flatten(1)
    assert not torch.equal(first, second)
    # The same images, only the pixel order differs.
    assert torch.equal(first.sort(1).values, second.sort(1).values)
    assert a.tasks[1].classes == tuple(range(10, 20))
    assert torch.equal(a.tasks[1].y_train, a.tasks[0].y_train + 10)


def test_split_digits_is_stratified_and_seeded(digits_root):
    a = build("split-digits", digits_root, seed=0)
    b = build("split-digits", digits_root, seed=1)
    total = sum(len(t.y_train) + len(t.y_test) for t in a.tasks)
    assert total == 1797
    for task in a.tasks:
        for c in task.classes:
            share = (task.y_test == c).sum() / ((task.y_test == c).sum() + (task.y_train == c)
                                                .sum())
            assert abs(float(share) - 0.3) < 0.01
    assert not torch.equal(a.tasks[0].x_test, b.tasks[0].x_test)
    assert int(a.tasks[0].x_train.max()) == 255


@pytest.fixture(scope="module")
def digits_scenario(digits_root):
    return build("split-digits", digits_root)


def test_domain_setting_maps_labels_to_their_position_in_the_task(digits_scenario):
    setting = Setting(digits_scenario, "domain")
    assert setting.n_outputs == 2
    assert setting.targets(torch.tensor([0, 1, 2, 3, 8, 9])).tolist() == [0, 1, 0, 1, 0, 1]


def test_task_setting_masks_each_sample_to_its_own_task(digits_scenario):
    setting = Setting(digits_scenario, "task")
    mask = setting.mask(torch.tensor([0, 3]), current_task=4)
    assert mask[0].nonzero().flatten().tolist() == [0, 1]
    assert mask[1].nonzero().flatten().tolist() == [6, 7]
    logits = apply_mask(torch.zeros(2, 10), mask)
    assert torch.isinf(logits[0, 2:]).all() and torch.isfinite(logits[0, :2]).all()


def test_class_setting_predicts_among_the_classes_seen_so_far(digits_scenario):
    setting = Setting(digits_scenario, "class")
    after_two = setting.mask(torch.tensor([0, 4]), current_task=1)
    assert after_two[1].nonzero().flatten().tolist() == [0, 1, 2, 3]
    before_training = setting.mask(torch.tensor([2]), current_task=-1)
    assert before_training[0].nonzero().flatten().tolist() == [0, 1]


def test_unknown_setting_is_a_clear_error(digits_scenario):
    with pytest.raises(CfbenchError, match="no setting 'online'"):
        Setting(digits_scenario, "online")


def test_uint8_inputs_are_normalised_per_batch(mnist_root):
    scenario = build("split-mnist", mnist_root)
    x = scenario.prepare(scenario.tasks[0].x_train[:1000])
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.3
    assert np.isclose(float(scenario.prepare(torch.zeros(1, dtype=torch.uint8))),
                      -0.1307 / 0.3081, atol=1e-5)


def test_rotation_is_exact_at_right_angles_and_counter_clockwise():
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(rotate(images, 0.0), images)
    for k in (1, 2, 3):
        assert torch.equal(rotate(images, 90.0 * k), torch.rot90(images, k, (2, 3)))


def test_rotated_mnist_draws_one_angle_per_task_in_gems_bins(mnist_root):
    angles = rotation_angles(20, seed=5)
    assert all(9 * t <= a < 9 * (t + 1) for t, a in enumerate(angles))
    assert rotation_angles(20, seed=5) == angles != rotation_angles(20, seed=6)
    scenario = build("rotated-mnist", mnist_root, seed=0, tasks=3)
    first, second, _ = scenario.tasks
    assert second.classes == tuple(range(10, 20))
    assert torch.equal(second.y_train, first.y_train + 10)
    assert second.name == f"rot{rotation_angles(3, seed=0)[1]:.1f}"
    ones = build("split-mnist", mnist_root).tasks[0]  # digits 0 and 1, in the file's order
    ones = ones.x_test[ones.y_test == 1][:50]
    # The same images as the file's, each task's turned by its own angle.
    for task, label, angle in zip(scenario.tasks, (1, 11, 21), rotation_angles(3, seed=0),
                                  strict=True):
        assert torch.equal(task.x_test[task.y_test == label][:50], rotate(ones, angle))
    assert not torch.equal(rotate(ones, angle), ones)


def test_rotated_mnist_runs_end_to_end_in_the_domain_setting(mnist_root):
    from cfbench.experiment import execute, plan_runs

    (config,) = plan_runs(scenario="rotated-mnist", settings=["domain"], strategies=["naive"],
                          hparams={}, seeds=[0], scenario_options={"tasks": 3},
                          protocol_overrides={"iterations": 30}, data_root=mnist_root)
    record = execute(config, mnist_root)
    R = np.asarray(record.R)
    assert record.status == "ok" and R.shape == (4, 3) and np.diag(R[1:]).min() > 0.5
