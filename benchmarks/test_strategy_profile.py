"""Where each strategy's time goes, relative to naive fine-tuning, on one workload.

Split MNIST, class setting, MLP 784-400-400-10, Adam 1e-3, batch 128, 100 steps per task, one
thread. For each strategy: seconds per training step (its per-task work, e.g. a Fisher or a
buffer rebuild, spread over the steps), seconds per evaluation of all tasks, and the ratio of
the step to naive's. Runs alternate over `ROUNDS` rounds; the fastest is kept.

    OMP_NUM_THREADS=1 pytest benchmarks/test_strategy_profile.py -s
"""

from __future__ import annotations

import torch

from cfbench.experiment import execute, plan_runs

STRATEGIES = ("naive", "ewc", "si", "lwf", "replay", "der", "agem", "gem")
STEPS = 100
ROUNDS = 2


def test_profile_of_each_strategy_against_naive(benchmark, mnist_root):
    torch.set_num_threads(1)
    configs = {name: plan_runs(scenario="split-mnist", settings=["class"], strategies=[name],
                               hparams={}, seeds=[0], data_root=mnist_root,
                               protocol_overrides={"iterations": STEPS})[0]
               for name in STRATEGIES}
    step: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    evaluation: dict[str, list[float]] = {name: [] for name in STRATEGIES}

    def one_round() -> None:
        for name, config in configs.items():
            record = execute(config, mnist_root)
            assert record.status == "ok", record.error
            step[name].append(record.cost["train_seconds"] / record.cost["steps"])
            evaluation[name].append(record.cost["eval_seconds"] / len(record.R))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    base = min(step["naive"])
    lines = ["| strategy | ms per step | x naive | ms per evaluation |", "|---|---|---|---|"]
    for name in STRATEGIES:
        lines.append(f"| {name} | {1e3 * min(step[name]):.2f} | {min(step[name]) / base:.2f} | "
                     f"{1e3 * min(evaluation[name]):.1f} |")
    print("\n" + "\n".join(lines))
    benchmark.extra_info.update(step_seconds=step, eval_seconds=evaluation)
    # Every strategy does at least naive's work per step.
    assert all(min(step[name]) >= 0.9 * base for name in STRATEGIES)
