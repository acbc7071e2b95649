"""Transfer scenarios: the source is learned once, identically for every strategy, R's row 1 is
the pretrained model, and forgetting of the source shows as REM on real MNIST -> Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfbench import registry
from cfbench.experiment import execute, plan_runs
from cfbench.strategy import Strategy
from tests.helpers import run_one

# Fast fine-tuning that still forgets: one epoch on Fashion-MNIST at Adam lr 1e-2 (the source is
# learned under the same optimiser, one epoch of MNIST).
FAST = {"epochs": 1, "lr": 1e-2}


@pytest.fixture(scope="module")
def root(transfer_root):
    return transfer_root


def test_mnist_to_fashion_is_a_source_and_its_target(root):
    scenario = registry.scenarios.get("mnist-to-fashion").factory(data_root=root, seed=0)
    source, target = scenario.tasks
    assert source.classes == tuple(range(10)) and target.classes == tuple(range(10, 20))
    assert len(source.y_train) + len(source.y_val) == 60_000 and len(source.y_val) == 5000
    assert len(target.y_train) == 60_000 and len(target.y_test) == 10_000
    # The held-out source split is disjoint from what pretraining trains on.
    train = {bytes(x) for x in source.x_train[:, 0].flatten(1).numpy()[:3000]}
    assert not any(bytes(x) in train for x in source.x_val[:, 0].flatten(1).numpy())
    assert scenario.source is not None and scenario.settings == ("task", "class")
    split = registry.scenarios.get("mnist-to-fashion").factory(data_root=root, seed=0,
                                                              target_tasks=5)
    assert [t.classes for t in split.tasks[1:]] == [(10, 11), (12, 13), (14, 15), (16, 17),
                                                    (18, 19)]
    with pytest.raises(ValueError, match="target_tasks must divide"):
        registry.scenarios.get("mnist-to-fashion").factory(data_root=root, seed=0,
                                                          target_tasks=3)


class Recorder(Strategy):
    """Records which hooks saw the source, and the model's weights when they did."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def setup(self, ctx):
        self.weights_at_setup = torch.cat([p.detach().flatten().clone()
                                           for p in ctx.model.parameters()])

    def before_task(self, ctx, task):
        self.calls.append(("before_task", ctx.task_index, ctx.step))

    def after_task(self, ctx, task):
        self.calls.append(("after_task", ctx.task_index, ctx.step))


def test_the_source_is_learned_identically_for_every_strategy_and_seen_as_a_learned_task(root):
    naive = run_one(root, "mnist-to-fashion", "task", "naive", **FAST)
    lwf = run_one(root, "mnist-to-fashion", "task", "lwf", **FAST)
    R = np.asarray(naive.R)
    assert R.shape == (3, 2)
    assert R[0, 0] < 0.3 and R[1, 0] > 0.9  # untrained, then the pretrained source
    assert naive.R[:2] == lwf.R[:2]  # the same pretrained model, whatever the strategy
    assert naive.metrics["rem_source"] == pytest.approx(100 * R[2, 0] / R[1, 0])
    assert naive.metrics["acc_target"] == pytest.approx(R[2, 1])
    assert "steps" not in naive.tasks[0] and naive.tasks[1]["steps"] == 469
    assert naive.cost["steps"] == 469  # pretraining is not the strategy's cost
    joint = run_one(root, "mnist-to-fashion", "task", "joint", **FAST)
    assert joint.tasks[1]["steps"] == -(-(55_000 + 60_000) // 128)  # the source's data too

    recorder = Recorder()
    registry.strategies.register("t-recorder", family="test")(lambda: recorder)
    try:
        (config,) = plan_runs(scenario="mnist-to-fashion", settings=["task"],
                              strategies=["t-recorder"], hparams={}, seeds=[0],
                              protocol_overrides={**FAST, "iterations": 5, "epochs": None},
                              data_root=root)
        record = execute(config, root)
    finally:
        registry.strategies.unregister("t-recorder")
    assert record.status == "ok", record.error
    # Zero steps on the source, then the target trained for its budget.
    assert recorder.calls == [("before_task", 0, 0), ("after_task", 0, 0),
                              ("before_task", 1, 0), ("after_task", 1, 5)]
    assert record.R[1] == naive.R[1]  # the cached source is the one trained for naive
    assert float(recorder.weights_at_setup.abs().sum()) > 0


def test_naive_forgets_the_source_and_mitigations_keep_it_on_the_same_seeds(root):
    """Measured (task setting, FAST, seeds 0 / 1 / 2): rem_source naive 49.1 / 37.9 / 32.6,
    lwf 85.6 / 84.0 / 92.6, l2-sp 99.9 / 99.2 / 99.7; Fashion accuracy naive 0.84, lwf 0.81-0.83,
    l2-sp 0.67 (its default alpha holds the features close to MNIST's)."""
    rem: dict[str, list[float]] = {"naive": [], "lwf": [], "l2-sp": []}
    for seed in (0, 1, 2):
        for strategy in rem:
            record = run_one(root, "mnist-to-fashion", "task", strategy, seed=seed, **FAST)
            rem[strategy].append(record.metrics["rem_source"])
            assert record.R[-1][1] > 0.6, (strategy, seed, record.R)  # it learned the target
    assert max(rem["naive"]) < 65, rem
    for strategy in ("lwf", "l2-sp"):
        assert all(m > n + 25 for m, n in zip(rem[strategy], rem["naive"], strict=True)), rem


def test_rehearsal_remembers_a_source_learned_without_steps(root):
    """A reservoir is fed by training minibatches; the source has none, so it offers its whole
    training set when it is consolidated. Measured (class setting, FAST, seed 0): naive keeps
    0% of MNIST, replay 85.9%, der 98.6%."""
    naive = run_one(root, "mnist-to-fashion", "class", "naive", **FAST)
    assert naive.metrics["rem_source"] < 1
    for strategy in ("replay", "der"):
        record = run_one(root, "mnist-to-fashion", "class", strategy, **FAST)
        assert record.metrics["rem_source"] > 60, (strategy, record.R)
