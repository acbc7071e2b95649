"""The replay memory's selection rules, A-GEM's and GEM's projections, and replay, DER and
DER++ against naive fine-tuning on real Split MNIST."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from cfbench import registry
from cfbench.memory import Memory, batch_samples
from cfbench.scenario import Setting
from cfbench.strategies.replay import AGEM, DER, GEM, DERpp, Replay, gem_dual, gem_project
from cfbench.strategy import TrainContext, TrainData
from tests.helpers import run_one


def context(digits_root, setting: str = "class", **scenario_changes) -> TrainContext:
    scenario = registry.scenarios.get("split-digits").factory(data_root=digits_root, seed=0)
    scenario = dataclasses.replace(scenario, **scenario_changes)
    rules = Setting(scenario, setting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, rules.n_outputs))
    return TrainContext(model, scenario, rules, torch.device("cpu"),
                        torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))


def stream(n: int) -> TrainData:
    """n samples whose label is their position in the stream."""
    return TrainData(torch.zeros(n, 3, dtype=torch.uint8), torch.arange(n),
                     torch.zeros(n, dtype=torch.long))


# -- the memory ------------------------------------------------------------------------------

def test_reservoir_inclusion_is_uniform_over_the_stream():
    n, capacity, trials = 2000, 200, 300
    kept = torch.zeros(n)
    generator = torch.Generator().manual_seed(0)
    for _ in range(trials):
        memory = Memory(selection="reservoir", memory=capacity)
        data = stream(n)
        for start in range(0, n, 100):
            memory.add_stream(TrainData(*(t[start:start + 100] for t in
                                          (data.x, data.y, data.task))), generator)
        assert len(memory) == capacity and memory.seen == n
        labels = memory.data.y
        assert len(labels.unique()) == capacity  # no sample stored twice
        kept[labels] += 1
    # Every tenth of the stream, first to last, is kept with probability capacity / n = 0.1;
    # a count has a standard deviation of about 1.2% of its mean here, so 6% is ~5 sigma.
    rate = kept.view(10, -1).mean(1) / trials
    assert torch.allclose(rate, torch.full((10,), 0.1), rtol=0.06), rate


def test_reservoir_minibatches_equal_one_sample_at_a_time():
    data = stream(500)
    one = Memory(selection="reservoir", memory=64)
    gen = torch.Generator().manual_seed(3)
    for i in range(500):
        one.add_stream(TrainData(data.x[i:i + 1], data.y[i:i + 1], data.task[i:i + 1]), gen)
    batched = Memory(selection="reservoir", memory=64)
    gen = torch.Generator().manual_seed(3)
    for start in range(0, 500, 50):  # in a batch of 50, two samples often draw one slot
        batched.add_stream(TrainData(data.x[start:start + 50], data.y[start:start + 50],
                                     data.task[start:start + 50]), gen)
    assert torch.equal(one.data.y, batched.data.y)


def class_counts(memory: Memory) -> dict[int, int]:
    labels, counts = memory.data.y.unique(return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist(), strict=True))


def rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in x.reshape(len(x), -1).numpy()}


def test_class_balanced_memory_gives_each_seen_class_equal_slots_and_shrinks_old_ones(
        digits_root):
    ctx = context(digits_root)
    memory = Memory(selection="class-balanced", memory=100)
    before: dict[int, set[bytes]] = {}
    for t in range(5):
        data = ctx.task_data(t)
        memory.add_task(data, ctx.generator)
        counts = class_counts(memory)
        assert sorted(counts) == list(range(2 * t + 2))
        assert set(counts.values()) == {100 // (2 * t + 2)}
        for c in range(2 * t):  # an old class keeps a subset of what it had
            now = rows(memory.data.x[memory.data.y == c])
            assert now < before[c]
        before = {c: rows(memory.data.x[memory.data.y == c]) for c in counts}
        assert rows(memory.data.x[memory.data.task == t]) <= rows(data.x)


def test_per_class_capacity_keeps_k_of_every_class(digits_root):
    ctx = context(digits_root)
    memory = Memory(selection="class-balanced", per_class=7)
    for t in range(3):
        memory.add_task(ctx.task_data(t), ctx.generator)
    assert class_counts(memory) == {c: 7 for c in range(6)}


def test_per_task_memory_splits_capacity_equally_and_shrinks_as_tasks_arrive(digits_root):
    ctx = context(digits_root)
    memory = Memory(selection="per-task", memory=90)
    for t in range(5):
        memory.add_task(ctx.task_data(t), ctx.generator)
        tasks, counts = memory.data.task.unique(return_counts=True)
        assert tasks.tolist() == list(range(t + 1))
        assert counts.tolist() == [90 // (t + 1)] * (t + 1)  # 90, 45, 30, 22, 18


def test_fraction_keeps_that_share_of_every_past_task(digits_root):
    ctx = context(digits_root)
    memory = Memory(selection="per-task", fraction=0.05)
    for t in range(3):
        memory.add_task(ctx.task_data(t), ctx.generator)
    counts = memory.data.task.unique(return_counts=True)[1].tolist()
    assert counts == [round(0.05 * len(ctx.task_data(t))) for t in range(3)]


@pytest.mark.parametrize("setting", ["task", "domain", "class"])
def test_a_minibatch_maps_back_to_its_uint8_samples_and_global_labels(digits_root, setting):
    ctx = context(digits_root, setting, mean=0.1307, std=0.3081)
    data = ctx.task_data(3)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:200]
    back = batch_samples(ctx, ctx.make_batch(data, idx))
    assert torch.equal(back.x, data.x[idx])
    assert torch.equal(back.y, data.y[idx])
    assert torch.equal(back.task, data.task[idx])


# -- gradient projection ---------------------------------------------------------------------

def trained_on_task_0(digits_root, steps: int = 30) -> TrainContext:
    ctx = context(digits_root)
    data = ctx.task_data(0)
    optimizer = torch.optim.Adam(ctx.model.parameters(), lr=1e-2)
    ctx.task_index = 0
    for _ in range(steps):
        batch = ctx.make_batch(data, slice(None))
        optimizer.zero_grad()
        ctx.loss(ctx.logits(batch), batch).backward()
        optimizer.step()
    return ctx


def flat_grad(ctx: TrainContext) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in ctx.model.parameters()])


def test_agem_projects_a_conflicting_gradient_onto_the_reference_half_space(digits_root):
    ctx = trained_on_task_0(digits_root)
    agem = AGEM(per_class=20, ref_batch_size=40)
    agem.after_task(ctx, ctx.scenario.tasks[0])
    ctx.task_index = 1
    batch = ctx.make_batch(ctx.task_data(1), torch.arange(64))
    logits = ctx.logits(batch)
    ctx.model.zero_grad()
    ctx.loss(logits, batch).backward()
    raw = flat_grad(ctx)
    ref = reference(agem, ctx)
    assert raw @ ref < 0  # learning 2/3 in the class setting pushes 0/1 down
    agem.after_backward(ctx, batch)
    projected = flat_grad(ctx)
    assert projected @ ref >= -1e-5 * ref.norm() * projected.norm()
    expected = raw - (raw @ ref) / (ref @ ref) * ref
    torch.testing.assert_close(projected, expected, rtol=1e-4, atol=1e-7)


def reference(agem: AGEM, ctx: TrainContext) -> torch.Tensor:
    """The flat g_ref the next ``after_backward`` will use (it draws the same samples)."""
    state = ctx.generator.get_state()
    ref = torch.cat([r.reshape(-1) for r in agem.reference(ctx)])
    ctx.generator.set_state(state)
    return ref


def test_agem_leaves_an_agreeing_gradient_alone(digits_root):
    ctx = trained_on_task_0(digits_root, steps=2)
    agem = AGEM(per_class=20, ref_batch_size=40)
    agem.after_task(ctx, ctx.scenario.tasks[0])
    batch = ctx.make_batch(ctx.task_data(0), torch.arange(64))  # the same task: it agrees
    logits = ctx.logits(batch)
    ctx.model.zero_grad()
    ctx.loss(logits, batch).backward()
    raw = flat_grad(ctx).clone()
    assert raw @ reference(agem, ctx) > 0
    agem.after_backward(ctx, batch)
    assert torch.equal(flat_grad(ctx), raw)


def gem_after(digits_root, tasks: int, margin: float) -> tuple[GEM, TrainContext]:
    """GEM with memories of tasks 0..tasks-1 and the gradient of a minibatch of task `tasks`
    left in .grad."""
    ctx = trained_on_task_0(digits_root)
    gem = GEM(memory=120, margin=margin)
    for t in range(tasks):
        ctx.task_index = t
        gem.after_task(ctx, ctx.scenario.tasks[t])
    ctx.task_index = tasks
    batch = ctx.make_batch(ctx.task_data(tasks), torch.arange(64))
    logits = ctx.logits(batch)
    ctx.model.zero_grad()
    ctx.loss(logits, batch).backward()
    return gem, ctx


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_gem_projection_satisfies_every_past_task_constraint(digits_root, margin):
    gem, ctx = gem_after(digits_root, tasks=4, margin=margin)
    G = gem.past_gradients(ctx)
    raw = flat_grad(ctx).clone()
    assert (G @ raw < 0).any()  # some constraint is violated before
    gem.after_backward(ctx, ctx.make_batch(ctx.task_data(4), torch.arange(64)))
    projected = flat_grad(ctx)
    scale = G.norm(dim=1) * projected.norm()
    assert (G @ projected >= -1e-5 * scale).all(), G @ projected
    # The update is g + G'v with the dual solution v, which satisfies the KKT conditions of
    # min_{v >= margin} 1/2 v'GG'v + (Gg)'v: its gradient G(g + G'v) is >= 0, and 0 wherever
    # v is above the bound.
    v = torch.from_numpy(gem_dual(G, raw, margin)).float()
    torch.testing.assert_close(projected, raw + v @ G, rtol=1e-4, atol=1e-7)
    assert (v >= margin - 1e-9).all()
    slack = G.double() @ (raw.double() + v.double() @ G.double())
    free = v > margin + 1e-6
    assert free.any()
    assert (slack[free].abs() <= 1e-5 * scale[free]).all(), (v, slack)


def test_gem_leaves_a_gradient_that_violates_no_constraint_unchanged(digits_root):
    gem, ctx = gem_after(digits_root, tasks=3, margin=0.5)
    G = gem.past_gradients(ctx)
    # The least-norm vector with a dot product of 1 with every past task's gradient.
    agreeing = G.T @ torch.linalg.solve(G @ G.T, torch.ones(3))
    assert (G @ agreeing > 0.5).all()
    assert gem_project(G, agreeing, 0.5) is agreeing
    offsets = 0
    for p in ctx.model.parameters():  # as if the minibatch gradient were that vector
        p.grad.copy_(agreeing[offsets:offsets + p.numel()].view_as(p))
        offsets += p.numel()
    gem.after_backward(ctx, ctx.make_batch(ctx.task_data(3), torch.arange(64)))
    assert torch.equal(flat_grad(ctx), agreeing)


def test_gem_keeps_one_memory_per_past_task_split_equally(digits_root):
    gem, ctx = gem_after(digits_root, tasks=3, margin=0.5)
    assert [len(r) for r in gem._rows] == [40, 40, 40]
    assert gem.past_gradients(ctx).shape[0] == 3


# -- DER's penalty ---------------------------------------------------------------------------

def test_der_stores_full_logits_and_penalises_their_squared_change(digits_root):
    ctx = context(digits_root)
    ctx.task_index = 0
    der = DER(memory=50, alpha=2.0, replay_batch_size=50)
    batch = ctx.make_batch(ctx.task_data(0), torch.arange(50))
    logits = ctx.logits(batch)
    assert der.penalty(ctx, batch, logits) is None  # nothing stored yet
    assert len(der.buffer) == 0  # the penalty only reads: the reservoir is fed after backward
    der.after_backward(ctx, batch)
    # The full output, units of classes not yet seen included (the loop's logits mask them).
    full = ctx.model(batch.x).detach()
    assert torch.isinf(logits[:, 2:]).all()
    assert torch.equal(der.buffer.payload, full)
    assert der.penalty(ctx, batch, ctx.logits(batch)) == 0  # same network, same logits
    with torch.no_grad():
        ctx.model[-1].bias[:3].add_(0.5)
    term = der.penalty(ctx, batch, ctx.logits(batch))
    # Three of the ten units moved by 0.5: alpha * mean over samples and units of 0.25 * 3/10.
    torch.testing.assert_close(term, torch.tensor(2.0 * 0.25 * 3 / 10), rtol=1e-4, atol=1e-7)
    assert torch.equal(der.buffer.payload, full)
    der.after_backward(ctx, batch)
    assert not torch.equal(der.buffer.payload, full)  # the reservoir took some new logits


def test_derpp_adds_cross_entropy_on_a_second_memory_minibatch(digits_root):
    ctx = context(digits_root)
    ctx.task_index = 0
    derpp = DERpp(memory=50, alpha=2.0, beta=0.5, replay_batch_size=50)
    batch = ctx.make_batch(ctx.task_data(0), torch.arange(50))
    ctx.logits(batch)
    derpp.after_backward(ctx, batch)
    # The logits have not changed, so only beta * cross-entropy on the memory remains; the
    # memory holds exactly this minibatch, so its mean cross-entropy is the minibatch's.
    term = derpp.penalty(ctx, batch, ctx.logits(batch))
    expected = 0.5 * ctx.loss(ctx.logits(batch), batch)
    torch.testing.assert_close(term, expected, rtol=1e-5, atol=1e-6)


# -- training ------------------------------------------------------------------------------

# 30 steps per task (about a third of an epoch) keeps these runs short: naive has forgotten
# every earlier task by then, and each rehearsal strategy is well clear of the bar (measured
# with this seed: naive 0.19, replay 0.87, DER 0.78, DER++ 0.88; with a full epoch, naive
# 0.20, replay 0.85, DER 0.87).
BUDGET = {"iterations": 30}


@pytest.fixture(scope="module")
def naive_class_acc(mnist_root) -> float:
    return run_one(mnist_root, "split-mnist", "class", "naive", **BUDGET).metrics["acc"]


@pytest.mark.parametrize("strategy", ["replay", "der", "der++"])
def test_rehearsal_beats_naive_by_40_points_class_incremental(mnist_root, naive_class_acc,
                                                               strategy):
    record = run_one(mnist_root, "split-mnist", "class", strategy, **BUDGET)
    assert record.metrics["acc"] > naive_class_acc + 0.40, (record.metrics, naive_class_acc)


@pytest.mark.parametrize(("strategy", "hp", "copies"), [
    ("replay", {"selection": "per-task", "mix": "dataset"}, "oversample"),
    ("replay", {"selection": "per-task", "mix": "dataset", "oversample": False}, "once"),
    ("gem", {"rehearse": True}, "oversample"),
])
def test_dataset_mix_trains_an_epoch_over_task_and_memory(digits_root, strategy, hp, copies):
    record = run_one(digits_root, "split-digits", "class", strategy,
                     hparams={strategy: {"memory": 100, **hp}}, epochs=1)
    batch = 32  # the split-digits protocol
    sizes = [t["n_train"] for t in record.tasks]
    steps = math.ceil(sizes[0] / batch)
    for t in range(1, 5):
        repeat = max(sizes[t] // 100, 1) if copies == "oversample" else 1
        memory = (100 // t) * t
        steps += math.ceil((sizes[t] + repeat * memory) / batch)
    assert record.cost["steps"] == steps
    assert record.cost["state_bytes"] == (100 // 5) * 5 * (64 + 8 + 8)


@pytest.mark.parametrize(("strategy", "per_sample"), [
    ("replay", 64 + 8 + 8), ("der", 64 + 8 + 8 + 10 * 4), ("agem", 64 + 8 + 8)])
def test_state_bytes_are_the_buffers_bytes(digits_root, strategy, per_sample):
    hp = {"agem": {"per_class": 10}}.get(strategy, {"memory": 100})
    record = run_one(digits_root, "split-digits", "class", strategy,
                     hparams={strategy: hp}, iterations=5)
    assert record.cost["state_bytes"] == 100 * per_sample


@pytest.mark.parametrize(("factory", "kwargs", "named"), [
    (Replay, {"memory": 100, "per_class": 10}, "memory, per_class"),
    (Replay, {"memory": None}, "exactly one of memory"),
    (Replay, {"memory": -5}, "memory"),
    (Replay, {"memory": None, "per_class": 0}, "per_class"),
    (Replay, {"memory": None, "fraction": 1.5}, "fraction"),
    (Replay, {"memory": None, "per_class": 5}, "reservoir"),
    (Replay, {"replay_batch_size": -1}, "replay_batch_size"),
    (DER, {"memory": 0}, "memory"),
    (DER, {"alpha": -1.0}, "alpha"),
    (DERpp, {"beta": -0.5}, "beta"),
    (AGEM, {"ref_batch_size": 0}, "ref_batch_size"),
    (GEM, {"margin": -0.1}, "margin"),
    (GEM, {"memory": 100, "fraction": 0.1}, "memory, fraction"),
])
def test_bad_hyperparameters_are_rejected_by_name(factory, kwargs, named):
    with pytest.raises(ValueError, match=named):
        factory(**kwargs)


def test_replay_batch_only_reads_and_after_step_feeds_the_stream(digits_root):
    ctx = context(digits_root)
    ctx.task_index = 0
    replay = Replay(memory=50)
    stream = ctx.make_batch(ctx.task_data(0), torch.arange(20))
    assert replay.batch(ctx, stream) is stream  # an empty memory has nothing to mix in
    replay.after_step(ctx, stream)
    assert replay.buffer.seen == 20
    state = ctx.generator.get_state()
    mixed = replay.batch(ctx, stream)
    assert len(mixed.y) == 40 and replay.buffer.seen == 20  # the batch hook stored nothing
    ctx.generator.set_state(state)
    assert torch.equal(replay.batch(ctx, stream).x, mixed.x)  # the same draw, the same batch
