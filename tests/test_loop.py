"""What the training loop promises hooks: stopping a task early, growing the model, a log that
reaches the run record, per-channel normalisation that `pixels` inverts, and tasks that are not
images (the scenario's objective)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cfbench import registry
from cfbench.experiment import execute, plan_runs
from cfbench.scenario import NextToken, Protocol, Scenario, Task
from cfbench.strategy import Strategy


class StopAtThree(Strategy):
    """Ends each task after its third step and logs where; wraps the model in task 2."""

    def after_step(self, ctx, batch):
        if ctx.step % 10 == 3:
            ctx.log.setdefault("stopped", []).append(ctx.step)
            ctx.stop_task = True

    def before_task(self, ctx, task):
        ctx.step = 10 * ctx.task_index  # so "third step of this task" is ctx.step % 10 == 3
        if ctx.task_index == 1:
            ctx.model = Doubled(ctx.model)


class Doubled(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return 2 * self.inner(x)


def test_a_hook_can_stop_a_task_grow_the_model_and_log(digits_root):
    registry.strategies.register("t-stop", family="test")(StopAtThree)
    try:
        (config,) = plan_runs(scenario="split-digits", settings=["class"],
                              strategies=["t-stop"], hparams={}, seeds=[0],
                              protocol_overrides={"iterations": 50}, data_root=digits_root)
        record = execute(config, digits_root)
    finally:
        registry.strategies.unregister("t-stop")
    assert record.status == "ok", record.error
    assert [t["steps"] for t in record.tasks] == [3] * 5
    assert record.cost["steps"] == 15
    assert record.strategy_log == {"stopped": [3, 13, 23, 33, 43]}
    # The wrapped model trained and was evaluated from task 2 on: the drift is measured on it.
    assert record.metrics["drift"] > 0


def test_per_channel_normalisation_is_inverted_by_pixels():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    task = Task("t", (0, 1), x, torch.tensor([0, 1, 0, 1]), x, torch.tensor([0, 1, 0, 1]))
    scenario = Scenario("rgb", [task], Protocol(), mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    inputs = scenario.prepare(x)
    for c, (m, s) in enumerate([(0.1, 0.2), (0.5, 0.3), (0.9, 0.4)]):
        assert torch.allclose(inputs[:, c], (x[:, c].float() / 255 - m) / s, atol=1e-6)
    assert torch.allclose(scenario.pixels(inputs) * 255, x.float(), atol=1e-4)
    scalar = Scenario("grey", [task], Protocol(), mean=0.5, std=0.25)
    assert torch.allclose(scalar.prepare(x), (x.float() / 255 - 0.5) / 0.25, atol=1e-6)


def test_augmentation_applies_to_training_batches_only():
    seen = []

    def flip_all(pixels, generator):
        seen.append(generator)
        return pixels.flip(3)

    x = torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8)
    task = Task("t", (0, 1), x, torch.tensor([0, 1, 0, 1]), x, torch.tensor([0, 1, 0, 1]))
    scenario = Scenario("aug", [task], Protocol(), augmentation=flip_all)
    assert torch.allclose(scenario.prepare(x), x.float() / 255)
    generator = torch.Generator().manual_seed(0)
    assert torch.allclose(scenario.prepare(x, generator), x.flip(3).float() / 255)
    assert seen == [generator]


@pytest.mark.parametrize("spec", ["resnet18-reduced:0", "resnet18-reduced:x", "resnet18:3",
                                  "vgg16"])
def test_bad_model_specs_name_the_available_ones(spec):
    from cfbench.errors import CfbenchError
    from cfbench.models import build_model

    with pytest.raises(CfbenchError, match="resnet18|positive integer"):
        build_model(spec, (3, 32, 32), 10)


VOCABULARY, LENGTH = 12, 8


def counting_sequences(data_root, seed: int) -> Scenario:
    """Two tasks of token sequences, each counting modulo 12 in its own step (+1, then +5)
    from a random first token: a rule a small LSTM learns, and the second task overwrites."""
    tasks = []
    for t, step in enumerate((1, 5)):
        generator = torch.Generator().manual_seed(100 * seed + t)

        def sequences(n: int, step: int = step, generator=generator):
            first = torch.randint(0, VOCABULARY, (n, 1), generator=generator)
            tokens = (first + step * torch.arange(LENGTH + 1)) % VOCABULARY
            return tokens[:, :-1], tokens[:, 1:]

        tasks.append(Task(f"+{step}", tuple(range(VOCABULARY)), *sequences(512),
                          *sequences(128)))
    protocol = Protocol(model="lstm:32", epochs=None, iterations=150, batch_size=32, lr=1e-2)
    return Scenario("counting", tasks, protocol, settings=("domain",), objective=NextToken())


@pytest.mark.parametrize("strategy", ["naive", "l2"])
def test_the_loop_trains_a_task_that_is_not_an_image(digits_root, strategy):
    """Token ids in, next-token cross-entropy trains, next-token accuracy fills R and the
    held-out loss (nats per token) fills its own matrix: the ordinary loop, evaluator and
    record, through the scenario's objective."""
    registry.scenarios.register("t-counting", family="test", settings=("domain",))(
        counting_sequences)
    try:
        (config,) = plan_runs(scenario="t-counting", settings=["domain"],
                              strategies=[strategy], hparams={}, seeds=[0],
                              protocol_overrides={}, data_root=digits_root)
        record = execute(config, digits_root)
    finally:
        registry.scenarios.unregister("t-counting")
    assert record.status == "ok", record.error
    R, loss = record.R, record.matrices["loss"]
    assert len(R) == len(loss) == 3 and all(len(row) == 2 for row in R + loss)
    chance = 1 / VOCABULARY
    assert R[0][0] < 3 * chance  # untrained
    assert R[1][0] > 0.8 and R[2][1] > 0.8  # each task learned well above chance
    assert loss[1][0] < loss[0][0] / 2 and loss[2][1] < loss[0][1] / 2
    assert record.cost["steps"] == 300 and record.metrics["acc"] == pytest.approx(
        sum(R[2]) / 2)
