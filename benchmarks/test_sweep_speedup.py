"""A sweep of small runs: the local process pool (2 workers) against the serial executor.

Twelve Split-digits runs (task and class settings, naive and EWC at two strengths, 2 seeds, 400
steps per task) go through each executor once, into its own store. The serial executor runs in
this process with torch's default thread count (one per core), as `cfbench sweep --executor
serial` does; the pool includes its start-up (the fork server importing torch), as a user pays it.
Serial with one thread is timed too: on small models intra-op threads help little, so most of the
pool's gain is running two runs at once. The records must agree; the ratio is the result.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cfbench.executors import ProcessExecutor, RunSetup, SerialExecutor
from cfbench.runs import RunOptions, Sink, run_plan
from cfbench.sweep import plan
from cfbench.sweepfile import load_sweep

SWEEP = """\
name: speedup
scenarios: split-digits
settings: [task, class]
strategies:
  naive:
  ewc: {lam: [10, 1000]}
seeds: 2
protocol: {iterations: 400}
"""


def timed_sweep(runs, executor, db: Path) -> tuple[float, dict[str, list]]:
    start = time.perf_counter()
    with Sink(store=db) as sink:
        outcome = run_plan(runs, sink, "speedup", RunOptions(executor, command="benchmark"))
        seconds = time.perf_counter() - start
        assert len(outcome.ok) == len(runs)
        return seconds, {r.run_id: r.R for r in outcome.ok}


def test_process_pool_vs_serial_on_two_cores(benchmark, tmp_path):
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    runs = plan(load_sweep(tmp_path / "sweep.yaml"), tmp_path)
    setup = RunSetup(tmp_path)
    seconds: dict[str, float] = {}
    results = {}

    def pool() -> None:
        seconds["process"], results["process"] = timed_sweep(
            runs, ProcessExecutor(setup, workers=2), tmp_path / "process.sqlite")

    benchmark.pedantic(pool, rounds=1, iterations=1)
    seconds["serial"], results["serial"] = timed_sweep(runs, SerialExecutor(setup),
                                                       tmp_path / "serial.sqlite")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds["serial-1-thread"], results["serial-1-thread"] = timed_sweep(
            runs, SerialExecutor(setup), tmp_path / "serial1.sqlite")
    finally:
        torch.set_num_threads(threads)
    assert results["process"] == results["serial"] == results["serial-1-thread"]
    ratio = seconds["serial"] / seconds["process"]
    benchmark.extra_info.update(seconds=seconds, ratio=ratio, runs=len(runs),
                                serial_threads=threads)
    print(f"\n{len(runs)} runs: process pool (2 workers) {seconds['process']:.1f} s, serial "
          f"({threads} threads) {seconds['serial']:.1f} s, serial (1 thread) "
          f"{seconds['serial-1-thread']:.1f} s; serial / pool = {ratio:.2f}, serial 1 thread / "
          f"pool = {seconds['serial-1-thread'] / seconds['process']:.2f}")
    assert ratio > 1
