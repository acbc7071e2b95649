"""Seed batching: one 10-seed batched job versus 3 single-seed runs.

Split MNIST, class setting, full default protocol but 1 epoch per task (MLP 784-400-400-10,
Adam 1e-3, batch 128), naive and EWC, on the best device available ("auto"). The two sides
alternate in one process, both with one torch thread, and the ratio of the fastest rounds is
the result. The issue's target is a ratio below 1 (10 batched seeds cheaper than 3 single
ones): that is asserted on a GPU, where one small run leaves the device mostly idle. On a CPU
one run already keeps the core busy with its matrix products, so 10 seeds cost about 10 runs'
arithmetic; what is asserted there is that batching costs no more per seed than a run alone
(ratio <= 10/3 with a 10% allowance for noise). Seeds 0-2 of the job must also give the R of
their own runs.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from cfbench.batched import execute_batched
from cfbench.experiment import execute, plan_runs

ROUNDS = 2
SEEDS = 10
SINGLE = 3


@pytest.mark.parametrize("strategy", ["naive", "ewc"])
def test_ten_batched_seeds_against_three_single_runs(benchmark, mnist_root, strategy):
    configs = plan_runs(scenario="split-mnist", settings=["class"], strategies=[strategy],
                        hparams={}, seeds=range(SEEDS), protocol_overrides={"epochs": 1},
                        device="auto", data_root=mnist_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batched_s, single_s = [], []

    def one_round() -> None:
        start = time.perf_counter()
        many = execute_batched(configs, mnist_root)
        batched_s.append(time.perf_counter() - start)
        assert all(r.cost["stacked_runs"] == SEEDS for r in many)
        start = time.perf_counter()
        alone = [execute(c, mnist_root) for c in configs[:SINGLE]]
        single_s.append(time.perf_counter() - start)
        for one, batched in zip(alone, many, strict=False):
            assert one.status == batched.status == "ok"
            np.testing.assert_allclose(batched.R, one.R, atol=0.005)

    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        torch.set_num_threads(threads)
    ratio = min(batched_s) / min(single_s)
    device = configs[0].device
    benchmark.extra_info.update(device=device, batched_seconds=batched_s,
                                single_seconds=single_s, ratio=ratio)
    print(f"\n{strategy} on {device}: {SEEDS} seeds batched min {min(batched_s):.1f} s "
          f"(median {statistics.median(batched_s):.1f}), {SINGLE} single runs min "
          f"{min(single_s):.1f} s (median {statistics.median(single_s):.1f}); ratio {ratio:.2f}; "
          f"per seed {min(batched_s) / SEEDS:.2f} s batched vs {min(single_s) / SINGLE:.2f} s "
          "alone")
    assert ratio < 1 if device.startswith("cuda") else ratio <= SEEDS / SINGLE * 1.1
