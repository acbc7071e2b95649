"""cfbench next to Avalanche 0.6.0: the same continual-learning workload in both, timed apart.

The workload (the performance issue's): Split MNIST (5 tasks, 0/1 ... 8/9), class setting,
MLP 784-400-400-10 with the same initial weights (the run seed), Adam lr 1e-3, batch 128,
1 epoch per task, test accuracy on every task before training and after each task. Two settings
follow Avalanche's defaults, so that both systems compute the same thing: one Adam across tasks
(Avalanche 0.6.0 keeps the optimizer's state; cfbench runs with reset_optimizer=False) and
unmasked logits (class_scope=all; Avalanche never masks).

Avalanche is fed in two ways (``--feed``, default both), each its own column:

- ``classic``, "Avalanche (classic SplitMNIST)": Avalanche as its documentation and examples
  run Split MNIST, and so as the field's published Avalanche timings run it:
  ``avalanche.benchmarks.classic.SplitMNIST(n_experiences=5, fixed_class_order=[0..9],
  return_task_id=False, dataset_root=...)``. In 0.6.0 that is torchvision's MNIST subclassed
  (``TensorMNIST``): each sample is read one at a time (uint8 -> float / 255) and normalised by
  the per-sample transform ``Normalize((0.1307,), (0.3081,))`` inside Avalanche's data loaders
  (no worker processes, their default). The raw files are cfbench's verified MNIST IDX files,
  linked into the ``<dataset_root>/MNIST/raw/`` layout torchvision checks for (the four
  uncompressed files; then nothing is downloaded). The evaluator is Avalanche's
  ``default_evaluator`` less its one logger, ``InteractiveLogger``, which prints progress bars
  and metrics to the terminal: it keeps every metric the default computes (top-1 accuracy and
  loss, per epoch, experience and stream), as a user who leaves the evaluator alone computes.
- ``tensors``, "Avalanche (our tensors)": the very tensors cfbench trains on, normalised once,
  through ``tensors_benchmark`` (task label 0), with an ``EvaluationPlugin`` of experience and
  stream accuracy only and no logger: Avalanche's most favourable case.

Strategies and their hyperparameters in each system's convention are in ``STRATEGIES`` (the
conversions are derived in ``cfbench.integrations.avalanche``). Each (system, strategy, seed)
run is a fresh subprocess of this script, so no import, cache or allocator state passes from
one system to another; the order of the systems rotates from run to run, with the same
OMP_NUM_THREADS and torch threads. Seconds are taken in-process around training and
evaluation only (not imports, data loading, building the model or the strategy): for
Avalanche around ``strategy.train(experience)`` and ``strategy.eval(test_stream)``; for
cfbench, the train and eval clocks of ``execute``. Evaluation batches are each system's default
(cfbench 4096; every Avalanche strategy used here defaults ``eval_mb_size`` to the training
batch size, 128) unless ``--avalanche-eval-mb-size`` sets Avalanche's: the batch size changes no
accuracy, only what evaluation costs. The table gives each system's fastest run (the least
noisy estimate on a shared machine), the speedup of cfbench over each Avalanche feed, and the
final ACC averaged over seeds.

    python -m benchmarks.vs_avalanche [--strategies naive,ewc] [--feed tensors|classic|both]
                                      [--seeds N] [--rounds R] [--threads T]
                                      [--avalanche-eval-mb-size N] [--quick]

Without ``--quick`` the results also go to ``results/performance/vs_avalanche.json``.
``--quick`` runs 2 tasks on the first 10% of each task's data, to check the script itself
(the classic feed: SplitMNIST's first 2 experiences, each dataset cut with
``AvalancheDataset.subset`` and the cuts made a benchmark with ``benchmark_from_datasets``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cfbench.scenario import Scenario, Task

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "performance" / "vs_avalanche.json"
FEEDS = {"classic": "avalanche-classic", "tensors": "avalanche-tensors"}
SYSTEMS = ("cfbench", *FEEDS.values())
LABELS = {"cfbench": "cfbench", "avalanche-classic": "Avalanche (classic SplitMNIST)",
          "avalanche-tensors": "Avalanche (our tensors)"}
SETUPS = {"avalanche-classic": "avalanche.benchmarks.classic.SplitMNIST (per-sample transforms "
                               "in its data loaders); default_evaluator's metrics, no logger",
          "avalanche-tensors": "tensors_benchmark of cfbench's normalised tensors; "
                               "accuracy_metrics(experience=True, stream=True), no logger"}
MARKER = "VS_AVALANCHE_RESULT "
SCENARIO = "vs-avalanche-split-mnist"
PROTOCOL: dict[str, Any] = {"model": "mlp:400,400", "epochs": 1, "batch_size": 128,
                            "optimizer": "adam", "lr": 1e-3, "eval_batch_size": 4096,
                            "class_scope": "all", "reset_optimizer": False}
MNIST_SHAPE, MNIST_CLASSES = (1, 28, 28), 10
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


def torchvision_layout(source: Path, root: Path) -> None:
    """Make `root` what torchvision's MNIST (and so Avalanche's) checks for before it would
    download: ``root/MNIST/raw/`` holding the four uncompressed IDX files. They are links to
    cfbench's verified files in `source` (a gzipped one is decompressed there instead)."""
    from cfbench.data import IDX_FILES

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        if (source / name).is_file():
            (raw / name).symlink_to((source / name).resolve())
        else:
            (raw / name).write_bytes(gzip.decompress((source / f"{name}.gz").read_bytes()))


def classic_streams(data_root: Path, *, tasks: int = 5, fraction: float = 1.0
                    ) -> tuple[Sequence[Any], Sequence[Any]]:
    """Avalanche's SplitMNIST (train and test streams) as its users build it, on the MNIST files
    in `data_root`; fewer tasks or a fraction keep the samples `workload` keeps."""
    from avalanche.benchmarks import benchmark_from_datasets, with_task_labels
    from avalanche.benchmarks.classic import SplitMNIST

    with tempfile.TemporaryDirectory(prefix="vs-avalanche-") as tmp:
        torchvision_layout(data_root / "mnist", Path(tmp))
        bench = SplitMNIST(n_experiences=FULL["tasks"], fixed_class_order=list(range(10)),
                           return_task_id=False, dataset_root=tmp)  # loads every file now
    if (tasks, fraction) == (FULL["tasks"], FULL["fraction"]):
        return bench.train_stream, bench.test_stream

    def cut(stream: Sequence[Any], assignment: list[list[int]]) -> list[Any]:
        """Each experience's first samples in MNIST's order (its dataset is sorted by class),
        the samples cfbench's cut keeps."""
        kept = []
        for experience, indices in zip(list(stream)[:tasks], assignment[:tasks], strict=True):
            order = sorted(range(len(indices)), key=indices.__getitem__)
            kept.append(experience.dataset.subset(order[:round(len(order) * fraction)]))
        return kept

    small = with_task_labels(benchmark_from_datasets(
        train=cut(bench.train_stream, bench.train_exps_patterns_assignment),
        test=cut(bench.test_stream, bench.test_exps_patterns_assignment)))
    return small.train_stream, small.test_stream


def tensor_streams(data_root: Path, *, tasks: int = 5, fraction: float = 1.0
                   ) -> tuple[Sequence[Any], Sequence[Any]]:
    """cfbench's own tensors of the workload, normalised once, as an Avalanche benchmark."""
    from avalanche.benchmarks import tensors_benchmark

    scenario = workload(data_root=data_root, seed=0, tasks=tasks, fraction=fraction)

    def tensors(split: str) -> list[list[Any]]:
        return [[scenario.prepare(getattr(t, f"x_{split}")), getattr(t, f"y_{split}")]
                for t in scenario.tasks]

    bench = tensors_benchmark(train_tensors=tensors("train"), test_tensors=tensors("test"),
                              task_labels=[0] * len(scenario.tasks))
    return bench.train_stream, bench.test_stream


def run_avalanche(pair: Pair, seed: int, size: dict[str, Any], feed: str,
                  eval_mb_size: int | None) -> dict[str, Any]:
    """One run of `pair` in Avalanche fed by `feed` (classic or tensors; see the module doc)."""
    import random

    import numpy as np
    import torch
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import supervised
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.plugins.evaluation import default_evaluator

    from cfbench.data import data_root
    from cfbench.models import build_model

    if feed == "classic":
        train_stream, test_stream = classic_streams(data_root(), **size)
        evaluator = EvaluationPlugin(default_evaluator().metrics, loggers=[])
    else:
        train_stream, test_stream = tensor_streams(data_root(), **size)
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    torch.manual_seed(seed)  # the initial weights cfbench's run seed gives
    random.seed(seed)
    np.random.seed(seed)
    model = build_model(PROTOCOL["model"], MNIST_SHAPE, MNIST_CLASSES)
    strategy = getattr(supervised, pair.theirs)(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=PROTOCOL["lr"]),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=PROTOCOL["batch_size"],
        train_epochs=PROTOCOL["epochs"], eval_mb_size=eval_mb_size, device="cpu",
        evaluator=evaluator, **pair.theirs_hp)
    seconds = {"train_s": 0.0, "eval_s": 0.0}
    R = []

    def timed(key: str, call, *args):
        start = time.perf_counter()
        result = call(*args)
        seconds[key] += time.perf_counter() - start
        return result

    def evaluate() -> None:
        metrics = timed("eval_s", strategy.eval, test_stream)
        R.append([metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{i:03d}"]
                  for i in range(len(test_stream))])

    evaluate()
    for experience in train_stream:
        timed("train_s", strategy.train, experience)
        evaluate()
    return {**seconds, "R": R}


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints its result as one JSON line after MARKER."""
    import torch

    torch.set_num_threads(args.threads)
    pair, size = STRATEGIES[args.strategy], QUICK if args.quick else FULL
    if args.worker == "cfbench":
        result = run_cfbench(pair, args.seed, size)
    else:
        feed = next(f for f, system in FEEDS.items() if system == args.worker)
        result = run_avalanche(pair, args.seed, size, feed, args.avalanche_eval_mb_size)
    print(MARKER + json.dumps(result, allow_nan=False), flush=True)


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
    """Per strategy and system that ran: the fastest run's seconds and the final ACC over seeds;
    and per Avalanche feed, its fastest seconds over cfbench's (cfbench's speedup)."""
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in runs)]
    rows = []
    for name in strategies:
        row: dict[str, Any] = {"strategy": name}
        for system in systems:
            mine = [r for r in runs if r["strategy"] == name and r["system"] == system]
            best = min(mine, key=lambda r: r["total_s"])
            per_seed = {r["seed"]: r["acc"] for r in mine}
            row[system] = {"total_s": best["total_s"], "train_s": best["train_s"],
                           "eval_s": best["eval_s"],
                           "acc": sum(per_seed.values()) / len(per_seed)}
        row["speedup"] = {s: row[s]["total_s"] / row["cfbench"]["total_s"]
                          for s in systems if s != "cfbench"}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: seconds (train + eval) of each system, cfbench's speedup over each Avalanche
    feed next to it, then the final ACC of each system."""
    feeds = list(rows[0]["speedup"])
    systems = ["cfbench", *feeds]

    def seconds(side: dict[str, Any]) -> str:
        return f"{side['total_s']:.1f} ({side['train_s']:.1f} + {side['eval_s']:.1f})"

    head = ["strategy", "cfbench s (train + eval)"]
    for feed in feeds:
        head += [f"{LABELS[feed]} s (train + eval)", "speedup"]
    head += [f"ACC {LABELS[s]}" for s in systems]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["strategy"], seconds(r["cfbench"])]
        for feed in feeds:
            cells += [seconds(r[feed]), f"{r['speedup'][feed]:.1f}x"]
        cells += [f"{100 * r[s]['acc']:.1f}" for s in systems]
        lines.append("| " + " | ".join(cells) + " |")
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
    p.add_argument("--feed", choices=(*FEEDS, "both"), default="both",
                   help="how Avalanche gets its data: classic (its SplitMNIST, as its users run "
                        "it), tensors (cfbench's tensors) or both (default)")
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
    systems = ["cfbench", *(system for feed, system in FEEDS.items()
                            if args.feed in (feed, "both"))]
    runs = []
    for round_ in range(args.rounds):
        for i, name in enumerate(strategies):
            for seed in range(args.seeds):
                first = (round_ + i + seed) % len(systems)  # who goes first rotates
                for system in systems[first:] + systems[:first]:
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
            "feeds": {s: SETUPS[s] for s in systems[1:]},
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
        partial.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        partial.replace(OUT)
        print(f"\nwritten to {OUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
