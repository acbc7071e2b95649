"""What evaluation costs: the evaluator against the bare forward passes it cannot avoid, and
its share of training on the issue's workload.

Split MNIST, class setting, MLP 784-400-400-10. The evaluator reads uint8 test images,
normalises each batch, masks and counts hits per task; the floor is the same model's forward
over test tensors normalised once up front, argmax only. Both alternate in one process; the
fastest round of each is kept. Target: evaluator / floor <= 1.2. The share of training is then
arithmetic: every evaluation is one forward over all test sets (T+1 of them per run) against
three forward-equivalents per training sample, so it falls with epochs.

    pytest benchmarks/test_eval_cost.py -s
"""

from __future__ import annotations

import time

import torch

from cfbench.experiment import execute, initial_model, plan_runs, training_scenario
from cfbench.strategy import TrainContext
from cfbench.train import evaluate

ROUNDS = 20


def test_evaluation_costs_no_more_than_its_forward_passes(benchmark, mnist_root):
    (config,) = plan_runs(scenario="split-mnist", settings=["class"], strategies=["naive"],
                          hparams={}, seeds=[0], data_root=mnist_root,
                          protocol_overrides={"epochs": 1})
    scenario, setting = training_scenario(config, mnist_root)
    model = initial_model(config, scenario, setting, torch.device("cpu"))
    ctx = TrainContext.create(model, scenario, setting, 0, "cpu")
    ctx.task_index = len(scenario.tasks) - 1
    inputs = [scenario.prepare(t.x_test) for t in scenario.tasks]
    size = scenario.protocol.eval_batch_size
    engine_s, floor_s = [], []

    @torch.inference_mode()
    def floor() -> list[float]:
        model.eval()
        return [sum(int((model(x[i:i + size]).argmax(1) == t.y_test[i:i + size]).sum())
                    for i in range(0, len(x), size)) / len(x)
                for x, t in zip(inputs, scenario.tasks, strict=True)]

    def one_round() -> None:
        start = time.perf_counter()
        row = evaluate(ctx)
        engine_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert floor() == row  # in the last task every class is unmasked: the same argmax
        floor_s.append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    ratio = min(engine_s) / min(floor_s)
    shares = {}
    for epochs in (1, 4):
        (run,) = plan_runs(scenario="split-mnist", settings=["class"], strategies=["naive"],
                           hparams={}, seeds=[0], data_root=mnist_root,
                           protocol_overrides={"epochs": epochs})
        cost = execute(run, mnist_root).cost
        shares[epochs] = cost["eval_seconds"] / cost["train_seconds"]
    benchmark.extra_info.update(evaluator_seconds=engine_s, floor_seconds=floor_s, ratio=ratio,
                                eval_share_of_training=shares)
    print(f"\nevaluation of all 5 tasks: evaluator {1e3 * min(engine_s):.1f} ms, bare forward "
          f"{1e3 * min(floor_s):.1f} ms, ratio {ratio:.2f}; evaluation / training over a run: "
          + ", ".join(f"{100 * s:.1f}% at {e} epoch(s)" for e, s in shares.items()))
    assert ratio <= 1.2
