"""cfbench next to Avalanche 0.6.0: the same continual-learning workload in both, timed apart.

Two workloads (``--workload``), both with the same initial weights (the run seed) in both
systems and test accuracy on every task before training and after each task:

- ``compute-bound`` (the default; the performance issue's): Split MNIST (5 tasks, 0/1 ... 8/9),
  class setting, MLP 784-400-400-10, Adam lr 1e-3, batch 128, 1 epoch per task. Two settings
  follow Avalanche's defaults, so that both systems compute the same thing: one Adam across
  tasks (Avalanche 0.6.0 keeps the optimizer's state; cfbench runs with reset_optimizer=False)
  and unmasked logits (class_scope=all; Avalanche never masks). Results:
  ``results/performance/vs_avalanche.json``.
- ``small-batch``: the protocol of GEM, A-GEM, ER and DER (per-step overhead, not arithmetic):
  MLP 784-100-100-10, plain SGD at lr 0.1 (the authors' code: GEM's ``run_experiments.sh``
  trains GEM and EWC on Permuted MNIST at 0.1, A-GEM's ``replicate_results_iclr19.sh`` A-GEM,
  ER's ``replicate_results_er.sh`` ER), batch 10, 1 epoch per task, on two scenarios: Split MNIST in
  the class setting with unmasked logits as above (Avalanche's single-head convention; the task
  setting would need its multi-head models and task-labelled streams) and Permuted MNIST in the
  domain setting (one 10-way head), bounded in time: the first ``--permuted-tasks`` (default 3)
  of cfbench's 10-task ``permuted-mnist``, each trained on its first ``--permuted-samples``
  (default 10,000; GEM and ER train on 1,000 per task) and tested on all 10,000. EWC's lam 10 is
  A-GEM's MNIST value; A-GEM keeps 250 samples per task (A-GEM's MNIST memory). DER alone runs
  at lr 0.03, Buzzega et al.'s Seq-MNIST rate for its 500-sample memory, with alpha 0.5 (their
  alpha 1 there, and lr 0.1 with alpha 0.2 or 0.5, made Avalanche's DER diverge on Split MNIST,
  not cfbench's). Results:
  ``results/performance/vs_avalanche_small_batch.json``.

Avalanche is fed in two ways (``--feed``, default both), each its own column:

- ``classic``, "Avalanche (classic SplitMNIST)" (or PermutedMNIST): Avalanche as its
  documentation and examples run the scenario, and so as the field's published Avalanche timings
  run it: ``avalanche.benchmarks.classic.SplitMNIST(n_experiences=5, fixed_class_order=[0..9],
  return_task_id=False, dataset_root=...)`` or ``PermutedMNIST(n_experiences, seed=0,
  return_task_id=False, dataset_root=...)``. In 0.6.0 that is torchvision's MNIST subclassed
  (``TensorMNIST``): each sample is read one at a time (uint8 -> float / 255) and normalised by
  the per-sample transform ``Normalize((0.1307,), (0.3081,))`` (PermutedMNIST first permutes
  its pixels, one sample at a time) inside Avalanche's data loaders (no worker processes, their
  default). Its permutations are its own (numpy's generator), so its Permuted-MNIST tasks are
  others of the same kind, not cfbench's. The raw files are cfbench's verified MNIST IDX files,
  linked into the ``<dataset_root>/MNIST/raw/`` layout torchvision checks for (the four
  uncompressed files; then nothing is downloaded). The evaluator is Avalanche's
  ``default_evaluator`` less its one logger, ``InteractiveLogger``, which prints progress bars
  and metrics to the terminal: it keeps every metric the default computes (top-1 accuracy and
  loss, per epoch, experience and stream), as a user who leaves the evaluator alone computes.
- ``tensors``, "Avalanche (our tensors)": the very tensors cfbench trains on, normalised once,
  through ``tensors_benchmark`` (task label 0; the setting's targets), with an
  ``EvaluationPlugin`` of experience and stream accuracy only and no logger: Avalanche's most
  favourable case.

``--stack K`` adds a column of cfbench running K seeds (the run's seed and the K-1 after it)
as one stacked job (``cfbench.batched.execute_batched``, what ``--stack`` does in the CLI):
seconds per run are the job's over K, ACC the mean over the K seeds (their spread is the seed
noise the other columns' single seed sits in). A strategy without a stacked form (one that
overrides an in-step hook and names no ``Strategy.stacked``: DER's penalty, A-GEM's
projection) shows the reason ``cfbench.batched.can_batch`` gives instead.

Strategies and their hyperparameters in each system's convention come from each workload's
table of `Pair` (the conversions are derived in ``cfbench.integrations.avalanche``). Each
(scenario, system, strategy, seed) run is a fresh subprocess of this script, so no import, cache
or allocator state passes from one system to another; the order of the systems rotates from run
to run, with the same OMP_NUM_THREADS and torch threads. Seconds are taken in-process around
training and evaluation only (not imports, data loading, building the model or the strategy):
for Avalanche around ``strategy.train(experience)`` and ``strategy.eval(test_stream)``; for
cfbench, the train and eval clocks of its records. Evaluation batches are each system's default
(cfbench 4096; every Avalanche strategy used here defaults ``eval_mb_size`` to the training
batch size) unless ``--avalanche-eval-mb-size`` sets Avalanche's: the batch size changes no
accuracy, only what evaluation costs. The table gives each system's fastest run (the least noisy
estimate on a shared machine), the speedup of cfbench over each Avalanche feed, and the final
ACC averaged over seeds.

    python -m benchmarks.vs_avalanche [--workload compute-bound|small-batch]
                                      [--strategies naive,ewc] [--feed tensors|classic|both]
                                      [--seeds N] [--rounds R] [--threads T] [--stack K]
                                      [--permuted-tasks T] [--permuted-samples N]
                                      [--avalanche-eval-mb-size N] [--quick]

Without ``--quick`` the results also go to the workload's JSON file. ``--quick`` runs 2 tasks
on the first 10% of each task's data, to check the script itself (the classic feed: the
benchmark's first 2 experiences, each dataset cut with ``AvalancheDataset.subset`` and the cuts
made a benchmark with ``benchmark_from_datasets``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cfbench.scenario import Scenario, Task

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "performance" / "vs_avalanche.json"
FEEDS = {"classic": "avalanche-classic", "tensors": "avalanche-tensors"}
STACKED = "cfbench-stacked"
SYSTEMS = ("cfbench", STACKED, *FEEDS.values())
LABELS = {"cfbench": "cfbench", "avalanche-tensors": "Avalanche (our tensors)"}
SETUPS = {"avalanche-classic": "avalanche.benchmarks.classic.{classic} (per-sample transforms "
                               "in its data loaders); default_evaluator's metrics, no logger",
          "avalanche-tensors": "tensors_benchmark of cfbench's normalised tensors; "
                               "accuracy_metrics(experience=True, stream=True), no logger"}
MARKER = "VS_AVALANCHE_RESULT "
MNIST_SHAPE, MNIST_CLASSES = (1, 28, 28), 10
QUICK = {"tasks": 2, "fraction": 0.1}


@dataclasses.dataclass(frozen=True)
class Pair:
    """One strategy in both systems: (registered name, hyperparameters) in cfbench and
    (``avalanche.training`` class, keyword arguments) in Avalanche, and what it changes in the
    workload's protocol in both (DER's learning rate)."""

    ours: str
    ours_hp: dict[str, Any]
    theirs: str
    theirs_hp: dict[str, Any]
    protocol: dict[str, Any] = dataclasses.field(default_factory=dict)


# The same rule in both conventions (derived in cfbench.integrations.avalanche).

def ewc_pair(lam: float, batch: int) -> Pair:
    """Avalanche: ewc_lambda * F, F the mean squared minibatch gradient (batches of `batch` in
    order, true labels); cfbench's minibatch estimate is batch * F, weighted lam / 2."""
    return Pair("ewc", {"lam": lam, "fisher": "empirical", "fisher_batch": batch,
                        "fisher_samples": None}, "EWC", {"ewc_lambda": lam * batch / 2})


def lwf_pair(alpha: float, temperature: float) -> Pair:
    """Avalanche's KL has no T^2 factor."""
    return Pair("lwf", {"alpha": alpha, "temperature": temperature},
                "LwF", {"alpha": alpha * temperature ** 2, "temperature": temperature})


def replay_pair(memory: int) -> Pair:
    """Memory split equally over the tasks seen; a memory minibatch of the batch size with
    each batch."""
    return Pair("replay", {"memory": memory, "selection": "per-task", "mix": "batch"},
                "Replay", {"mem_size": memory})


def agem_pair(per_task: int, ref_batch: int, classes_per_task: int) -> Pair:
    """`per_task` random samples per task; `ref_batch` memory samples per reference gradient."""
    return Pair("agem", {"memory": None, "per_class": per_task // classes_per_task,
                         "selection": "per-task", "ref_batch_size": ref_batch},
                "AGEM", {"patterns_per_exp": per_task, "sample_size": ref_batch})


def gem_pair(per_task: int, margin: float, classes_per_task: int) -> Pair:
    """Avalanche's GEM trains on the task's data alone: rehearse=False."""
    return Pair("gem", {"memory": None, "per_class": per_task // classes_per_task,
                        "margin": margin, "rehearse": False},
                "GEM", {"patterns_per_exp": per_task, "memory_strength": margin})


def der_pair(memory: int, alpha: float, lr: float) -> Pair:
    """DER (Avalanche's with beta=0) trained at `lr` in both: alpha * MSE to stored logits on a
    memory minibatch of the batch size. The memories differ by design: cfbench keeps Buzzega et
    al.'s reservoir with the logits of the step that stored a sample; Avalanche 0.6.0 a
    class-balanced memory filled at the end of each experience with the logits then (one of the
    deviations its code lists)."""
    return Pair("der", {"memory": memory, "alpha": alpha},
                "DER", {"mem_size": memory, "alpha": alpha, "beta": 0.0}, {"lr": lr})


@dataclasses.dataclass(frozen=True)
class Scene:
    """One scenario of a workload, built alike in both systems."""

    name: str
    """cfbench's scenario (and the key of its rows)."""
    title: str
    setting: str
    tasks: int
    classes_per_task: int
    classic: str
    """Avalanche's classic benchmark of it."""
    train_samples: int | None = None
    """Training samples per task (the first ones; None: all)."""

    def size(self, quick: bool) -> dict[str, Any]:
        """The options of its builder (and of its classic and tensor streams)."""
        cut = {"train_samples": self.train_samples} if self.train_samples else {}
        return {"tasks": self.tasks, "fraction": QUICK["fraction"] if quick else 1.0, **cut}


@dataclasses.dataclass(frozen=True)
class Workload:
    """A protocol, the scenarios it runs on, the strategies in both conventions, and where its
    results go."""

    name: str
    protocol: dict[str, Any]
    scenes: tuple[Scene, ...]
    pairs: Callable[[Scene], dict[str, Pair]]
    out: Path

    def strategies(self) -> list[str]:
        return list(self.pairs(self.scenes[0]))


SPLIT = Scene("split-mnist", "Split MNIST", "class", 5, 2, "SplitMNIST")
PERMUTED = Scene("permuted-mnist", "Permuted MNIST", "domain", 3, 10, "PermutedMNIST", 10_000)


def compute_bound_pairs(scene: Scene) -> dict[str, Pair]:
    return {"naive": Pair("naive", {}, "Naive", {}), "ewc": ewc_pair(1000.0, 128),
            "lwf": lwf_pair(1.0, 2.0), "replay": replay_pair(500),
            "agem": agem_pair(250, 256, scene.classes_per_task),
            "gem": gem_pair(256, 0.5, scene.classes_per_task),
            "cumulative": Pair("joint", {}, "Cumulative", {})}


def small_batch_pairs(scene: Scene) -> dict[str, Pair]:
    return {"naive": Pair("naive", {}, "Naive", {}), "ewc": ewc_pair(10.0, 10),
            "lwf": lwf_pair(1.0, 2.0), "replay": replay_pair(500), "der": der_pair(500, 0.5, 0.03),
            "agem": agem_pair(250, 256, scene.classes_per_task)}


WORKLOADS = {
    "compute-bound": Workload(
        "compute-bound", {"model": "mlp:400,400", "epochs": 1, "batch_size": 128,
                          "optimizer": "adam", "lr": 1e-3, "eval_batch_size": 4096,
                          "class_scope": "all", "reset_optimizer": False},
        (SPLIT,), compute_bound_pairs, OUT),
    "small-batch": Workload(
        "small-batch", {"model": "mlp:100,100", "epochs": 1, "batch_size": 10,
                        "optimizer": "sgd", "lr": 0.1, "eval_batch_size": 4096,
                        "class_scope": "all"},
        (SPLIT, PERMUTED), small_batch_pairs, OUT.with_name("vs_avalanche_small_batch.json")),
}


def _cut(base: Scenario, tasks: int, fraction: float, train_samples: int | None = None
         ) -> Scenario:
    """`base`'s first `tasks` tasks, each split cut to its first `fraction` of samples (and its
    training split to at most its first `train_samples`)."""
    def cut(t: Task) -> Task:
        n, m = round(len(t.y_train) * fraction), round(len(t.y_test) * fraction)
        n = min(n, train_samples or n)
        return dataclasses.replace(t, x_train=t.x_train[:n], y_train=t.y_train[:n],
                                   x_test=t.x_test[:m], y_test=t.y_test[:m])

    return dataclasses.replace(base, tasks=[cut(t) for t in base.tasks[:tasks]])


def workload(*, data_root: Path, seed: int, tasks: int = 5, fraction: float = 1.0) -> Scenario:
    """split-mnist's first `tasks` tasks, each split cut to its first `fraction` of samples."""
    from cfbench.scenarios.mnist import split_mnist

    return _cut(split_mnist(data_root=data_root, seed=seed), tasks, fraction)


def permuted_workload(*, data_root: Path, seed: int, tasks: int = 3, fraction: float = 1.0,
                      train_samples: int | None = None) -> Scenario:
    """permuted-mnist's (10 tasks, cached in the data root) first `tasks` tasks, each split cut
    to its first `fraction` of samples and the training split to its first `train_samples`."""
    from cfbench.scenarios.mnist import permuted_mnist

    return _cut(permuted_mnist(data_root=data_root, seed=seed), tasks, fraction, train_samples)


BUILDERS = {SPLIT.name: workload, PERMUTED.name: permuted_workload}


def run_cfbench(pair: Pair, scene: Scene, seed: int, size: dict[str, Any],
                protocol: dict[str, Any], stack: int = 0) -> dict[str, Any]:
    """One cfbench run, or with `stack` K the runs of seeds seed .. seed+K-1 as one stacked job
    (seconds per run: the job's over K), or why they cannot stack."""
    from cfbench import registry
    from cfbench.batched import can_batch, execute_batched
    from cfbench.data import data_root
    from cfbench.experiment import execute, plan_runs

    name = f"vs-avalanche-{scene.name}"
    registry.register_scenario(name, family="benchmark",
                               reference="benchmarks/vs_avalanche.py")(BUILDERS[scene.name])
    root = data_root()
    configs = plan_runs(scenario=name, settings=[scene.setting], strategies=[pair.ours],
                        hparams={pair.ours: pair.ours_hp} if pair.ours_hp else {},
                        seeds=range(seed, seed + max(stack, 1)), scenario_options=size,
                        protocol_overrides={**protocol, **pair.protocol}, data_root=root)
    if not stack:
        records = [execute(configs[0], root)]
    elif (reason := can_batch(configs[0])) is not None:
        return {"not_stacked": reason}
    else:
        records = execute_batched(configs, root)
    failed = [r for r in records if r.status != "ok"
              or r.cost.get("stacked_runs", 1) != max(stack, 1)]  # a job abandoned
    if failed:
        raise RuntimeError(f"cfbench run failed or did not stack: {failed[0].error}")
    runs = len(records)
    return {"train_s": sum(r.cost["train_seconds"] for r in records) / runs,
            "eval_s": sum(r.cost["eval_seconds"] for r in records) / runs,
            "R": records[0].R, "accs": [sum(r.R[-1]) / len(r.R[-1]) for r in records]}


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


def classic_streams(data_root: Path, *, tasks: int = 5, fraction: float = 1.0,
                    train_samples: int | None = None, scene: Scene = SPLIT
                    ) -> tuple[Sequence[Any], Sequence[Any]]:
    """Avalanche's classic benchmark of `scene` (train and test streams) as its users build it,
    on the MNIST files in `data_root`; fewer tasks, a fraction or fewer training samples keep
    the samples cfbench's cut keeps."""
    from avalanche.benchmarks import benchmark_from_datasets, with_task_labels
    from avalanche.benchmarks.classic import PermutedMNIST, SplitMNIST

    with tempfile.TemporaryDirectory(prefix="vs-avalanche-") as tmp:
        torchvision_layout(data_root / "mnist", Path(tmp))
        if scene.classic == "SplitMNIST":  # loads every file now
            bench = SplitMNIST(n_experiences=SPLIT.tasks, fixed_class_order=list(range(10)),
                               return_task_id=False, dataset_root=tmp)
        else:
            bench = PermutedMNIST(n_experiences=tasks, seed=0, return_task_id=False,
                                  dataset_root=tmp)
    if fraction == 1.0 and tasks == len(bench.train_stream) and train_samples is None:
        return bench.train_stream, bench.test_stream

    def cut(stream: Sequence[Any], assignment: list[list[int]], most: int | None
            ) -> list[Any]:
        """Each experience's first samples in MNIST's order (its dataset is sorted by class),
        the samples cfbench's cut keeps."""
        kept = []
        for experience, indices in zip(list(stream)[:tasks], assignment[:tasks], strict=True):
            order = sorted(range(len(indices)), key=indices.__getitem__)
            n = round(len(order) * fraction)
            kept.append(experience.dataset.subset(order[:min(n, most or n)]))
        return kept

    small = with_task_labels(benchmark_from_datasets(
        train=cut(bench.train_stream, bench.train_exps_patterns_assignment, train_samples),
        test=cut(bench.test_stream, bench.test_exps_patterns_assignment, None)))
    return small.train_stream, small.test_stream


def tensor_streams(data_root: Path, *, scene: Scene = SPLIT, **size: Any
                   ) -> tuple[Sequence[Any], Sequence[Any]]:
    """cfbench's own tensors of `scene`, normalised once, with the setting's targets, as an
    Avalanche benchmark."""
    from avalanche.benchmarks import tensors_benchmark

    from cfbench.scenario import Setting

    scenario = BUILDERS[scene.name](data_root=data_root, seed=0, **size)
    setting = Setting(scenario, scene.setting)

    def tensors(split: str) -> list[list[Any]]:
        return [[scenario.prepare(getattr(t, f"x_{split}")),
                 setting.targets(getattr(t, f"y_{split}"))] for t in scenario.tasks]

    bench = tensors_benchmark(train_tensors=tensors("train"), test_tensors=tensors("test"),
                              task_labels=[0] * len(scenario.tasks))
    return bench.train_stream, bench.test_stream


def run_avalanche(pair: Pair, scene: Scene, seed: int, size: dict[str, Any],
                  protocol: dict[str, Any], feed: str, eval_mb_size: int | None
                  ) -> dict[str, Any]:
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
        train_stream, test_stream = classic_streams(data_root(), scene=scene, **size)
        evaluator = EvaluationPlugin(default_evaluator().metrics, loggers=[])
    else:
        train_stream, test_stream = tensor_streams(data_root(), scene=scene, **size)
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    protocol = {**protocol, **pair.protocol}
    torch.manual_seed(seed)  # the initial weights cfbench's run seed gives
    random.seed(seed)
    np.random.seed(seed)
    model = build_model(protocol["model"], MNIST_SHAPE, MNIST_CLASSES)
    optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[protocol["optimizer"]]
    strategy = getattr(supervised, pair.theirs)(
        model=model, optimizer=optimizer(model.parameters(), lr=protocol["lr"]),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=protocol["batch_size"],
        train_epochs=protocol["epochs"], eval_mb_size=eval_mb_size, device="cpu",
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
    return {**seconds, "R": R, "accs": [sum(R[-1]) / len(R[-1])]}


def scenes(args: argparse.Namespace) -> list[Scene]:
    """The requested workload's scenes, sized by --quick, --permuted-tasks and
    --permuted-samples."""
    sized = [dataclasses.replace(s, tasks=args.permuted_tasks,
                                 train_samples=args.permuted_samples) if s is PERMUTED else s
             for s in WORKLOADS[args.workload].scenes]
    return [dataclasses.replace(s, tasks=QUICK["tasks"]) if args.quick else s for s in sized]


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints its result as one JSON line after MARKER."""
    import torch

    torch.set_num_threads(args.threads)
    chosen = WORKLOADS[args.workload]
    scene = next(s for s in scenes(args) if s.name == args.scene)
    pair = chosen.pairs(scene)[args.strategy]
    size = scene.size(args.quick)
    if args.worker in ("cfbench", STACKED):
        result = run_cfbench(pair, scene, args.seed, size, chosen.protocol,
                             args.stack if args.worker == STACKED else 0)
    else:
        feed = next(f for f, system in FEEDS.items() if system == args.worker)
        result = run_avalanche(pair, scene, args.seed, size, chosen.protocol, feed,
                               args.avalanche_eval_mb_size)
    print(MARKER + json.dumps(result, allow_nan=False), flush=True)


def spawn(system: str, scene: Scene, strategy: str, seed: int, args: argparse.Namespace
          ) -> dict[str, Any]:
    """One run in a fresh subprocess of this script, with `threads` OpenMP and torch threads."""
    threads = str(args.threads)
    command = [sys.executable, "-m", "benchmarks.vs_avalanche", "--worker", system,
               "--workload", args.workload, "--scene", scene.name, "--strategy", strategy,
               "--seed", str(seed), "--threads", threads, "--stack", str(args.stack),
               "--permuted-tasks", str(args.permuted_tasks),
               "--permuted-samples", str(args.permuted_samples)]
    if args.avalanche_eval_mb_size:
        command += ["--avalanche-eval-mb-size", str(args.avalanche_eval_mb_size)]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run(command + (["--quick"] if args.quick else []), cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{system} {scene.name} {strategy} seed {seed} failed (exit "
                           f"{done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARKER):])
    run = {"system": system, "scenario": scene.name, "strategy": strategy, "seed": seed,
           **result}
    if "not_stacked" in result:
        return run
    accs = run.pop("accs")
    run.update(total_s=run["train_s"] + run["eval_s"], acc=sum(accs) / len(accs))
    if system == STACKED:
        run.update(stacked_runs=len(accs), acc_sd=statistics.stdev(accs) if len(accs) > 1
                   else 0.0)
    return run


def summarise(runs: list[dict[str, Any]], strategies: list[str]) -> list[dict[str, Any]]:
    """Per strategy and system that ran (runs of one scenario): the fastest run's seconds and
    the final ACC over seeds; and per Avalanche feed, its fastest seconds over cfbench's
    (``speedup``) and over the stacked runs' per-run seconds (``stacked_speedup``). A strategy
    that does not stack gets ``{"not_stacked": reason}`` in the stacked column, and the stacked
    runs say whether the first seed's R is the single run's (``same_as_single``)."""
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in runs)]
    feeds = [s for s in systems if s in FEEDS.values()]
    rows = []
    for name in strategies:
        row: dict[str, Any] = {"strategy": name}
        for system in systems:
            mine = [r for r in runs if r["strategy"] == name and r["system"] == system]
            if "not_stacked" in mine[0]:
                row[system] = {"not_stacked": mine[0]["not_stacked"]}
                continue
            best = min(mine, key=lambda r: r["total_s"])
            per_seed = {r["seed"]: r["acc"] for r in mine}
            row[system] = {"total_s": best["total_s"], "train_s": best["train_s"],
                           "eval_s": best["eval_s"],
                           "acc": sum(per_seed.values()) / len(per_seed)}
            if system == STACKED:
                single = {json.dumps(r["R"]) for r in runs if r["strategy"] == name
                          and r["system"] == "cfbench" and r["seed"] == mine[0]["seed"]}
                row[system].update(runs=best["stacked_runs"], acc_sd=best["acc_sd"],
                                   same_as_single=single == {json.dumps(r["R"]) for r in mine})
        row["speedup"] = {s: row[s]["total_s"] / row["cfbench"]["total_s"] for s in feeds}
        if "total_s" in row.get(STACKED, {}):
            row["stacked_speedup"] = {s: row[s]["total_s"] / row[STACKED]["total_s"]
                                      for s in feeds}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], classic: str = SPLIT.classic) -> str:
    """The table: seconds (train + eval) of each system, cfbench's speedup over each Avalanche
    feed next to it (single / stacked, with stacked runs), then the final ACC of each system
    (the stacked runs' mean ± sd over their seeds); below it, why a strategy did not stack, and
    any stacked job whose first seed's R is not its single run's."""
    feeds = list(rows[0]["speedup"])
    stacked = next((r[STACKED] for r in rows if "runs" in r.get(STACKED, {})), None)
    labels = {**LABELS, "avalanche-classic": f"Avalanche (classic {classic})"}
    if stacked is not None:
        labels[STACKED] = f"cfbench stacked x{stacked['runs']}, per run"
    systems = ["cfbench", *([STACKED] if STACKED in rows[0] else []), *feeds]

    def seconds(side: dict[str, Any]) -> str:
        if "not_stacked" in side:
            return "—"
        return f"{side['total_s']:.1f} ({side['train_s']:.1f} + {side['eval_s']:.1f})"

    def acc(side: dict[str, Any]) -> str:
        if "not_stacked" in side:
            return "—"
        spread = f" ± {100 * side['acc_sd']:.1f}" if "acc_sd" in side else ""
        return f"{100 * side['acc']:.1f}{spread}"

    head = ["strategy", *(f"{labels[s]} s (train + eval)" for s in systems if s not in feeds)]
    for feed in feeds:
        head += [f"{labels[feed]} s (train + eval)",
                 "speedup (single / stacked)" if len(systems) > len(feeds) + 1 else "speedup"]
    head += [f"ACC {labels[s]}" for s in systems]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reasons = []
    for r in rows:
        cells = [r["strategy"], *(seconds(r[s]) for s in systems if s not in feeds)]
        for feed in feeds:
            speedup = f"{r['speedup'][feed]:.1f}x"
            if STACKED in r:
                speedup += f" / {r['stacked_speedup'][feed]:.1f}x" if "stacked_speedup" in r \
                    else " / —"
            cells += [seconds(r[feed]), speedup]
        cells += [acc(r[s]) for s in systems]
        lines.append("| " + " | ".join(cells) + " |")
        if "not_stacked" in r.get(STACKED, {}):
            reasons.append(f"{r['strategy']} does not stack: {r[STACKED]['not_stacked']}")
        elif not r.get(STACKED, {}).get("same_as_single", True):
            reasons.append(f"{r['strategy']}: the stacked job's first seed differs from its "
                           "single run")
    return "\n".join(lines + ([""] + reasons if reasons else []))


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
    p.add_argument("--workload", choices=WORKLOADS, default="compute-bound",
                   help="compute-bound (MLP 400-400, Adam, batch 128, Split MNIST; default) or "
                        "small-batch (MLP 100-100, SGD 0.1, batch 10, Split and Permuted MNIST)")
    p.add_argument("--strategies", default=None,
                   help="comma-separated, from the workload's (default: all of them)")
    p.add_argument("--feed", choices=(*FEEDS, "both"), default="both",
                   help="how Avalanche gets its data: classic (its SplitMNIST, as its users run "
                        "it), tensors (cfbench's tensors) or both (default)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repetitions of every run; the fastest counts (default 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS and torch threads of every run (default 1)")
    p.add_argument("--stack", type=int, default=0, metavar="K",
                   help="also time cfbench running K seeds as one stacked job, per run "
                        "(default 0: not)")
    p.add_argument("--permuted-tasks", type=int, default=PERMUTED.tasks, metavar="T",
                   help=f"Permuted MNIST's tasks in the small-batch workload (default "
                        f"{PERMUTED.tasks}, at most 10)")
    p.add_argument("--permuted-samples", type=int, default=PERMUTED.train_samples, metavar="N",
                   help=f"training samples per Permuted-MNIST task, its first ones (default "
                        f"{PERMUTED.train_samples}; 60000: all)")
    p.add_argument("--avalanche-eval-mb-size", type=int, default=None, metavar="N",
                   help="Avalanche's evaluation batch size (default: its own default, the "
                        "training batch size; cfbench evaluates in batches of 4096)")
    p.add_argument("--quick", action="store_true",
                   help="2 tasks, 10%% of the data, no JSON: checks the script itself")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--scene", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace, strategies: list[str]) -> str | None:
    """What is wrong with the request, in one line, or None."""
    known = WORKLOADS[args.workload].strategies()
    unknown = [s for s in strategies if s not in known]
    if unknown or not strategies:
        return (f"unknown strategies {', '.join(unknown)} for the {args.workload} workload; "
                f"choose from {', '.join(known)}")
    if min(args.seeds, args.rounds, args.threads, args.avalanche_eval_mb_size or 1) < 1:
        return "--seeds, --rounds, --threads and --avalanche-eval-mb-size must be positive"
    if args.stack < 0 or args.stack == 1:
        return "--stack must be 0 (no stacked runs) or at least 2"
    if not 1 <= args.permuted_tasks <= 10:
        return "--permuted-tasks must be between 1 and 10"
    if not 1 <= args.permuted_samples <= 60_000:
        return "--permuted-samples must be between 1 and 60000"
    if _versions()["avalanche-lib"] == "not installed":
        return "Avalanche is not installed: pip install 'cfbench[peers]'"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    chosen = WORKLOADS[args.workload]
    strategies = ([s.strip() for s in args.strategies.split(",") if s.strip()]
                  if args.strategies is not None else chosen.strategies())
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
    systems = ["cfbench", *([STACKED] if args.stack else []),
               *(system for feed, system in FEEDS.items() if args.feed in (feed, "both"))]
    runs = []
    for round_ in range(args.rounds):
        for scene in scenes(args):
            for i, name in enumerate(strategies):
                for seed in range(args.seeds):
                    first = (round_ + i + seed) % len(systems)  # who goes first rotates
                    for system in systems[first:] + systems[:first]:
                        if system == STACKED and seed:
                            continue  # one stacked job of seeds 0..K-1 per round
                        run = spawn(system, scene, name, seed, args)
                        runs.append(run)
                        print(f"round {round_ + 1} {scene.name} {name} seed {seed} {system}: "
                              + (f"not stacked ({run['not_stacked']})" if "not_stacked" in run
                                 else f"{run['total_s']:.1f} s, ACC {100 * run['acc']:.1f}"),
                              file=sys.stderr)
    summary = {}
    for scene in scenes(args):
        rows = summarise([r for r in runs if r["scenario"] == scene.name], strategies)
        summary[scene.name] = rows
        size = "" if args.quick else f", {scene.tasks} tasks" + (
            f" of {scene.train_samples:,} training samples" if scene.train_samples else "")
        print(f"\n{scene.title}, {scene.setting} setting{size}\n")
        print(markdown(rows, scene.classic))
    if not args.quick:
        report = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workload": {"name": chosen.name, "protocol": chosen.protocol,
                         "scenarios": [{"scenario": s.name, "setting": s.setting,
                                        "tasks": s.tasks, "train_samples": s.train_samples}
                                       for s in scenes(args)]},
            "feeds": {s: SETUPS[s].format(classic=" / ".join(x.classic for x in chosen.scenes))
                      for s in systems if s in FEEDS.values()},
            "seeds": args.seeds, "rounds": args.rounds, "threads": args.threads,
            "stack": args.stack,
            "avalanche_eval_mb_size": args.avalanche_eval_mb_size or chosen.protocol["batch_size"],
            "versions": _versions(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "hyperparameters": {s.name: {name: dataclasses.asdict(chosen.pairs(s)[name])
                                         for name in strategies} for s in scenes(args)},
            "summary": summary, "runs": runs,
        }
        chosen.out.parent.mkdir(parents=True, exist_ok=True)
        partial = chosen.out.with_suffix(".json.partial")
        partial.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        partial.replace(chosen.out)
        print(f"\nwritten to {chosen.out.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
