"""What the protocol's speed flags buy on this machine: the fused optimizer kernel, bfloat16
autocast and torch.compile, each against the default fp32 run.

Split MNIST, class setting, MLP 784-400-400-10, Adam 1e-3, batch 128, 1 epoch per task (the
performance issue's workload), naive fine-tuning, one thread. Runs alternate over `ROUNDS`
rounds; the fastest of each is kept. Compilation happens in a run's first steps and is charged
to its training time, as a user pays it.

    OMP_NUM_THREADS=1 pytest benchmarks/test_speed_flags.py -s
"""

from __future__ import annotations

import torch

from cfbench.experiment import execute, plan_runs

FLAGS = {"default": {}, "fused_optimizer": {"fused_optimizer": True},
         "bf16": {"precision": "bf16"}, "compile": {"compile": True}}
ROUNDS = 3


def test_speed_flags_against_the_default_run(benchmark, mnist_root):
    torch.set_num_threads(1)
    configs = {name: plan_runs(scenario="split-mnist", settings=["class"], strategies=["naive"],
                               hparams={}, seeds=[0], data_root=mnist_root,
                               protocol_overrides={"epochs": 1, **flags})[0]
               for name, flags in FLAGS.items()}
    train: dict[str, list[float]] = {name: [] for name in FLAGS}
    evaluation: dict[str, list[float]] = {name: [] for name in FLAGS}
    acc: dict[str, float] = {}

    def one_round() -> None:
        for name, config in configs.items():
            record = execute(config, mnist_root)
            assert record.status == "ok", record.error
            train[name].append(record.cost["train_seconds"])
            evaluation[name].append(record.cost["eval_seconds"])
            acc[name] = record.metrics["acc"]

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    base = min(train["default"])
    lines = ["| protocol | train s | x default | eval s | ACC |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {min(train[name]):.2f} | {min(train[name]) / base:.2f} | "
              f"{min(evaluation[name]):.2f} | {100 * acc[name]:.1f} |" for name in FLAGS]
    print("\n" + "\n".join(lines))
    benchmark.extra_info.update(train_seconds=train, eval_seconds=evaluation, acc=acc)
    # Every flag keeps the skill (naive's class-IL ACC: the last task only, about 0.2).
    assert all(abs(acc[name] - acc["default"]) < 0.02 for name in FLAGS)
    assert min(train["fused_optimizer"]) < base
