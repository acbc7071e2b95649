"""iCaRL: herding, the exemplar budget, the distilling loss, nearest-mean-of-exemplars
prediction, and the class-incremental gain over fine-tuning on real Split MNIST."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfbench import registry
from cfbench.errors import CfbenchError
from cfbench.models import build_model
from cfbench.scenario import Protocol, Scenario, Setting, Task
from cfbench.strategies.icarl import ICaRL, herding
from cfbench.strategy import Batch, TrainContext
from cfbench.train import train_task
from tests.helpers import run_one


@pytest.fixture(scope="module")
def digits(digits_root) -> Scenario:
    built = registry.scenarios.get("split-digits").factory(data_root=digits_root, seed=0)
    return dataclasses.replace(built, protocol=dataclasses.replace(
        built.protocol, epochs=None, iterations=30))


def context(built: Scenario) -> TrainContext:
    rules = Setting(built, "class")
    torch.manual_seed(0)
    model = build_model(built.protocol.model, built.input_shape, rules.n_outputs)
    return TrainContext.create(model, built, rules, seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """iCaRL with a 50-exemplar memory through all five tasks, with its state after each."""
    ctx, icarl = context(digits), ICaRL(memory=50)
    icarl.setup(ctx)
    history = []
    for t, task in enumerate(digits.tasks):
        ctx.task_index = t
        train_task(ctx, icarl, task)
        history.append((icarl.exemplars, icarl.rank.clone()))
    return ctx, icarl, history


def test_herding_approximates_the_class_mean_better_than_random_picks(trained):
    ctx, icarl, _ = trained
    data = ctx.task_data(0)
    features = icarl.embed(ctx, data.x[data.y == 0])  # real images, a trained network
    target = features.mean(0)
    order = herding(features, 10)
    assert len(set(order.tolist())) == 10
    generator = torch.Generator().manual_seed(0)
    for m in (1, 5, 10):  # every prefix is itself a good selection
        herded = (features[order[:m]].mean(0) - target).norm()
        random = torch.stack([(features[torch.randperm(len(features), generator=generator)[:m]]
                               .mean(0) - target).norm() for _ in range(200)])
        assert herded < random.quantile(0.05), (m, herded, random.median())


def test_herding_first_pick_is_the_sample_nearest_the_mean():
    features = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    assert herding(features, 1).item() in (2, 3)
    assert sorted(herding(features, 4).tolist()) == [0, 1, 2, 3]


def test_memory_never_exceeds_its_budget_and_is_balanced(trained):
    _, icarl, history = trained
    for t, (exemplars, _) in enumerate(history):
        seen = 2 * (t + 1)
        labels, counts = exemplars.y.unique(return_counts=True)
        assert len(exemplars) <= 50
        assert labels.tolist() == list(range(seen))
        assert counts.tolist() == [50 // seen] * seen  # 25, 12, 8, 6, 5 per class


def test_old_sets_shrink_by_keeping_their_herding_prefix(trained):
    _, _, history = trained
    for (before, rank_before), (after, rank_after) in zip(history, history[1:], strict=False):
        for label in before.y.unique().tolist():
            old = before.x[(before.y == label)][rank_before[before.y == label].argsort()]
            new = after.x[(after.y == label)][rank_after[after.y == label].argsort()]
            assert torch.equal(new, old[:len(new)])


def test_class_means_are_unit_vectors_for_the_seen_classes_only(digits):
    ctx, icarl = context(digits), ICaRL(memory=50)
    icarl.setup(ctx)
    ctx.task_index = 0
    train_task(ctx, icarl, digits.tasks[0])
    assert icarl.known.tolist() == [True, True] + [False] * 8
    torch.testing.assert_close(icarl.means[:2].norm(dim=1), torch.ones(2))


def test_loss_targets_old_units_with_the_previous_models_sigmoid(trained):
    ctx, icarl, _ = trained  # trained on all tasks: task 4, teacher from after task 3
    batch = ctx.make_batch(ctx.task_data(4), slice(0, 16))
    logits = ctx.logits(batch)
    with torch.no_grad():
        old = torch.sigmoid(icarl.teacher(batch.x)[:, :8])
    targets = torch.cat([old, F.one_hot(batch.y - 8, 2).float()], dim=1)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 16
    torch.testing.assert_close(icarl.loss(ctx, batch, logits), expected)


DIRECTIONS = {0: (200, 50), 1: (50, 200), 2: (150, 150), 3: (200, 0)}


def hand_made_scenario() -> Scenario:
    """Two tasks of 2-pixel 'images'; each class's images share one direction."""
    def images(labels):
        rows = [[v // k for v in DIRECTIONS[c]] for c in labels for k in (1, 2)]
        return torch.tensor(rows, dtype=torch.uint8).view(-1, 1, 1, 2)

    def labels(classes):
        return torch.tensor([c for c in classes for _ in (1, 2)])

    tasks = [Task(f"{a}/{b}", (a, b), images((a, b)), labels((a, b)), images((a, b)),
                  labels((a, b))) for a, b in ((0, 1), (2, 3))]
    return Scenario("hand-made", tasks, Protocol(model="mlp:2", epochs=None, iterations=1))


def test_nearest_mean_of_exemplars_on_normalised_features():
    built = hand_made_scenario()
    # Features are the pixels themselves (identity layer, then ReLU); the head prefers class 3
    # for everything, so only a nearest-mean rule gets the samples below right.
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
        model[1].bias.zero_()
        model[3].weight.zero_()
        model[3].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    ctx = TrainContext.create(model, built, Setting(built, "class"))
    icarl = ICaRL(memory=4)
    icarl.setup(ctx)
    pixels = torch.tensor([[240, 60], [60, 240], [90, 110], [5, 0]], dtype=torch.uint8)
    batch = Batch(built.prepare(pixels.view(4, 1, 1, 2)), torch.tensor([0, 1, 2, 3]),
                  torch.tensor([0, 0, 1, 1]))
    ctx.task_index = 1
    assert torch.equal(icarl.predict(ctx, batch), ctx.logits(batch))  # no means yet: logits
    for t, task in enumerate(built.tasks):
        ctx.task_index = t
        icarl.after_task(ctx, task)
        assert len(icarl.exemplars) == 4  # 2 per class, then 1
    expected_means = F.normalize(torch.tensor([DIRECTIONS[c] for c in range(4)]).float(), dim=1)
    torch.testing.assert_close(icarl.means, expected_means)
    scores = icarl.predict(ctx, batch)
    # [240, 60] lies along class 0, [90, 110] is nearest class 2's diagonal, and [5, 0] is a
    # faint image along class 3's axis: direction, not brightness, decides.
    assert scores.argmax(1).tolist() == [0, 1, 2, 3]
    features = F.normalize(pixels.float(), dim=1)
    torch.testing.assert_close(scores, -torch.cdist(features, expected_means))


def test_memory_must_hold_one_exemplar_per_class(digits):
    with pytest.raises(CfbenchError, match="one exemplar for each of the 10 classes"):
        ICaRL(memory=9).setup(context(digits))
    with pytest.raises(ValueError, match="memory"):
        ICaRL(memory=0)


def test_icarl_is_class_incremental_only():
    assert registry.strategies.get("icarl").settings == ("class",)


def test_icarl_beats_naive_by_40_points_on_split_mnist(mnist_root):
    icarl = run_one(mnist_root, "split-mnist", "class", "icarl", epochs=1)
    naive = run_one(mnist_root, "split-mnist", "class", "naive", epochs=1)
    # Same seed (0), 1 epoch per task.
    assert icarl.metrics["acc"] > naive.metrics["acc"] + 0.40
    assert icarl.cost["state_bytes"] >= 2000 * 28 * 28  # the exemplars alone
