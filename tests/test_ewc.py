"""EWC's Fisher and anchors: exact per-sample Fisher, separate versus online state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cfbench import registry
from cfbench.scenario import Setting
from cfbench.strategies.regularization import (
    EWC,
    OnlineEWC,
    diagonal_fisher,
    squared_grads_linear,
    squared_grads_looped,
    squared_grads_vmap,
)
from cfbench.strategy import TrainContext
from tests.helpers import run_one


def context(digits_root, setting: str, model: nn.Module | None = None) -> TrainContext:
    scenario = registry.scenarios.get("split-digits").factory(data_root=digits_root, seed=0)
    rules = Setting(scenario, setting)
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                   nn.Linear(32, rules.n_outputs))
    return TrainContext(model, scenario, rules, torch.device("cpu"),
                        torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))


@pytest.mark.parametrize("setting", ["task", "domain", "class"])
def test_closed_form_fisher_equals_per_sample_gradients(digits_root, setting):
    ctx = context(digits_root, setting)
    ctx.task_index = 2
    batch = ctx.make_batch(ctx.task_data(2), torch.arange(40))
    mask = ctx.setting.mask(batch.task, 2)
    if mask is None:
        mask = torch.ones(40, ctx.setting.n_outputs, dtype=torch.bool)
    fast = squared_grads_linear(ctx.model, batch.x, batch.y, mask)
    slow = squared_grads_vmap(ctx.model, batch.x, batch.y, mask)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-7)


def test_recurrent_models_loop_over_samples_to_the_same_fisher():
    """vmap cannot batch the fused LSTM kernel, so recurrent models take a per-sample loop:
    the same sum of squared per-sample gradients."""
    from cfbench.models import TextgenrnnLM

    torch.manual_seed(0)
    model = TextgenrnnLM(symbols=7, embedding_dim=4, units=3)
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6,))
    mask = torch.ones(6, 7, dtype=torch.bool)
    looped = squared_grads_looped(model, x, y, mask)
    mapped = squared_grads_vmap(model, x, y, mask)
    assert looped.keys() == mapped.keys()
    for name in looped:
        torch.testing.assert_close(looped[name], mapped[name], rtol=1e-4, atol=1e-7)


def test_fisher_is_not_a_squared_batch_gradient(digits_root):
    ctx = context(digits_root, "class")
    ctx.task_index = 0
    fisher = diagonal_fisher(ctx, 0, samples=None, labels="empirical")
    batch = ctx.make_batch(ctx.task_data(0), slice(None))
    ctx.model.zero_grad()
    ctx.loss(ctx.logits(batch), batch).backward()
    squared_mean_grad = ctx.model[1].weight.grad.pow(2)
    # Mean of squares >= square of mean, strictly so when samples disagree.
    assert (fisher["1.weight"] >= squared_mean_grad - 1e-9).all()
    assert fisher["1.weight"].sum() > 2 * squared_mean_grad.sum()


def test_models_beyond_linear_layers_use_the_vmap_path(digits_root):
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    ctx = context(digits_root, "class", model=conv)
    ctx.task_index = 0
    batch = ctx.make_batch(ctx.task_data(0), torch.arange(8))
    mask = ctx.setting.mask(batch.task, 0)
    assert squared_grads_linear(conv, batch.x, batch.y, mask) is None
    fisher = diagonal_fisher(ctx, 0, samples=64, labels="sampled")
    assert set(fisher) == {n for n, _ in conv.named_parameters()}
    assert all(f.sum() > 0 for f in fisher.values())


def jiggle(model: nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def ewc_gradient(ewc: EWC, ctx: TrainContext) -> None:
    """The gradient EWC alone contributes at the current parameters, left in .grad."""
    for p in ctx.model.parameters():
        p.grad = torch.zeros_like(p)
    ewc.after_backward(ctx, None)


def test_separate_penalty_has_the_gradient_of_one_term_per_task(digits_root):
    ctx = context(digits_root, "domain")
    ewc = EWC(lam=3.0, fisher="empirical", fisher_samples=None)
    fishers, anchors = [], []
    for t, task in enumerate(ctx.scenario.tasks[:3]):
        ctx.task_index = t
        jiggle(ctx.model)  # stands in for training: a different solution per task
        fishers.append(diagonal_fisher(ctx, t, samples=None, labels="empirical"))
        anchors.append({n: p.detach().clone() for n, p in ctx.model.named_parameters()})
        ewc.after_task(ctx, task)
    jiggle(ctx.model)
    params = dict(ctx.model.named_parameters())
    ewc_gradient(ewc, ctx)
    for name, p in params.items():
        expected = 3.0 * sum(f[name] * (p.detach() - a[name])
                             for f, a in zip(fishers, anchors, strict=True))
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
    # One Fisher and one anchor, however many tasks.
    assert ewc.state_bytes() == 2 * sum(p.numel() * 4 for p in params.values())


def test_online_fisher_decays_by_gamma(digits_root):
    ctx = context(digits_root, "domain")
    ewc = OnlineEWC(gamma=0.5, fisher="empirical", fisher_samples=None)
    ctx.task_index = 0
    ewc.after_task(ctx, ctx.scenario.tasks[0])
    first = {n: f.clone() for n, f in ewc.fisher.items()}
    ctx.task_index = 1
    ewc.after_task(ctx, ctx.scenario.tasks[1])
    new = diagonal_fisher(ctx, 1, samples=None, labels="empirical")
    for name, f in ewc.fisher.items():
        torch.testing.assert_close(f, 0.5 * first[name] + new[name])
    current = dict(ctx.model.named_parameters())
    assert all(torch.equal(a, current[n].detach()) for n, a in ewc.anchor.items())


def test_penalty_gradient_is_zero_at_the_anchor_and_linear_away_from_it(digits_root):
    ctx = context(digits_root, "domain")
    ewc = EWC(lam=10.0)
    ctx.task_index = 0
    ewc.after_task(ctx, ctx.scenario.tasks[0])
    ewc_gradient(ewc, ctx)
    assert all(float(p.grad.abs().max()) == 0.0 for p in ctx.model.parameters())
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.1)  # every parameter moved by the same amount
    ewc_gradient(ewc, ctx)
    for name, p in ctx.model.named_parameters():
        torch.testing.assert_close(p.grad, 10.0 * 0.1 * ewc.fisher[name])


def test_larger_lambda_means_less_drift(digits_root):
    weak = run_one(digits_root, "split-digits", "domain", "ewc", hparams={"ewc": {"lam": 1.0}})
    strong = run_one(digits_root, "split-digits", "domain", "ewc",
                     hparams={"ewc": {"lam": 1e5}})
    assert strong.metrics["drift"] < weak.metrics["drift"]
    assert strong.metrics["fm"] < weak.metrics["fm"]
