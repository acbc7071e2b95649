"""The GPU check: what cfbench's workloads cost on a CUDA device, against this machine's CPU.

Three measurements, written to one JSON file:

- ``leaderboard``: the whole Split-MNIST leaderboard (every built-in strategy that applies, the
  task, domain and class settings, 1 seed, the default protocol) through ``cfbench run`` on the
  device: wall-clock of the command, runs ok, the largest peak GPU memory of a run, the summed
  training seconds.
- ``cpu_reference``: the same runs for a few representative strategies (``--reference``) in the
  class setting, on the CPU of the same machine; the ratio CPU/device of each run's training
  seconds, and their median.
- ``stacked``: the small-batch protocol of the literature (MLP 784-100-100-10, SGD, batch 10,
  ``--steps`` steps per task): one naive run against 10 runs of a learning-rate grid stacked into
  one job, on the device and on the CPU (wall seconds in this process, one torch thread on the
  CPU as in ``benchmarks/test_stacked_grid.py``).

Without CUDA the check runs on the CPU and says so (``"fallback": true``); there is then no CPU
reference to compare with. ``--strategies``, ``--iterations`` (steps per task of the
leaderboard's runs, instead of one epoch) and ``--steps`` shrink the work (the test of the CPU
fallback uses them).

    python -m benchmarks.gpu_check --out gpu_check.json [--strategies a,b] [--iterations N]
                                   [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cfbench import registry
from cfbench.batched import execute_batched
from cfbench.data import data_root as default_data_root
from cfbench.experiment import execute, plan_runs
from cfbench.records import RunRecord, read_records

SETTINGS = ("task", "domain", "class")
REFERENCE = ("naive", "ewc", "lwf", "replay", "der", "agem")
SMALL_BATCH = {"model": "mlp:100,100", "optimizer": "sgd", "batch_size": 10}
LEARNING_RATES = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.085, 0.1)


def builtin_strategies() -> list[str]:
    """Every strategy cfbench ships, without the peers' cross-checks (``avalanche:*``)."""
    registry.strategies.load()
    return [name for name in registry.strategies.names() if ":" not in name]


def cfbench_run(device: str, strategies: list[str], settings: list[str], out: Path,
                data_root: Path, iterations: int | None) -> tuple[float, list[RunRecord]]:
    """Wall seconds of one ``cfbench run`` command, and its records."""
    command = [str(Path(sys.executable).with_name("cfbench")), "run", "--scenario", "split-mnist",
               "--setting", ",".join(settings), "--strategy", ",".join(strategies),
               "--seeds", "1", "--device", device, "--out", str(out), "--quiet", "--yes",
               "--data-root", str(data_root)]
    if iterations is not None:
        command += ["--iterations", str(iterations)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start, read_records(out)


def train_seconds(records: list[RunRecord]) -> dict[tuple[str, str], float]:
    return {(r.config["strategy"], r.config["setting"]): float(r.cost["train_seconds"])
            for r in records if r.status == "ok"}


def stacked(device: str, steps: int, data_root: Path) -> dict[str, float]:
    """Wall seconds of one small-batch naive run and of 10 stacked (a learning-rate grid)."""
    configs = [c for lr in LEARNING_RATES
               for c in plan_runs(scenario="split-mnist", settings=["task"], strategies=["naive"],
                                  hparams={}, seeds=[0], device=device, data_root=data_root,
                                  protocol_overrides={**SMALL_BATCH, "iterations": steps,
                                                      "lr": lr})]
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        single = execute(configs[0], data_root)
        one = time.perf_counter() - start
        start = time.perf_counter()
        members = execute_batched(configs, data_root)
        ten = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    if single.status != "ok" or any(r.status != "ok" for r in members):
        raise RuntimeError(f"a stacked-benchmark run failed on {device}")
    return {"single_wall_s": one, "stacked_10_wall_s": ten, "stacked_10_over_single": ten / one}


def check(strategies: list[str], reference: list[str], iterations: int | None, steps: int,
          data_root: Path, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    result: dict[str, Any] = {
        "device": device, "fallback": not cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "strategies": strategies, "settings": list(SETTINGS), "seeds": 1,
        "iterations_per_task": iterations}
    wall, records = cfbench_run(device, strategies, list(SETTINGS), work / f"runs-{device}",
                                data_root, iterations)
    peaks = [r.cost.get("peak_gpu_bytes") for r in records]
    result["leaderboard"] = {
        "wall_s": wall, "runs": len(records), "ok": sum(r.status == "ok" for r in records),
        "train_s": sum(train_seconds(records).values()),
        "peak_gpu_bytes_max": max((p for p in peaks if p is not None), default=None)}
    if cuda:
        _, cpu_records = cfbench_run("cpu", reference, ["class"], work / "runs-cpu", data_root,
                                     iterations)
        on_device, on_cpu = train_seconds(records), train_seconds(cpu_records)
        pairs = [{"strategy": s, "setting": t, "device_train_s": on_device[s, t],
                  "cpu_train_s": on_cpu[s, t], "cpu_over_device": on_cpu[s, t] / on_device[s, t]}
                 for (s, t) in on_cpu if (s, t) in on_device]
        result["cpu_reference"] = {
            "pairs": pairs,
            "median_cpu_over_device": statistics.median(p["cpu_over_device"] for p in pairs)
            if pairs else None}
    result["stacked"] = {"steps_per_task": steps, device: stacked(device, steps, data_root)}
    if cuda:
        result["stacked"]["cpu"] = stacked("cpu", steps, data_root)
        result["stacked"]["cpu_over_device_10"] = (
            result["stacked"]["cpu"]["stacked_10_wall_s"]
            / result["stacked"]["cuda"]["stacked_10_wall_s"])
    result["total_wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--strategies", help="comma-separated (default: every built-in strategy)")
    p.add_argument("--reference", default=",".join(REFERENCE),
                   help="strategies also run on the CPU for the ratio (class setting)")
    p.add_argument("--iterations", type=int, default=None,
                   help="steps per task of the leaderboard's runs (default: one epoch)")
    p.add_argument("--steps", type=int, default=500,
                   help="steps per task of the stacked small-batch benchmark")
    p.add_argument("--data-root", type=Path, default=None)
    args = p.parse_args(argv)
    strategies = args.strategies.split(",") if args.strategies else builtin_strategies()
    reference = [s for s in args.reference.split(",") if s in strategies]
    data_root = default_data_root(args.data_root)
    with tempfile.TemporaryDirectory(prefix="cfbench-gpu-check-") as work:
        result = check(strategies, reference, args.iterations, args.steps, data_root,
                       Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "fallback", "total_wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
