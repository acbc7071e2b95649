"""Micro-benchmarks of the hot paths, at Split MNIST's sizes (MLP 784-400-400-10, about 478k
parameters, batch 128, class setting, one thread): a training step, the optimizer step with and
without the fused kernel, EWC's Fisher (closed form and vmap), the replay buffer's updates, and
A-GEM's and GEM's projections. Each checks what it computed, not only how long it took. The
evaluation is measured against its floor in ``test_eval_cost.py``.

    OMP_NUM_THREADS=1 pytest benchmarks/test_hot_paths.py -s --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cfbench.strategies.regularization as regularization
from cfbench.experiment import initial_model, plan_runs, training_scenario
from cfbench.memory import Memory
from cfbench.records import RunConfig
from cfbench.strategies.replay import AGEM, GEM, gem_project
from cfbench.strategy import Strategy, TrainContext, TrainData
from cfbench.train import make_optimizer, train_task

BATCH = 128
PRETRAIN_STEPS = 50
"""Steps per task for the model the projections are measured on (so past tasks conflict)."""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config(mnist_root: Path) -> RunConfig:
    (run,) = plan_runs(scenario="split-mnist", settings=["class"], strategies=["naive"],
                       hparams={}, seeds=[0], data_root=mnist_root,
                       protocol_overrides={"iterations": PRETRAIN_STEPS})
    return run


def fresh_context(config: RunConfig, root: Path) -> TrainContext:
    """An untrained model on Split MNIST (class setting), as the engine builds it for seed 0."""
    scenario, setting = training_scenario(config, root)
    model = initial_model(config, scenario, setting, torch.device("cpu"))
    return TrainContext.create(model, scenario, setting, seed=0)


@pytest.fixture(scope="module")
def trained(config, mnist_root: Path) -> TrainContext:
    """A model fine-tuned through tasks 1-4, about to train on task 5 (``task_index`` 4)."""
    ctx = fresh_context(config, mnist_root)
    for t in range(4):
        ctx.task_index = t
        train_task(ctx, Strategy(), ctx.scenario.tasks[t])
    ctx.task_index = 4
    return ctx


def params(ctx: TrainContext) -> list[torch.nn.Parameter]:
    return list(ctx.model.parameters())


def task_gradient(ctx: TrainContext, task: int) -> list[torch.Tensor]:
    """Leaves in every .grad the gradient of a 128-sample minibatch of `task`; returns copies."""
    batch = ctx.make_batch(ctx.task_data(task), torch.arange(BATCH))
    ctx.model.zero_grad(set_to_none=True)
    ctx.loss(ctx.logits(batch), batch).backward()
    return [p.grad.detach().clone() for p in params(ctx)]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def min_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls (the least noisy estimate on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_naive_training_step(benchmark, config, mnist_root):
    """One step as the loop takes it: batch, masked logits, cross-entropy, backward, Adam."""
    ctx = fresh_context(config, mnist_root)
    ctx.task_index = 0
    data = ctx.task_data(0)
    optimizer = make_optimizer(ctx.scenario.protocol, params(ctx))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:BATCH]

    def step() -> torch.Tensor:
        batch = ctx.make_batch(data, idx, augment=True)
        loss = ctx.loss(ctx.logits(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    first = step()
    last = benchmark(step)
    # Repeated steps on one minibatch fit it: the loss must have fallen far.
    assert last < 0.1 * first


def test_adam_step_as_built_versus_fused(benchmark, config, mnist_root):
    """The engine's Adam step by default (torch's foreach kernel) and with the protocol's
    ``fused_optimizer``, on the same gradients: the same update to float tolerance."""
    ctx = fresh_context(config, mnist_root)
    ctx.task_index = 0
    grads = task_gradient(ctx, 0)
    start = [p.detach().clone() for p in params(ctx)]
    twins = [torch.nn.Parameter(s.clone()) for s in start]
    for twin, g in zip(twins, grads, strict=True):
        twin.grad = g.clone()
    built = make_optimizer(ctx.scenario.protocol, params(ctx))
    fused = make_optimizer(dataclasses.replace(ctx.scenario.protocol, fused_optimizer=True),
                           twins)
    assert fused.defaults["fused"] and not built.defaults["fused"]
    for _ in range(3):
        built.step()
        fused.step()
    for p, twin, before in zip(params(ctx), twins, start, strict=True):
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-5, atol=1e-7)
        assert not torch.equal(p.detach(), before)
    fused_s = min_seconds(fused.step, 200)
    benchmark(built.step)
    ratio = benchmark.stats.stats.min / fused_s
    print(f"\nAdam step: as built {1e3 * benchmark.stats.stats.min:.3f} ms, fused "
          f"{1e3 * fused_s:.3f} ms (x{ratio:.1f})")
    benchmark.extra_info.update(fused_seconds=fused_s, ratio=ratio)


def test_fisher_closed_form_versus_vmap(benchmark, trained, monkeypatch):
    """EWC's diagonal Fisher at task end (default: 1024 samples, sampled labels): the closed
    form for Linear layers and the vmap fallback agree, and the closed form is far faster."""
    ctx = trained

    def fisher() -> dict[str, torch.Tensor]:
        ctx.generator.manual_seed(0)  # the same samples and sampled labels for both paths
        return regularization.diagonal_fisher(ctx, 3, samples=1024, labels="sampled")

    closed = benchmark.pedantic(fisher, rounds=5, iterations=1, warmup_rounds=1)
    monkeypatch.setattr(regularization, "squared_grads_linear", lambda *args: None)
    start = time.perf_counter()
    vmapped = fisher()
    vmap_s = time.perf_counter() - start
    monkeypatch.undo()
    assert closed.keys() == vmapped.keys() == dict(ctx.model.named_parameters()).keys()
    for name in closed:
        torch.testing.assert_close(closed[name], vmapped[name], rtol=1e-4, atol=1e-9)
    assert all(bool((f >= 0).all()) for f in closed.values())
    assert sum(float(f.sum()) for f in closed.values()) > 0
    ratio = vmap_s / benchmark.stats.stats.min
    print(f"\nFisher (1024 samples): closed form {1e3 * benchmark.stats.stats.min:.1f} ms, "
          f"vmap {1e3 * vmap_s:.1f} ms (x{ratio:.0f})")
    benchmark.extra_info.update(vmap_seconds=vmap_s, ratio=ratio)
    assert ratio > 5


def numbered(data: TrainData) -> TrainData:
    """The task's samples with ``task`` replaced by each sample's position: a stored sample's
    ``task`` says which one it is."""
    return TrainData(data.x, data.y, torch.arange(len(data.y)))


def test_reservoir_add_stream(benchmark, config, mnist_root):
    """A 128-sample stream minibatch offered to a full 500-slot reservoir (algorithm R)."""
    ctx = fresh_context(config, mnist_root)
    stream = numbered(ctx.task_data(0))
    memory = Memory(selection="reservoir", memory=500)
    offered = 0

    def offer() -> None:
        nonlocal offered
        idx = slice(offered, offered + BATCH)
        memory.add_stream(TrainData(stream.x[idx], stream.y[idx], stream.task[idx]),
                          ctx.generator)
        offered += BATCH

    for _ in range(4):
        offer()  # full: every further offer is the replacement path
    rounds = 60
    benchmark.pedantic(offer, rounds=rounds, iterations=1)
    assert memory.seen == offered == (4 + rounds) * BATCH and len(memory) == 500
    which = memory.data.task
    assert len(which.unique()) == 500  # no sample stored twice
    assert torch.equal(memory.data.x, stream.x[which])
    assert torch.equal(memory.data.y, stream.y[which])
    # A uniform sample of the stream: about half of it from the stream's second half
    # (binomial-like, sd about 11).
    late = int((which >= offered // 2).sum())
    assert 200 < late < 300, late


def test_class_balanced_selection_at_task_end(benchmark, config, mnist_root):
    """The end-of-task rebuild of a 500-sample class-balanced memory when task 5 arrives:
    every class of the ten ends with 50 slots."""
    ctx = fresh_context(config, mnist_root)

    def memory_after_four_tasks() -> tuple[tuple, dict]:
        memory = Memory(selection="class-balanced", memory=500)
        for t in range(4):
            memory.add_task(ctx.task_data(t), ctx.generator)
        return (memory, ctx.task_data(4), ctx.generator), {}

    memory = None

    def add_last(buffer: Memory, data: TrainData, generator: torch.Generator) -> None:
        nonlocal memory
        buffer.add_task(data, generator)
        memory = buffer

    benchmark.pedantic(add_last, setup=memory_after_four_tasks, rounds=10, iterations=1)
    assert len(memory) == 500
    assert torch.bincount(memory.data.y, minlength=10).tolist() == [50] * 10
    task_of = torch.zeros(10, dtype=torch.long)
    for t, task in enumerate(ctx.scenario.tasks):
        task_of[list(task.classes)] = t
    assert torch.equal(memory.data.task, task_of[memory.data.y])


def test_agem_projection(benchmark, trained):
    """``AGEM.after_backward`` (the reference gradient and the projection) on task 5's
    minibatch gradient and a reference gradient of its class-balanced memory of task 4, the
    task just learned, which task 5's gradient opposes: the update loses exactly its component
    along the reference direction."""
    ctx = trained
    agem = AGEM()
    ctx.task_index = 3
    agem.after_task(ctx, ctx.scenario.tasks[3])
    ctx.task_index = 4
    batch = ctx.make_batch(ctx.task_data(4), torch.arange(BATCH))
    state = ctx.generator.get_state()
    ref = agem.reference(ctx)
    g = task_gradient(ctx, 4)
    dot = float(flat(g) @ flat(ref))
    assert dot < 0  # the constraint is violated: the projection does its work

    def restore() -> tuple[tuple, dict]:
        for p, grad in zip(params(ctx), g, strict=True):
            p.grad.copy_(grad)
        ctx.generator.set_state(state)  # the same reference samples every round
        return (ctx, batch), {}

    benchmark.pedantic(agem.after_backward, setup=restore, rounds=50, iterations=1)
    projected, r = flat([p.grad for p in params(ctx)]), flat(ref)
    expected = flat(g) - dot / float(r @ r) * r
    torch.testing.assert_close(projected, expected, rtol=1e-4,
                               atol=1e-5 * float(expected.abs().max()))
    assert abs(float(projected @ r)) < 1e-4 * abs(dot)


def test_gem_projection_four_past_tasks(benchmark, trained):
    """``gem_project`` with GEM's own per-task memory gradients of tasks 1-4 (4 rows of ~478k
    parameters) and task 5's minibatch gradient: after projection no past task's loss rises to
    first order, and the update moved."""
    ctx = trained
    gem = GEM()
    for t in range(4):
        ctx.task_index = t
        gem.after_task(ctx, ctx.scenario.tasks[t])
    ctx.task_index = 4
    G, g = gem.past_gradients(ctx), flat(task_gradient(ctx, 4))
    assert G.shape == (4, sum(p.numel() for p in params(ctx)))
    assert bool((G @ g < 0).any())  # violated
    projected = benchmark(gem_project, G, g, gem.margin)
    assert not torch.equal(projected, g)
    scale = G.norm(dim=1) * projected.norm()
    assert bool((G @ projected >= -1e-4 * scale).all()), G @ projected
    # The dual variables are at least the margin: every past gradient is added in.
    v = torch.linalg.lstsq(G.double().T, (projected - g).double().unsqueeze(1)).solution
    assert bool((v.squeeze(1) >= gem.margin - 1e-3).all()), v
    assert F.cosine_similarity(projected, g, dim=0) > 0  # still a step on the new task
