"""cfbench next to Avalanche 0.6.0: the same continual-learning workload in both, timed apart.

The workload (the performance issue's): Split MNIST as cfbench's ``split-mnist`` tensors (5 tasks,
0/1 ... 8/9), class setting, MLP 784-400-400-10 with the same initial weights (the run seed),
Adam lr 1e-3, batch 128, 1 epoch per task, test accuracy on every task before training and
after each task. Two settings follow Avalanche's defaults, so that both systems compute the
same thing: one Adam across tasks (Avalanche 0.6.0 keeps the optimizer's state; cfbench runs
with reset_optimizer=False) and unmasked logits (class_scope=all; Avalanche never masks).
Avalanche gets the very tensors cfbench trains on, normalised once, through
``tensors_benchmark`` (task label 0: class-incremental).

Strategies and their hyperparameters in each system's convention are in ``STRATEGIES`` (the
conversions are derived in ``cfbench.integrations.avalanche``). Each (system, strategy, seed)
run is a fresh subprocess of this script, so no import, cache or allocator state passes from
one system to the other; runs alternate between the systems (which goes first alternates too),
with the same OMP_NUM_THREADS and torch threads. Seconds are taken in-process around training
and evaluation only (not imports, data loading, building the model or the strategy): for
Avalanche around ``strategy.train(experience)`` and ``strategy.eval(test_stream)`` with an
``EvaluationPlugin`` of experience and stream accuracy and no logger (its default evaluator
also tracks losses and draws progress bars, which would cost it more); for cfbench, the train
and eval clocks of ``execute``. Evaluation batches are each system's default (cfbench 4096,
Avalanche the training batch size, 128) unless ``--avalanche-eval-mb-size`` sets Avalanche's:
the batch size changes no accuracy, only what evaluation costs. The table gives each
system's fastest run (the least noisy estimate on a shared machine) and the final ACC averaged
over seeds.

    python -m benchmarks.vs_avalanche [--strategies naive,ewc] [--seeds N] [--rounds R]
                                      [--threads T] [--avalanche-eval-mb-size N] [--quick]

Without ``--quick`` the results also go to ``results/performance/vs_avalanche.json``.
``--quick`` runs 2 tasks on 10% of the data, to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cfbench.scenario import Scenario, Task

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "performance" / "vs_avalanche.json"
SYSTEMS = ("cfbench", "avalanche")
MARKER = "VS_AVALANCHE_RESULT "
SCENARIO = "vs-avalanche-split-mnist"
PROTOCOL: dict[str, Any] = {"model": "mlp:400,400", "epochs": 1, "batch_size": 128,
                            "optimizer": "adam", "lr": 1e-3, "eval_batch_size": 4096,
                            "class_scope": "all", "reset_optimizer": False}
FULL = {"tasks": 5, "fraction": 1.0}
QUICK = {"tasks": 2, "fraction": 0.1}


@dataclasses.dataclass(frozen=True)
class Pair:
    """One strategy in both systems: (registered name, hyperparameters) in cfbench and
    (``avalanche.training`` class, keyword arguments) in Avalanche."""

    ours: str
    ours_hp: dict[str, Any]
    theirs: str
    theirs_hp: dict[str, Any]


B = PROTOCOL["batch_size"]
STRATEGIES: dict[str, Pair] = {
    "naive": Pair("naive", {}, "Naive", {}),
    # Avalanche: ewc_lambda * F, F the mean squared minibatch gradient (batches in order, true
    # labels); cfbench's minibatch estimate is B * F, weighted lam / 2.
    "ewc": Pair("ewc", {"lam": 1000.0, "fisher": "empirical", "fisher_batch": B,
                        "fisher_samples": None},
                "EWC", {"ewc_lambda": 1000.0 * B / 2}),
    # Avalanche's KL has no T^2 factor.
    "lwf": Pair("lwf", {"alpha": 1.0, "temperature": 2.0},
                "LwF", {"alpha": 1.0 * 2.0 ** 2, "temperature": 2.0}),
    # Memory split equally over the tasks seen; a memory minibatch of B with each batch.
    "replay": Pair("replay", {"memory": 500, "selection": "per-task", "mix": "batch"},
                   "Replay", {"mem_size": 500}),
    # 250 random samples per task (2 classes); 256 memory samples per reference gradient.
    "agem": Pair("agem", {"memory": None, "per_class": 125, "selection": "per-task",
                          "ref_batch_size": 256},
                 "AGEM", {"patterns_per_exp": 250, "sample_size": 256}),
    # Avalanche's GEM trains on the task's data alone: rehearse=False.
    "gem": Pair("gem", {"memory": None, "per_class": 128, "margin": 0.5, "rehearse": False},
                "GEM", {"patterns_per_exp": 256, "memory_strength": 0.5}),
    "cumulative": Pair("joint", {}, "Cumulative", {}),
}


def workload(*, data_root: Path, seed: int, tasks: int = 5, fraction: float = 1.0) -> Scenario:
    """split-mnist's first `tasks` tasks, each split cut to its first `fraction` of samples."""
    from cfbench.scenarios.mnist import split_mnist

    base = split_mnist(data_root=data_root, seed=seed)

    def cut(t: Task) -> Task:
        n, m = round(len(t.y_train) * fraction), round(len(t.y_test) * fraction)
        return dataclasses.replace(t, x_train=t.x_train[:n], y_train=t.y_train[:n],
                                   x_test=t.x_test[:m], y_test=t.y_test[:m])

    return dataclasses.replace(base, tasks=[cut(t) for t in base.tasks[:tasks]])


def run_cfbench(pair: Pair, seed: int, size: dict[str, Any]) -> dict[str, Any]:
    from cfbench import registry
    from cfbench.data import data_root
    from cfbench.experiment import execute, plan_runs

    registry.register_scenario(SCENARIO, family="benchmark",
                               reference="benchmarks/vs_avalanche.py")(workload)
    root = data_root()
    (config,) = plan_runs(scenario=SCENARIO, settings=["class"], strategies=[pair.ours],
                          hparams={pair.ours: pair.ours_hp} if pair.ours_hp else {},
                          seeds=[seed], scenario_options=size, protocol_overrides=PROTOCOL,
                          data_root=root)
    record = execute(config, root)
    if record.status != "ok":
        raise RuntimeError(f"cfbench run failed: {record.error}")
    return {"train_s": record.cost["train_seconds"], "eval_s": record.cost["eval_seconds"],
            "R": record.R}


def run_avalanche(pair: Pair, seed: int, size: dict[str, Any], eval_mb_size: int | None
                  ) -> dict[str, Any]:
    import random

    import numpy as np
    import torch
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import supervised
    from avalanche.training.plugins import EvaluationPlugin

    from cfbench.data import data_root
    from cfbench.models import build_model

    scenario = workload(data_root=data_root(), seed=0, **size)
    torch.manual_seed(seed)  # the initial weights cfbench's run seed gives
    random.seed(seed)
    np.random.seed(seed)
    model = build_model(PROTOCOL["model"], scenario.input_shape, scenario.n_classes)

    def tensors(split: str) -> list[list[torch.Tensor]]:
        return [[scenario.prepare(getattr(t, f"x_{split}")), getattr(t, f"y_{split}")]
                for t in scenario.tasks]

    tasks = len(scenario.tasks)
    bench = tensors_benchmark(train_tensors=tensors("train"), test_tensors=tensors("test"),
                              task_labels=[0] * tasks)
    strategy = getattr(supervised, pair.theirs)(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=PROTOCOL["lr"]),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=PROTOCOL["batch_size"],
        train_epochs=PROTOCOL["epochs"], eval_mb_size=eval_mb_size,
        device="cpu", evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                                 loggers=[]),
        **pair.theirs_hp)
    seconds = {"train_s": 0.0, "eval_s": 0.0}
    R = []

    def timed(key: str, call, *args, **kwargs):
        start = time.perf_counter()
        result = call(*args, **kwargs)
        seconds[key] += time.perf_counter() - start
        return result

    def evaluate() -> None:
        metrics = timed("eval_s", strategy.eval, bench.test_stream)
        R.append([metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{i:03d}"]
                  for i in range(tasks)])

    evaluate()
    for experience in bench.train_stream:
        timed("train_s", strategy.train, experience, eval_streams=[])
        evaluate()
    return {**seconds, "R": R}


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints its result as one JSON line after MARKER."""
    import torch

    torch.set_num_threads(args.threads)
    pair, size = STRATEGIES[args.strategy], QUICK if args.quick else FULL
    result = (run_cfbench(pair, args.seed, size) if args.worker == "cfbench"
              else run_avalanche(pair, args.seed, size, args.avalanche_eval_mb_size))
    print(MARKER + json.dumps(result), flush=True)


def spawn(system: str, strategy: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh subprocess of this script, with `threads` OpenMP and torch threads."""
    threads = str(args.threads)
    command = [sys.executable, "-m", "benchmarks.vs_avalanche", "--worker", system,
               "--strategy", strategy, "--seed", str(seed), "--threads", threads]
    if args.avalanche_eval_mb_size:
        command += ["--avalanche-eval-mb-size", str(args.avalanche_eval_mb_size)]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run(command + (["--quick"] if args.quick else []), cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{system} {strategy} seed {seed} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARKER):])
    final = result["R"][-1]
    return {"system": system, "strategy": strategy, "seed": seed, **result,
            "total_s": result["train_s"] + result["eval_s"], "acc": sum(final) / len(final)}


def summarise(runs: list[dict[str, Any]], strategies: list[str]) -> list[dict[str, Any]]:
    """Per strategy and system: the fastest run's seconds, and the final ACC over seeds."""
    rows = []
    for name in strategies:
        row: dict[str, Any] = {"strategy": name}
        for system in SYSTEMS:
            mine = [r for r in runs if r["strategy"] == name and r["system"] == system]
            best = min(mine, key=lambda r: r["total_s"])
            per_seed = {r["seed"]: r["acc"] for r in mine}
            row[system] = {"total_s": best["total_s"], "train_s": best["train_s"],
                           "eval_s": best["eval_s"],
                           "acc": sum(per_seed.values()) / len(per_seed)}
        row["speedup"] = row["avalanche"]["total_s"] / row["cfbench"]["total_s"]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def seconds(side: dict[str, Any]) -> str:
        return f"{side['total_s']:.1f} ({side['train_s']:.1f} + {side['eval_s']:.1f})"

    lines = ["| strategy | cfbench s (train + eval) | Avalanche 0.6.0 s (train + eval) | "
             "speedup | ACC cfbench | ACC Avalanche |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {seconds(r['cfbench'])} | {seconds(r['avalanche'])} | "
              f"{r['speedup']:.1f}x | {100 * r['cfbench']['acc']:.1f} | "
              f"{100 * r['avalanche']['acc']:.1f} |" for r in rows]
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "avalanche-lib", "quadprog"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_avalanche",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, from {', '.join(STRATEGIES)} (default: all)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repetitions of every run; the fastest counts (default 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS and torch threads of every run (default 1)")
    p.add_argument("--avalanche-eval-mb-size", type=int, default=None, metavar="N",
                   help="Avalanche's evaluation batch size (default: its own default, the "
                        "training batch size; cfbench evaluates in batches of 4096)")
    p.add_argument("--quick", action="store_true",
                   help="2 tasks, 10%% of the data, no JSON: checks the script itself")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace, strategies: list[str]) -> str | None:
    """What is wrong with the request, in one line, or None."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        return f"unknown strategies {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}"
    if min(args.seeds, args.rounds, args.threads, args.avalanche_eval_mb_size or 1) < 1:
        return "--seeds, --rounds, --threads and --avalanche-eval-mb-size must be positive"
    if _versions()["avalanche-lib"] == "not installed":
        return "Avalanche is not installed: pip install 'cfbench[peers]'"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    problem = _check(args, strategies)
    if problem:
        print(f"vs_avalanche: error: {problem}", file=sys.stderr)
        return 2
    from cfbench.data import data_root, fetch
    from cfbench.errors import CfbenchError

    try:
        fetch("mnist", data_root(), progress=False)  # verified once, before any worker starts
    except CfbenchError as exc:
        print(f"vs_avalanche: error: {exc}", file=sys.stderr)
        return 2
    runs = []
    for round_ in range(args.rounds):
        for i, name in enumerate(strategies):
            for seed in range(args.seeds):
                order = SYSTEMS if (round_ + i + seed) % 2 == 0 else SYSTEMS[::-1]
                for system in order:
                    run = spawn(system, name, seed, args)
                    runs.append(run)
                    print(f"round {round_ + 1} {name} seed {seed} {system}: "
                          f"{run['total_s']:.1f} s, ACC {100 * run['acc']:.1f}", file=sys.stderr)
    rows = summarise(runs, strategies)
    print(markdown(rows))
    if not args.quick:
        report = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workload": {"scenario": "split-mnist", "setting": "class", **FULL,
                         "protocol": PROTOCOL},
            "seeds": args.seeds, "rounds": args.rounds, "threads": args.threads,
            "avalanche_eval_mb_size": args.avalanche_eval_mb_size or PROTOCOL["batch_size"],
            "versions": _versions(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "hyperparameters": {name: dataclasses.asdict(STRATEGIES[name])
                                for name in strategies},
            "summary": rows, "runs": runs,
        }
        OUT.parent.mkdir(parents=True, exist_ok=True)
        partial = OUT.with_suffix(".json.partial")
        partial.write_text(json.dumps(report, indent=1) + "\n")
        partial.replace(OUT)
        print(f"\nwritten to {OUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
