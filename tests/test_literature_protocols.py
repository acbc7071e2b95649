"""The protocol details of the literature's standard settings, each a protocol field, scenario
seed or hyperparameter: unnormalised inputs, a replay minibatch of its own size, per-seed class
order, unmasked class-setting training, scoring one model in several settings, offline joint
training, weight initialisation, the expected Fisher, SI's gradient clipping and a fixed number
of training samples per task. And the ids of runs recorded before them stay what they were."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfbench import registry
from cfbench.batched import execute_batched
from cfbench.errors import CfbenchError
from cfbench.experiment import execute, load_scenario, plan_runs, training_scenario
from cfbench.models import initialise, mlp
from cfbench.protocol import PER_SEED, Protocol, protocol_value
from cfbench.records import parse_record
from cfbench.registry import register_scenario
from cfbench.scenario import NextToken, Scenario, Setting, Task
from cfbench.strategies.baselines import Joint
from cfbench.strategies.regularization import EWC, SI, diagonal_fisher
from cfbench.strategies.replay import Replay
from cfbench.strategy import TrainContext
from tests.helpers import run_one

COMMITTED = Path(__file__).resolve().parent.parent / "results" / "hsu2018-split-mnist" / "runs"


def digits(digits_root: Path, setting: str = "class", **protocol) -> TrainContext:
    scenario = registry.scenarios.get("split-digits").factory(data_root=digits_root, seed=0)
    scenario = dataclasses.replace(scenario, protocol=dataclasses.replace(scenario.protocol,
                                                                          **protocol))
    rules = Setting(scenario, setting)
    torch.manual_seed(0)
    return TrainContext.create(mlp(64, (32,), rules.n_outputs), scenario, rules, seed=0)


# -- the protocol fields, and the ids recorded before them ------------------------------------

def test_every_protocol_field_reads_from_text_as_the_command_line_gives_it():
    """`--protocol KEY=VALUE` and sweep files read values with `protocol_value`: every field
    of the dataclass, present and future, is reachable from both."""
    examples = {"epochs": "2.5", "iterations": "7", "batch_size": "16", "optimizer": "sgd",
                "lr": "0.01", "model": "mlp:10", "eval_batch_size": "64", "class_scope": "all",
                "reset_optimizer": "false", "precision": "bf16", "compile": "true",
                "fused_optimizer": "yes", "normalize": "false", "init": "xavier",
                "train_per_task": "1000", "also_evaluate": "task"}
    fields = {f.name for f in dataclasses.fields(Protocol)}
    assert set(examples) == fields, "give the new field an example here"
    for name, text in examples.items():
        value = protocol_value(name, text)
        assert value != getattr(Protocol(), name)
        assert protocol_value(name, value) == value  # a sweep file's YAML value
    with pytest.raises(CfbenchError, match="unknown protocol field 'clas_scope'"):
        protocol_value("clas_scope", "all")
    with pytest.raises(CfbenchError, match="class_scope must be 'seen' or 'all'"):
        protocol_value("class_scope", "some")
    with pytest.raises(CfbenchError, match="expected int"):
        protocol_value("train_per_task", "many")


def test_fields_added_later_are_recorded_only_away_from_their_defaults():
    assert set(Protocol().to_dict()) == {"model", "epochs", "iterations", "batch_size",
                                         "optimizer", "lr", "eval_batch_size", "class_scope",
                                         "reset_optimizer"}
    changed = Protocol(normalize=False, init="xavier", train_per_task=10,
                       also_evaluate=("task",)).to_dict()
    assert (changed["normalize"], changed["init"], changed["train_per_task"],
            changed["also_evaluate"]) == (False, "xavier", 10, ("task",))


def committed(strategy: str, setting: str) -> dict:
    for path in sorted(COMMITTED.glob("*.json")):
        record = json.loads(path.read_text())
        config = record["config"]
        if (config["strategy"], config["setting"]) == (strategy, setting):
            return record
    raise AssertionError(f"no committed {strategy} record")


@pytest.mark.parametrize("strategy", ["joint", "si", "ewc", "naive"])
def test_committed_runs_plan_to_the_ids_they_were_recorded_under(mnist_root, strategy):
    """joint and SI gained hyperparameters and the protocol gained fields: at their defaults
    they are left out, so planning a committed run's configuration gives its id again."""
    record = committed(strategy, "class")
    c = record["config"]
    (config,) = plan_runs(scenario=c["scenario"], settings=[c["setting"]],
                          strategies=[c["strategy"]], hparams=c["hparams"], seeds=[c["seed"]],
                          scenario_seed=c["scenario_seed"], scenario_options=c["scenario_options"],
                          protocol_overrides=c["protocol"], device=c["device"],
                          data_root=mnist_root)
    assert config.run_id == record["run_id"]


# -- inputs left unnormalised ----------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
def test_unnormalised_inputs_are_the_pixels_in_0_1(mnist_root, normalize):
    scenario = load_scenario("split-mnist", {"shuffle_classes": False, "pad": 0}, 0, mnist_root,
                             "cpu")
    scenario = dataclasses.replace(scenario, protocol=dataclasses.replace(
        scenario.protocol, normalize=normalize))
    ctx = TrainContext.create(mlp(784, (10,), 10), scenario, "class")
    data = ctx.task_data(0)
    batch = ctx.make_batch(data, torch.arange(512), augment=True)  # what the model sees
    low, high = float(batch.x.min()), float(batch.x.max())
    if normalize:
        assert low == pytest.approx(-0.1307 / 0.3081) and high > 2.5
    else:
        assert (low, high) == (0.0, 1.0)
    assert torch.equal(scenario.stored(batch.x), data.x[:512])  # what replay memories keep


@register_scenario("test-token-windows", family="test", settings=("domain",))
def token_windows(*, data_root: Path, seed: int) -> Scenario:
    """Two tasks of windows of 3 token ids, each labelled by its next token: no images."""
    generator = torch.Generator().manual_seed(seed)

    def task(t: int) -> Task:
        x = torch.randint(0, 4, (16, 3), generator=generator)
        return Task(f"t{t}", (0, 1, 2, 3), x, x[:, -1].clone(), x[:8], x[:8, -1].clone())

    return Scenario("test-token-windows", [task(0), task(1)], Protocol(model="lstm:4"),
                    settings=("domain",), objective=NextToken(windowed=True))


def test_what_needs_images_or_labels_is_refused_on_tokens_when_planned(digits_root):
    def plan(strategy: str = "naive", hparams: dict | None = None, **protocol) -> list:
        return plan_runs(scenario="test-token-windows", settings=["domain"],
                         strategies=[strategy], hparams=hparams or {}, seeds=[0],
                         protocol_overrides=protocol, data_root=digits_root)

    assert plan()
    with pytest.raises(CfbenchError, match="normalize=false .* has no images"):
        plan(normalize=False)
    with pytest.raises(CfbenchError, match="fisher=all takes a backward pass per label"):
        plan("ewc", {"ewc": {"fisher": "all"}})
    assert plan("ewc")


# -- the replay minibatch --------------------------------------------------------------------

@pytest.mark.parametrize("stream_batch", [8, 64])
@pytest.mark.parametrize("replay_batch", [24, 100, None])
def test_the_replay_minibatch_has_its_own_size_whatever_the_stream_batch(
        digits_root, stream_batch, replay_batch):
    ctx = digits(digits_root, batch_size=stream_batch)
    replay = Replay(memory=200, replay_batch_size=replay_batch)
    ctx.task_index = 0
    replay.before_task(ctx, ctx.scenario.tasks[0])
    replay.after_task(ctx, ctx.scenario.tasks[0])  # no steps: the task's samples fill it
    ctx.task_index = 1
    stream = ctx.make_batch(ctx.task_data(1), torch.arange(stream_batch))
    mixed = replay.batch(ctx, stream)
    assert len(mixed.y) == stream_batch + (replay_batch or stream_batch)
    assert (mixed.task[stream_batch:] == 0).all() and (mixed.task[:stream_batch] == 1).all()


# -- per-seed class order --------------------------------------------------------------------

def test_per_seed_class_order_differs_between_seeds_and_repeats_for_a_seed(mnist_root):
    def orders(seeds: list[int]) -> list[list[tuple[int, ...]]]:
        configs = plan_runs(scenario="split-mnist", settings=["class"], strategies=["naive"],
                            hparams={}, seeds=seeds, scenario_seed=PER_SEED,
                            scenario_options={"shuffle_classes": True}, data_root=mnist_root)
        assert [c.scenario_seed for c in configs] == seeds
        return [[t.classes for t in training_scenario(c, mnist_root)[0].tasks]
                for c in configs]

    first, again = orders([0, 1, 2]), orders([0, 1, 2])
    assert first == again
    assert len({tuple(order) for order in first}) == 3
    for order in first:
        assert sorted(c for task in order for c in task) == list(range(10))


# -- unmasked class-setting training ---------------------------------------------------------

def test_class_scope_all_trains_and_scores_over_every_class(digits_root):
    seen = run_one(digits_root, "split-digits", "class", "naive", iterations=20)
    everything = run_one(digits_root, "split-digits", "class", "naive", iterations=20,
                         class_scope="all")
    assert everything.R[1:] != seen.R[1:]  # trained differently, not only scored
    # Masked to the classes seen, a task not yet trained is never predicted; unmasked, the
    # untrained model (row 0) predicts classes of later tasks too.
    assert all(seen.R[t][j] == 0 for t in range(5) for j in range(t + 1, 5))
    assert any(everything.R[0][j] > 0 for j in range(1, 5))


# -- one model scored in several settings ----------------------------------------------------

def test_a_class_setting_model_is_also_scored_with_task_masks(digits_root, tmp_path):
    record = run_one(digits_root, "split-digits", "class", "naive", iterations=20,
                     also_evaluate=("task",))
    R, by_task = np.array(record.R), np.array(record.matrices["R@task"])
    assert by_task.shape == R.shape
    assert (by_task >= R).all()  # choosing among a task's classes is never harder
    assert (by_task[1:, 1:] > R[1:, 1:]).any()
    plain = run_one(digits_root, "split-digits", "class", "naive", iterations=20)
    assert plain.R == record.R and "R@task" not in plain.matrices  # scoring changes nothing
    parsed = parse_record(record.to_json(), "test")
    assert parsed.matrices["R@task"] == record.matrices["R@task"]
    crafted = json.loads(record.to_json())
    crafted["matrices"]["R@task"][1][0] = 1.5
    with pytest.raises(CfbenchError, match=r"R@task"):
        parse_record(json.dumps(crafted), "crafted")


def test_also_evaluate_is_checked_when_planned(digits_root):
    def plan(setting: str) -> list:
        return plan_runs(scenario="split-digits", settings=[setting], strategies=["naive"],
                         hparams={}, seeds=[0], protocol_overrides={"also_evaluate": ("task",)},
                         data_root=digits_root)

    with pytest.raises(CfbenchError, match="domain-setting model cannot be scored in the task"):
        plan("domain")
    own = plan("task")[0]  # the run's own setting is R itself
    assert own.protocol.also_evaluate == ()
    assert own.run_id == plan_runs(scenario="split-digits", settings=["task"],
                                   strategies=["naive"], hparams={}, seeds=[0],
                                   data_root=digits_root)[0].run_id


def test_stacked_runs_score_the_extra_setting_as_single_runs_do(digits_root):
    configs = plan_runs(scenario="split-digits", settings=["class"], strategies=["ewc"],
                        hparams={}, seeds=[0, 1],
                        protocol_overrides={"iterations": 10, "also_evaluate": ("task",)},
                        data_root=digits_root)
    stacked = execute_batched(configs, digits_root)
    for config, record in zip(configs, stacked, strict=True):
        alone = execute(config, digits_root)
        assert record.cost.get("stacked_runs") == 2
        assert record.matrices == alone.matrices and record.R == alone.R


# -- offline joint training ------------------------------------------------------------------

def test_offline_joint_trains_once_on_every_task_after_the_last(digits_root):
    record = run_one(digits_root, "split-digits", "task", "joint",
                     hparams={"joint": {"form": "offline"}}, epochs=1)
    steps = [t["steps"] for t in record.tasks]
    union = sum(t["n_train"] for t in record.tasks)
    assert steps == [0, 0, 0, 0, math.ceil(union / 32)]  # one epoch over the union, batch 32
    assert all(row == record.R[0] for row in record.R[1:-1])  # the untrained model's
    assert min(record.R[-1]) > 0.9
    cumulative = run_one(digits_root, "split-digits", "task", "joint", epochs=1)
    assert cumulative.config["hparams"] == {"joint": {}}
    assert [t["steps"] for t in cumulative.tasks][0] > 0
    with pytest.raises(ValueError, match="form"):
        Joint(form="once")


# -- weight initialisation -------------------------------------------------------------------

@pytest.mark.parametrize("init", ["default", "xavier", "trunc-normal"])
def test_initialisations_have_their_statistics(init):
    torch.manual_seed(0)
    model = initialise(mlp(784, (400, 400), 10), init)
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        fan_out, fan_in = layer.weight.shape
        w, b = layer.weight.detach(), layer.bias.detach()
        if init == "default":  # PyTorch's: uniform in +-1/sqrt(fan_in), weights and biases
            bound = 1 / math.sqrt(fan_in)
            assert w.abs().max() <= bound and w.std() == pytest.approx(bound / math.sqrt(3),
                                                                        rel=0.05)
            assert b.abs().max() <= bound and b.std() > 0
        elif init == "xavier":
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert w.abs().max() <= bound and w.std() == pytest.approx(bound / math.sqrt(3),
                                                                        rel=0.05)
            assert (b == 0).all()
        else:  # N(0, 0.1^2) cut at 2 std: std 0.1 * 0.8796
            assert w.abs().max() <= 0.2 and w.std() == pytest.approx(0.08796, rel=0.05)
            assert w.mean().abs() < 0.005 and (b == 0.1).all()


def test_init_changes_the_run_and_is_recorded(digits_root):
    default = run_one(digits_root, "split-digits", "task", "naive", iterations=5)
    xavier = run_one(digits_root, "split-digits", "task", "naive", iterations=5, init="xavier")
    assert "init" not in default.config["protocol"]
    assert xavier.config["protocol"]["init"] == "xavier" and xavier.R != default.R


# -- regulariser variants --------------------------------------------------------------------

def test_the_all_labels_fisher_is_the_probability_weighted_sum_of_squared_gradients(digits_root):
    """van de Ven et al.'s fisher_labels='all', by hand: for every sample, every label's squared
    gradient of log p(label|x) weighted by p(label|x), over the units the setting allows."""
    ctx = digits(digits_root, "class")
    ctx.task_index = 1
    fisher = diagonal_fisher(ctx, 1, samples=None, labels="all")
    data = ctx.task_data(1)
    params = dict(ctx.model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    allowed = [0, 1, 2, 3]  # seen after task 2 of split-digits
    for i in range(len(data)):
        batch = ctx.make_batch(data, torch.tensor([i]))
        log_p = F.log_softmax(ctx.model(batch.x)[0, allowed], dim=0)
        for k in range(len(allowed)):
            grads = torch.autograd.grad(log_p[k], list(params.values()), retain_graph=True)
            for (name, _), g in zip(params.items(), grads, strict=True):
                expected[name] += log_p[k].exp().detach() * g.pow(2)
    for name in params:
        torch.testing.assert_close(fisher[name], expected[name] / len(data), rtol=1e-4,
                                   atol=1e-8)
    with pytest.raises(ValueError, match="fisher_batch=1"):
        EWC(fisher="all", fisher_batch=8)


def test_si_clips_the_gradient_it_steps_with_but_integrates_the_unclipped_one(digits_root):
    ctx = digits(digits_root, "task", epochs=None, iterations=1)
    si = SI(clip=1e-3)
    ctx.task_index = 0
    si.before_task(ctx, ctx.scenario.tasks[0])
    batch = ctx.make_batch(ctx.task_data(0), torch.arange(32))
    ctx.model.zero_grad()
    ctx.loss(ctx.logits(batch), batch).backward()
    si.after_backward(ctx, batch)
    grads = torch.cat([p.grad.flatten() for p in ctx.model.parameters()])
    read = torch.cat([g.flatten() for g in si.grad.values()])
    assert grads.abs().max() <= 1e-3 < read.abs().max()
    with pytest.raises(ValueError, match="clip"):
        SI(clip=0.0)
    assert "clip" not in registry.strategies.get("si").resolve({})


# -- a fixed number of training samples per task ---------------------------------------------

def test_train_per_task_trains_on_that_many_samples_drawn_by_the_scenario_seed(digits_root):
    record = run_one(digits_root, "split-digits", "task", "naive", iterations=3,
                     train_per_task=50)
    full = run_one(digits_root, "split-digits", "task", "naive", iterations=3)
    assert [t["n_train"] for t in record.tasks] == [50] * 5
    assert [t["n_test"] for t in record.tasks] == [t["n_test"] for t in full.tasks]

    def subset(seed: int, scenario_seed: int) -> list[torch.Tensor]:
        (config,) = plan_runs(scenario="split-digits", settings=["task"], strategies=["naive"],
                              hparams={}, seeds=[seed], scenario_seed=scenario_seed,
                              protocol_overrides={"train_per_task": 50}, data_root=digits_root)
        return [t.x_train for t in training_scenario(config, digits_root)[0].tasks]

    same = subset(0, 0)
    assert all(torch.equal(a, b) for a, b in zip(same, subset(1, 0), strict=True))
    task = load_scenario("split-digits", {"test_fraction": 0.3}, 0, digits_root, "cpu").tasks[0]
    rows = {tuple(x.flatten().tolist()) for x in task.x_train}
    assert all(tuple(x.flatten().tolist()) in rows for x in same[0])
