"""Composition (``a+b+...``): every part acts, the order written matters only where the
mathematics does (two edits of one gradient), and combinations that cannot work are refused
before anything trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfbench import registry
from cfbench.errors import CfbenchError
from cfbench.strategy import Compose, Strategy, build_strategy, make_strategy, resolve_hparams
from tests.helpers import run_one


def test_ewc_plus_replay_equals_neither_alone(digits_root):
    hparams = {"ewc": {"lam": 1000.0}, "replay": {"memory": 200}}
    runs = {spec: run_one(digits_root, "split-digits", "class", spec, epochs=1,
                          hparams={n: hparams[n] for n in spec.split("+")})
            for spec in ("ewc", "replay", "ewc+replay")}
    both = runs["ewc+replay"]
    assert both.R != runs["ewc"].R and both.R != runs["replay"].R
    # Both parts act: the replay buffer and EWC's Fisher are both kept.
    assert both.cost["state_bytes"] == (runs["ewc"].cost["state_bytes"]
                                        + runs["replay"].cost["state_bytes"])
    # Replay's extra samples cost FLOPs that EWC alone does not spend.
    assert both.cost["train_flops"] > runs["ewc"].cost["train_flops"]


def test_distillation_acts_in_either_order_beside_der(digits_root):
    # DER reads the stream batch's full output from the step's own forward pass; LwF's tap must
    # still see a forward with gradient whatever ran before it. (When DER ran a no-grad
    # forward of its own, `der+lwf` gave exactly `der`'s R: LwF's gradient was lost.)
    runs = {spec: run_one(digits_root, "split-digits", "class", spec, iterations=60)
            for spec in ("der", "der+lwf", "lwf+der")}
    assert runs["der+lwf"].R != runs["der"].R
    np.testing.assert_allclose(runs["der+lwf"].R, runs["lwf+der"].R, atol=0.02)


@pytest.mark.parametrize("spec", ["ewc+ewc", "replay+ewc+replay", "+ewc"])
def test_a_strategy_twice_or_an_empty_part_is_rejected(spec):
    with pytest.raises(CfbenchError, match="join distinct registered names"):
        make_strategy(spec)


@pytest.mark.parametrize(("spec", "setting"), [
    ("lora+replay", "task"),  # routing follows each forward's own batch, not a batch hook
    ("ewc+replay", "class"),
    ("der+progressive", "task"),
    ("adapter+agem", "task"),
])
def test_order_does_not_matter_where_the_parts_do_not_interact(digits_root, spec, setting):
    first, second = spec.split("+")
    runs = [run_one(digits_root, "split-digits", setting, s, iterations=20)
            for s in (spec, f"{second}+{first}")]
    assert runs[0].R == runs[1].R


def test_two_gradient_editors_depend_on_their_order(digits_root):
    # Projecting then damping is not damping then projecting: here the order is the maths.
    runs = [run_one(digits_root, "split-digits", "class", spec, iterations=20)
            for spec in ("agem+grad-protect", "grad-protect+agem")]
    assert runs[0].R != runs[1].R


class Double(Strategy):
    def after_backward(self, ctx, batch):
        for p in ctx.model.parameters():
            p.grad.mul_(2)


class AddOne(Strategy):
    def after_backward(self, ctx, batch):
        for p in ctx.model.parameters():
            p.grad.add_(1)


def test_gradient_hooks_run_left_to_right():
    registry.strategies.register("t-double", family="test")(Double)
    registry.strategies.register("t-add-one", family="test")(AddOne)
    try:
        results = {}
        for spec in ("t-double+t-add-one", "t-add-one+t-double"):
            model = torch.nn.Linear(1, 1, bias=False)
            model.weight.grad = torch.full((1, 1), 3.0)
            strategy = build_strategy(spec, resolve_hparams(spec, {}), "class")
            strategy.after_backward(type("Ctx", (), {"model": model})(), None)
            results[spec] = float(model.weight.grad)
    finally:
        registry.strategies.unregister("t-double")
        registry.strategies.unregister("t-add-one")
    assert results == {"t-double+t-add-one": 7.0, "t-add-one+t-double": 8.0}


def test_two_owners_of_the_loss_or_the_prediction_are_refused_before_training():
    # iCaRL's sigmoid loss and generative replay's distillation loss both replace the loss.
    with pytest.raises(CfbenchError, match="cannot compose ICaRL and GenerativeReplay: each "
                                           "defines the 'loss' hook"):
        make_strategy("icarl+generative-replay")
    assert isinstance(make_strategy("icarl+ewc"), Compose)


@pytest.mark.parametrize("spec", ["ewc+lora", "lora+ewc", "ewc+progressive", "si+adapter",
                                  "gradual-unfreeze+layerwise-lr+warmup",
                                  "ewc+replay+grad-protect"])
def test_regularisers_compose_with_strategies_that_add_or_freeze_parameters(digits_root, spec):
    hparams = {"warmup": {"steps": 5}, "gradual-unfreeze": {"every": 3, "unit": "steps"}}
    record = run_one(digits_root, "split-digits", "task", spec, iterations=20,
                     hparams={n: hparams[n] for n in spec.split("+") if n in hparams})
    assert np.diag(np.asarray(record.R)[1:]).min() > 0.6, record.R
