"""Does compiling the whole training step pay on this CPU for the small-batch protocol?

The protocol of `test_stacked_grid` (MLP 784-100-100-10, SGD, batch 10) at lr 0.05 on Split
MNIST's first task (its normalised images in memory), one torch thread. Three forms of the same
step (forward, cross-entropy, backward, SGD update; naive training has no penalty) run side by
side on the same minibatches, alternating over `ROUNDS` rounds, fastest round kept:

- the eager bare loop: ``model(x)``, ``loss.backward()``, ``torch.optim.SGD.step()``,
  ``zero_grad``;
- the functional step ``params -> new params`` (``torch.func.functional_call`` inside
  ``torch.func.grad``, then the SGD update) run eagerly, which separates the functional form's
  own cost from what compilation gains;
- that step under ``torch.compile(fullgraph=True)`` in each of `MODES`.

Compilation is charged as a user pays it: the first call of a freshly compiled step is timed on
its own. The first round compiles into an empty inductor cache (cold, a first run); later rounds
reset dynamo and hit the on-disk cache (warm, a rerun). Inductor's start-up, paid once per
process before its first compile, is timed apart: with an empty cache (charged to a first run)
and in a new process whose cache is filled (charged to a rerun). Break-even is those seconds
over the saving per step against the bare loop, "never" without a saving, set against the
steps of one epoch of the first task and of a run of one epoch per task at batch 10; each
compiled mode says whether it pays within such a run. Speed is reported, not asserted;
correctness is: every step form's parameters after `CHECK_STEPS` steps match the bare loop's.
Inductor on the CPU needs a C++ compiler; when the default mode cannot compile, the benchmark
fails with the reason in one line (another mode's failure is a line of the table).

    OMP_NUM_THREADS=1 pytest benchmarks/test_compiled_step.py -s
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from torch.nn import functional as F

from benchmarks.test_stacked_grid import PROTOCOL
from cfbench.experiment import load_scenario
from cfbench.models import build_model

ROUNDS = 3
STEPS = 2000
CHECK_STEPS = 20
LR = 0.05
MODES = ("default", "max-autotune-no-cudagraphs")
RTOL, ATOL = 1e-5, 1e-6
"""Tolerance of the compiled step's parameters against the bare loop's: compiled kernels may
sum in another order, so agreement to float32 rounding, not bitwise."""

Params = dict[str, torch.Tensor]
Step = Callable[[Params, torch.Tensor, torch.Tensor], Params]


def functional_sgd_step(model: nn.Module, lr: float) -> Step:
    """One SGD step as a pure function of the parameters, the form ``torch.compile`` can take
    whole (forward, loss, backward and update in one graph)."""

    def loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    grad = torch.func.grad(loss)

    def step(params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
        grads = grad(params, x, y)
        # Not torch.add(p, g, alpha=-lr), SGD's own form: inductor (torch 2.14, CPU) fuses that
        # add into the weight gradient's matmul and drops alpha, a silent wrong update.
        return {k: p - lr * grads[k] for k, p in params.items()}

    return step


def bare_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor
              ) -> float:
    """The eager bare loop over `batches` (rows of indices); seconds."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    start = time.perf_counter()
    for idx in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    return time.perf_counter() - start


def step_loop(step: Step, params: Params, x: torch.Tensor, y: torch.Tensor,
              batches: torch.Tensor) -> tuple[Params, float]:
    """`step` over `batches`: the final parameters and seconds."""
    start = time.perf_counter()
    for idx in batches:
        params = step(params, x[idx], y[idx])
    return params, time.perf_counter() - start


def one_line(exc: BaseException) -> str:
    """The innermost cause of a compile failure, in one line (inductor's own are pages long)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def start_up_seconds() -> float:
    """Inductor's start-up (imports, compile workers, its C++ prelude): a trivial compile."""
    begin = time.perf_counter()
    torch.compile(lambda t: t * 2 + 1, fullgraph=True)(torch.ones(3))
    return time.perf_counter() - begin


def rerun_start_up_seconds(cache: Path) -> float:
    """`start_up_seconds` in a new process whose inductor cache is `cache`."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1); "
            "from benchmarks.test_compiled_step import start_up_seconds; "
            "print(start_up_seconds())")
    child = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1])],
                           env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)},
                           capture_output=True, text=True, check=True)
    return float(child.stdout.split()[-1])


def compile_failed(reason: str) -> NoReturn:
    """Fail, not skip: a machine that cannot compile cannot answer the question."""
    pytest.fail(f"torch.compile (inductor, CPU) failed: {reason}; it needs a working C++ "
                "compiler (gcc) and a writable cache directory", pytrace=False)


def test_compiled_training_step_against_the_bare_loop(benchmark, mnist_root: Path,
                                                      tmp_path: Path):
    scenario = load_scenario("split-mnist", {}, 0, mnist_root, "cpu")
    task = scenario.tasks[0]
    x, y = scenario.prepare(task.x_train), task.y_train
    batch = PROTOCOL["batch_size"]
    batches = torch.randint(len(y), (STEPS, batch), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(PROTOCOL["model"], scenario.input_shape, 10)
    start: Params = {k: p.detach().clone() for k, p in model.named_parameters()}

    def fresh_model() -> nn.Module:
        model.load_state_dict(start)
        return model

    def fresh_params() -> Params:
        return {k: p.clone() for k, p in start.items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    step = functional_sgd_step(model, LR)
    names = ["bare loop (eager)", "functional step (eager)", *(f"compiled, {m}" for m in MODES)]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    compile_s: dict[str, list[float]] = {f"compiled, {m}": [] for m in MODES}
    failed: dict[str, str] = {}
    after: dict[str, Params] = {}

    def one_round() -> None:
        seconds[names[0]].append(bare_loop(fresh_model(), x, y, batches))
        seconds[names[1]].append(step_loop(step, fresh_params(), x, y, batches)[1])
        for mode in MODES:
            name = f"compiled, {mode}"
            if name in failed:
                continue
            torch._dynamo.reset()
            # Each mode its own cache: empty in the first round, on disk only after (a rerun).
            with temporary_cache_dir(str(tmp_path / mode)):
                compiled = torch.compile(step, fullgraph=True, mode=mode)
                first = time.perf_counter()
                try:
                    params = compiled(fresh_params(), x[batches[0]], y[batches[0]])
                except Exception as exc:  # reported, or the test fails on it below
                    failed[name] = one_line(exc)
                    continue
                compile_s[name].append(time.perf_counter() - first)
                seconds[name].append(step_loop(compiled, params, x, y, batches[1:])[1])
                after[name] = step_loop(compiled, fresh_params(), x, y,
                                        batches[:CHECK_STEPS])[0]

    try:
        # Paid once per process by whichever mode compiles first: timed apart, so that the
        # modes compare alike.
        with temporary_cache_dir(str(tmp_path / "start-up")):
            try:
                start_up = start_up_seconds()
            except Exception as exc:  # failed on below, without inductor's pages of context
                failed[f"compiled, {MODES[0]}"] = one_line(exc)
        if f"compiled, {MODES[0]}" in failed:
            compile_failed(failed[f"compiled, {MODES[0]}"])
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
        rerun_start_up = rerun_start_up_seconds(tmp_path / "start-up")
        bare_model = fresh_model()
        bare_loop(bare_model, x, y, batches[:CHECK_STEPS])
        after[names[0]] = {k: p.detach() for k, p in bare_model.named_parameters()}
        after[names[1]] = step_loop(step, fresh_params(), x, y, batches[:CHECK_STEPS])[0]
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()

    if f"compiled, {MODES[0]}" in failed:
        compile_failed(failed[f"compiled, {MODES[0]}"])
    reference = after[names[0]]
    print()
    for name in names[1:]:
        if name in failed:
            continue
        params = after[name]
        worst = max((params[k] - reference[k]).abs().max().item() for k in reference)
        print(f"{name}: max |param - bare loop's| after {CHECK_STEPS} steps = {worst:.2e}")
        assert all(torch.allclose(params[k], reference[k], rtol=RTOL, atol=ATOL)
                   for k in reference), name

    per_epoch = math.ceil(len(y) / batch)
    per_run = sum(math.ceil(len(t.y_train) / batch) for t in scenario.tasks)
    bare_ms = 1000 * min(seconds[names[0]]) / STEPS
    benchmark.extra_info.update(seconds=seconds, compile_seconds=compile_s, failed=failed,
                                start_up_seconds=[start_up, rerun_start_up])
    print(f"\n{STEPS} steps of batch {batch}, lr {LR}, 1 thread, best of {ROUNDS} rounds. "
          f"Inductor's start-up: {start_up:.1f} s on a first run, {rerun_start_up:.1f} s on a "
          f"rerun (a new process, its cache filled). At batch 10, an epoch of task 1 is "
          f"{per_epoch} steps, one of every task {per_run}.")
    print("| step | ms/step | x bare loop | compile s cold | compile s warm | break-even steps, "
          "first run (start-up + cold) | break-even steps, rerun (start-up + warm) |")
    print("|---|---|---|---|---|---|---|")
    verdicts = []
    for name in names:
        if name in failed:
            print(f"| {name} | failed: {failed[name]} | | | | | |")
            continue
        ms = 1000 * min(seconds[name]) / (STEPS - 1 if name in compile_s else STEPS)
        row = f"| {name} | {ms:.4f} | {ms / bare_ms:.2f} |"
        if name in compile_s:
            cold, warm = compile_s[name][0], min(compile_s[name][1:])
            saving = (bare_ms - ms) / 1000
            charged = (start_up + cold, rerun_start_up + warm)
            even = [s / saving if saving > 0 else math.inf for s in charged]
            row += f" {cold:.1f} | {warm:.1f} | " + " | ".join(
                "never" if e == math.inf else f"{e:,.0f}" for e in even) + " |"
            verdicts.append(f"{name}: " + "; ".join(
                f"{when}, {'pays' if e <= per_run else 'does not pay'} within a run of one "
                f"epoch per task ({e / per_run:.2f} such runs to break even)"
                for when, e in zip(("first run", "rerun"), even, strict=True)))
        else:
            row += " | | | |"
        print(row)
    print("\n".join(verdicts))
