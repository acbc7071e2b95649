"""The engine's overhead: naive fine-tuning through cfbench versus a bare PyTorch loop.

Both do the same arithmetic on Split MNIST, class setting, full default protocol (MLP 784-400-
400-10, Adam 1e-3, batch 128, 4 epochs per task, evaluation on every task before training and
after each task). The bare loop is what a careful person writes by hand: float tensors
normalised once up front, slices of a permutation, logits masked to the classes seen so far.
They alternate in one process so machine noise hits both alike; the ratio of the fastest
rounds is the result (on a shared machine the minimum is the least noisy estimate of what each
costs). Target: engine / bare <= 1.2.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from cfbench.experiment import execute, load_scenario, plan_runs
from cfbench.models import build_model

ROUNDS = 5


def bare_loop(scenario, seed: int) -> list[list[float]]:
    p = scenario.protocol
    torch.manual_seed(seed)
    model = build_model(p.model, scenario.input_shape, 10)
    gen = torch.Generator().manual_seed(seed)
    tasks = [(scenario.prepare(t.x_train), t.y_train, scenario.prepare(t.x_test), t.y_test,
              list(t.classes)) for t in scenario.tasks]
    seen = torch.zeros(10, dtype=torch.bool)

    def evaluate() -> list[float]:
        model.eval()
        with torch.inference_mode():
            mask = seen if seen.any() else torch.isin(torch.arange(10), torch.tensor([0, 1]))
            row = [((model(x).masked_fill(~mask, float("-inf")).argmax(1) == y).float().mean()
                    .item()) for _, _, x, y, _ in tasks]
        model.train()
        return row

    R = [evaluate()]
    for x, y, _, _, classes in tasks:
        seen[classes] = True
        opt = torch.optim.Adam(model.parameters(), lr=p.lr)
        steps = p.steps(len(y))
        done = 0
        while done < steps:
            for idx in torch.randperm(len(y), generator=gen).split(p.batch_size):
                logits = model(x[idx]).masked_fill(~seen, float("-inf"))
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break
        R.append(evaluate())
    return R


def test_naive_through_the_engine_costs_at_most_1_2x_a_bare_loop(benchmark, mnist_root):
    (config,) = plan_runs(scenario="split-mnist", settings=["class"], strategies=["naive"],
                          hparams={}, seeds=[0], data_root=mnist_root)
    scenario = load_scenario("split-mnist", {"shuffle_classes": False}, 0, mnist_root, "cpu")
    engine_s, bare_s = [], []

    def one_round() -> None:
        start = time.perf_counter()
        record = execute(config, mnist_root)
        engine_s.append(time.perf_counter() - start)
        assert record.status == "ok" and record.metrics["acc"] < 0.3
        start = time.perf_counter()
        R = bare_loop(scenario, seed=0)
        bare_s.append(time.perf_counter() - start)
        assert sum(R[-1]) / 5 < 0.3  # the same catastrophic forgetting

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    ratio = min(engine_s) / min(bare_s)
    benchmark.extra_info.update(engine_seconds=engine_s, bare_seconds=bare_s, ratio=ratio)
    print(f"\nengine min {min(engine_s):.2f} s (median {statistics.median(engine_s):.2f}), "
          f"bare loop min {min(bare_s):.2f} s (median {statistics.median(bare_s):.2f}), "
          f"ratio of minima {ratio:.3f}")
    assert ratio <= 1.2
