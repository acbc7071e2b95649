"""The importance-weighted quadratic family: consolidation rules against hand-computed tensors,
each importance estimate, and on real Split MNIST less drift than naive (and SI above naive)."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cfbench import registry
from cfbench.models import mlp
from cfbench.scenario import Setting
from cfbench.strategies.regularization import (
    EWC,
    L2,
    L2SP,
    MAS,
    SI,
    OnlineEWC,
    Quadratic,
    diagonal_fisher,
    output_sensitivity,
    squared_grads_linear,
)
from cfbench.strategy import TrainContext
from cfbench.train import train_task
from tests.helpers import run_one


class Vector(nn.Module):
    """One parameter `w`, for rules checked element by element."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values))


def penalty_grad(strategy: Quadratic, model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient the strategy alone adds at the model's current parameters."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    strategy.after_backward(SimpleNamespace(model=model), None)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_separate_consolidation_has_the_gradient_of_the_sum_of_per_task_quadratics():
    q = Quadratic(lam=2.0, gamma=None)
    omegas = [t(1.0, 0.0, 2.0, 0.0), t(3.0, 2.0, 0.0, 0.0)]
    anchors = [t(0.5, 1.0, -1.0, 7.0), t(1.5, 3.0, 4.0, 8.0)]
    for omega, anchor in zip(omegas, anchors, strict=True):
        q.consolidate({"w": omega}, {"w": anchor})
    # One quadratic: Omega = sum, anchor = Omega-weighted mean (latest where Omega is 0).
    torch.testing.assert_close(q.importance["w"], t(4.0, 2.0, 2.0, 0.0))
    torch.testing.assert_close(q.anchor["w"], t(1.25, 3.0, -1.0, 8.0))
    model = Vector([2.0, -1.0, 0.5, 3.0])
    expected = 2.0 * sum(o * (model.w.detach() - a) for o, a in zip(omegas, anchors,
                                                                     strict=True))
    torch.testing.assert_close(penalty_grad(q, model)["w"], expected)
    torch.testing.assert_close(expected, t(6.0, -16.0, 6.0, 0.0))


def test_online_consolidation_decays_by_gamma_and_anchors_at_the_latest_parameters():
    q = Quadratic(lam=1.0, gamma=0.5)
    q.consolidate({"w": t(2.0, 4.0)}, {"w": t(1.0, 1.0)})
    q.consolidate({"w": t(1.0, 0.0)}, {"w": t(3.0, -2.0)})
    torch.testing.assert_close(q.importance["w"], t(2.0, 2.0))  # 0.5 * (2, 4) + (1, 0)
    torch.testing.assert_close(q.anchor["w"], t(3.0, -2.0))
    torch.testing.assert_close(penalty_grad(q, Vector([4.0, 0.0]))["w"], t(2.0, 4.0))


def test_l2_toward_the_previous_task_replaces_its_anchor_with_unit_importance():
    l2 = L2(lam=3.0, anchor="previous-task")
    model = Vector([1.0, 2.0])
    assert penalty_grad(l2, model)["w"].abs().sum() == 0  # nothing to hold before a task
    ctx = SimpleNamespace(model=model)
    l2.after_task(ctx, None)
    with torch.no_grad():
        model.w.copy_(t(5.0, -1.0))  # the anchor is a copy, not a view of the parameter
    torch.testing.assert_close(penalty_grad(l2, model)["w"], 3.0 * t(4.0, -3.0))
    l2.after_task(ctx, None)
    with torch.no_grad():
        model.w.copy_(t(6.0, 1.0))
    # Replaced, not accumulated: importance stays 1, anchor is the second task's end.
    torch.testing.assert_close(penalty_grad(l2, model)["w"], 3.0 * t(1.0, 2.0))


def digits_context(digits_root, setting: str, **protocol) -> TrainContext:
    scenario = registry.scenarios.get("split-digits").factory(data_root=digits_root, seed=0)
    if protocol:
        scenario = dataclasses.replace(
            scenario, protocol=dataclasses.replace(scenario.protocol, **protocol))
    rules = Setting(scenario, setting)
    torch.manual_seed(0)
    return TrainContext.create(mlp(64, (32,), rules.n_outputs), scenario, rules, seed=0)


def test_l2_toward_zero_is_weight_decay(digits_root):
    ctx = digits_context(digits_root, "class")
    reference = copy.deepcopy(ctx.model)
    batch = ctx.make_batch(ctx.task_data(0), torch.arange(64))
    for model in (ctx.model, reference):
        ctx.loss(ctx.logits(batch, model), batch).backward()
    task_grads = [p.grad.clone() for p in ctx.model.parameters()]
    l2 = L2(lam=0.1)
    l2.setup(ctx)
    l2.after_backward(ctx, batch)
    for p, g in zip(ctx.model.parameters(), task_grads, strict=True):
        torch.testing.assert_close(p.grad, g + 0.1 * p.detach())
    # One step with it equals a step with torch's own weight_decay.
    torch.optim.SGD(ctx.model.parameters(), lr=0.5).step()
    torch.optim.SGD(reference.parameters(), lr=0.5, weight_decay=0.1).step()
    for ours, theirs in zip(ctx.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def move(model: nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_l2sp_group_strengths_and_head_apply_to_the_right_parameters(digits_root):
    ctx = digits_context(digits_root, "class")
    ctx.model = mlp(64, (32, 16), ctx.setting.n_outputs)  # body 1.* and 3.*, head 5.*
    l2sp = L2SP(alpha=0.1, beta=0.01, exclude_head=False, groups=("1.*=0.5", "*.bias=0"))
    l2sp.setup(ctx)
    start = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    move(ctx.model, 0.2)
    grads = penalty_grad(l2sp, ctx.model)

    def pulled(name: str, strength: float) -> None:
        torch.testing.assert_close(grads[name], torch.full_like(start[name], strength * 0.2))

    pulled("1.weight", 0.5)
    pulled("1.bias", 0.5)  # the first matching group wins over "*.bias=0"
    pulled("3.weight", 0.1)  # no group: alpha
    assert grads["3.bias"].abs().sum() == 0 and "3.bias" not in l2sp.anchor  # strength 0
    # The head decays toward zero, not toward its start; groups do not reach it.
    params = dict(ctx.model.named_parameters())
    for name in ("5.weight", "5.bias"):
        torch.testing.assert_close(grads[name], 0.01 * params[name].detach())
    free = L2SP(alpha=0.1, exclude_head=True)
    free.setup(ctx)
    move(ctx.model, 0.2)
    grads = penalty_grad(free, ctx.model)
    assert grads["5.weight"].abs().sum() == 0 and grads["5.bias"].abs().sum() == 0
    pulled("3.bias", 0.1)


def test_l2sp_rejects_a_group_that_matches_no_body_parameter(digits_root):
    ctx = digits_context(digits_root, "class")
    with pytest.raises(ValueError, match="groups"):
        L2SP(groups=("1.*=0.5", "3.*=1")).setup(ctx)  # 3.* is the head, not the body


def test_si_reads_the_gradient_before_its_penalty_and_integrates_the_actual_step(digits_root):
    ctx = digits_context(digits_root, "task")
    si = SI(lam=4.0)
    ctx.task_index = 0
    si.before_task(ctx, ctx.scenario.tasks[0])
    si.consolidate({n: torch.ones_like(p) for n, p in ctx.model.named_parameters()},
                   {n: p.detach() - 0.5 for n, p in ctx.model.named_parameters()})
    batch = ctx.make_batch(ctx.task_data(0), torch.arange(32))
    ctx.model.zero_grad()
    ctx.loss(ctx.logits(batch), batch).backward()
    task_grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters()}
    si.after_backward(ctx, batch)
    for name, p in ctx.model.named_parameters():
        torch.testing.assert_close(si.grad[name], task_grads[name])
        torch.testing.assert_close(p.grad, task_grads[name] + 4.0 * 0.5)
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.sub_(0.1 * p.grad)  # the optimizer's step
    si.after_step(ctx, batch)
    for name in task_grads:
        step = -0.1 * (task_grads[name] + 2.0)
        torch.testing.assert_close(si.path[name], -task_grads[name] * step)


def si_importances(digits_root, iterations: int, tasks: int) -> list[dict[str, torch.Tensor]]:
    """SI's importances after each of the first `tasks` tasks of `iterations` steps."""
    ctx = digits_context(digits_root, "task", iterations=iterations, epochs=None)
    si = SI()
    after = []
    for index in range(tasks):
        ctx.task_index = index
        train_task(ctx, si, ctx.scenario.tasks[index])
        after.append({n: o.clone() for n, o in si.importance.items()})
    return after


def total(importance: dict[str, torch.Tensor]) -> float:
    return sum(float(o.sum()) for o in importance.values())


def test_si_importances_are_nonzero_and_grow_with_training(digits_root):
    (short,) = si_importances(digits_root, iterations=10, tasks=1)
    assert all(torch.isfinite(o).all() and o.abs().sum() > 0 for o in short.values())
    assert total(short) > 0
    per_task = [total(o) for o in si_importances(digits_root, iterations=60, tasks=3)]
    assert per_task[0] > 2 * total(short)  # more steps, more importance
    assert per_task[0] < per_task[1] < per_task[2]  # every task adds to it
    assert per_task[2] > 1.5 * per_task[0]


def test_predicted_fisher_uses_the_argmax_and_the_minibatch_estimate_is_hsus(digits_root):
    ctx = digits_context(digits_root, "class")
    ctx.task_index = 1
    data = ctx.task_data(1)
    batch = ctx.make_batch(data, slice(None))
    mask = ctx.setting.mask(batch.task, 1)
    with torch.no_grad():
        argmax = ctx.logits(batch).argmax(1)
    by_hand = squared_grads_linear(ctx.model, batch.x, argmax, mask)
    fisher = diagonal_fisher(ctx, 1, samples=None, labels="predicted")
    for name, f in fisher.items():
        torch.testing.assert_close(f, by_hand[name] / len(data), rtol=1e-4, atol=1e-9)
    # One minibatch holding every sample: n * (mean gradient)^2.
    one_batch = diagonal_fisher(ctx, 1, samples=None, labels="empirical", batch=len(data))
    ctx.model.zero_grad()
    ctx.loss(ctx.logits(batch), batch).backward()
    for name, p in ctx.model.named_parameters():
        torch.testing.assert_close(one_batch[name], len(data) * p.grad.pow(2))


def test_mas_importance_is_the_absolute_output_norm_gradient_on_the_tasks_units(digits_root):
    ctx = digits_context(digits_root, "task")
    data = ctx.task_data(2)
    importance = output_sensitivity(ctx, 2, batch=len(data))
    batch = ctx.make_batch(data, slice(None))
    ctx.model.zero_grad()
    ctx.model(batch.x)[:, [4, 5]].pow(2).sum(1).mean().backward()
    for name, p in ctx.model.named_parameters():
        torch.testing.assert_close(importance[name], p.grad.abs())
    head = importance["3.weight"]
    assert head[[4, 5]].sum() > 0 and head[[0, 1, 2, 3, 6, 7, 8, 9]].sum() == 0
    mean = output_sensitivity(ctx, 2, batch=len(data), units="mean")
    torch.testing.assert_close(mean["1.weight"], importance["1.weight"] / 2)


def test_mas_accumulates_importance_across_tasks(digits_root):
    ctx = digits_context(digits_root, "domain")
    mas = MAS(importance_batch=10_000)
    expected = {n: torch.zeros_like(p) for n, p in ctx.model.named_parameters()}
    for index in range(2):
        ctx.task_index = index
        move(ctx.model, 0.05)
        for name, o in output_sensitivity(ctx, index, batch=10_000).items():
            expected[name] += o
        mas.after_task(ctx, ctx.scenario.tasks[index])
    for name, o in mas.importance.items():
        torch.testing.assert_close(o, expected[name])


def test_online_ewc_state_does_not_grow_and_separate_ewc_merges(digits_root):
    ctx = digits_context(digits_root, "domain")
    separate = EWC(fisher="empirical", fisher_samples=None)
    online = OnlineEWC(fisher="empirical", fisher_samples=None)
    sizes = []
    for index in range(3):
        ctx.task_index = index
        move(ctx.model, 0.05)
        for ewc in (separate, online):
            ewc.after_task(ctx, ctx.scenario.tasks[index])
        sizes.append((separate.state_bytes(), online.state_bytes()))
    assert sizes[0] == sizes[-1]
    params = dict(ctx.model.named_parameters())
    # Online anchors at the latest parameters; separate at a Fisher-weighted mean of all three.
    assert all(torch.equal(a, params[n].detach()) for n, a in online.anchor.items())
    assert not torch.equal(separate.anchor["1.weight"], params["1.weight"].detach())
    torch.testing.assert_close(online.importance["1.weight"], separate.importance["1.weight"])


@pytest.mark.parametrize(("strategy", "kwargs", "name"), [
    (EWC, {"lam": -1.0}, "lam"),
    (EWC, {"fisher_samples": 0}, "fisher_samples"),
    (EWC, {"fisher_batch": 0}, "fisher_batch"),
    (OnlineEWC, {"gamma": 1.5}, "gamma"),
    (OnlineEWC, {"lam": -2.0}, "lam"),
    (SI, {"xi": 0.0}, "xi"),
    (SI, {"lam": float("nan")}, "lam"),
    (MAS, {"importance_batch": 0}, "importance_batch"),
    (MAS, {"lam": -1.0}, "lam"),
    (L2, {"lam": -0.5}, "lam"),
    (L2SP, {"alpha": -0.1}, "alpha"),
    (L2SP, {"beta": -0.1}, "beta"),
    (L2SP, {"groups": ("1.*",)}, "groups"),
    (L2SP, {"groups": ("1.*=-1",)}, "groups"),
    (L2SP, {"groups": ("=0.3",)}, "groups"),
])
def test_bad_hyperparameters_raise_naming_the_parameter(strategy, kwargs, name):
    with pytest.raises(ValueError, match=name):
        strategy(**kwargs)


# --- Real Split MNIST, one epoch per task, the same seed and minibatches for every strategy.

PROTECTIVE = ("ewc", "online-ewc", "si", "mas", "l2-sp")


@pytest.fixture(scope="module")
def task_runs(mnist_root):
    return {(name, seed): run_one(mnist_root, "split-mnist", "task", name, seed=seed, epochs=1)
            for name in ("naive", *PROTECTIVE) for seed in (0,)} | {
        (name, 1): run_one(mnist_root, "split-mnist", "task", name, seed=1, epochs=1)
        for name in ("naive", "si")}


@pytest.mark.parametrize("name", PROTECTIVE)
def test_each_regulariser_drifts_less_than_naive(task_runs, name):
    assert task_runs[name, 0].metrics["drift"] < 0.9 * task_runs["naive", 0].metrics["drift"]


@pytest.mark.parametrize("seed", [0, 1])
def test_si_beats_naive_in_the_task_setting(task_runs, seed):
    assert task_runs["si", seed].metrics["acc"] > task_runs["naive", seed].metrics["acc"] + 0.02
