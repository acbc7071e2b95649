"""Stacked runs: each member of a stacked job (a seed, a grid point) gets the record its own
run gets.

Tolerance: R must be exactly equal and final parameters equal within atol=1e-5. The batched
step computes each seed's gradient with the same kernels and summation order as a single run
(see `_StackedLinear`), so on this CPU single-threaded the two are bitwise equal (measured:
every parameter of every case below); 1e-5 leaves room for kernels that split work differently
(with 2 threads the largest difference measured was 4e-8), and is far below what a wrong
minibatch, penalty or teacher changes (0.07 and more after 25 steps per task: see
`test_the_comparison_sees_a_wrong_penalty_or_a_wrong_seed`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from cfbench import experiment
from cfbench.batched import can_batch, execute_batched, stack_groups
from cfbench.errors import CfbenchError
from cfbench.experiment import execute, plan_runs
from cfbench.records import RunConfig, RunRecord

SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True)
def one_thread():
    """Runs compared bit for bit use one thread, as the suite's runs do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def final_params(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Every run's final parameters, in the order runs finish (a batched job's in seed order),
    taken where both paths compute the drift metric from the final model."""
    seen: list[dict[str, torch.Tensor]] = []
    drift = experiment.parameter_drift

    def spy(model: torch.nn.Module, start: dict[int, torch.Tensor]) -> float:
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return drift(model, start)

    monkeypatch.setattr(experiment, "parameter_drift", spy)  # both paths: run_metrics
    return seen


def plan(root: Path, strategy: str, setting: str, seeds: list[int] = SEEDS,
         hparams: dict[str, dict[str, Any]] | None = None, scenario: str = "split-digits",
         options: dict[str, Any] | None = None, **protocol: Any) -> list[RunConfig]:
    protocol.setdefault("iterations", 25)
    return plan_runs(scenario=scenario, settings=[setting], strategies=[strategy],
                     hparams=hparams or {}, seeds=seeds, scenario_options=options,
                     protocol_overrides=protocol, data_root=root)


def assert_same_runs(single: list[RunRecord], batch: list[RunRecord],
                     single_params: list[dict[str, torch.Tensor]],
                     batch_params: list[dict[str, torch.Tensor]]) -> None:
    for one, many, p1, pk in zip(single, batch, single_params, batch_params, strict=True):
        assert one.status == many.status == "ok", (one.error, many.error)
        assert many.run_id == one.run_id and many.config == one.config
        assert many.R == one.R
        assert many.tasks == one.tasks and many.strategy_log == one.strategy_log
        for key in ("steps", "train_flops", "state_bytes"):
            assert many.cost[key] == one.cost[key], key
        assert many.cost["stacked_runs"] == len(batch) and "stacked_runs" not in one.cost
        assert many.metrics == pytest.approx(one.metrics, abs=1e-6)
        assert [len(c) for c in many.curves["train_loss"]] == [
            len(c) for c in one.curves["train_loss"]]  # each member its own loss curve
        assert sum(many.curves["train_loss"], []) == pytest.approx(
            sum(one.curves["train_loss"], []), abs=1e-6)
        assert p1.keys() == pk.keys()
        for name in p1:
            torch.testing.assert_close(pk[name], p1[name], atol=1e-5, rtol=0)


CASES = [
    ("naive", "task", {}, {}), ("naive", "class", {}, {}),
    ("naive", "domain", {}, {"optimizer": "sgd", "lr": 0.1}),
    ("joint", "task", {}, {}), ("joint", "class", {}, {}),
    ("ewc", "task", {}, {}), ("ewc", "class", {}, {}),
    ("ewc", "class", {}, {"reset_optimizer": False}),
    ("online-ewc", "class", {"online-ewc": {"gamma": 0.5}}, {}),
    ("mas", "task", {}, {}), ("mas", "class", {}, {}),
    ("l2", "task", {"l2": {"lam": 0.1}}, {}), ("l2", "class", {"l2": {"lam": 0.1}}, {}),
    ("l2", "class", {"l2": {"lam": 1.0, "anchor": "previous-task"}}, {}),
    ("l2-sp", "task", {}, {}), ("l2-sp", "class", {"l2-sp": {"exclude_head": False}}, {}),
    ("lwf", "task", {}, {}), ("lwf", "class", {}, {}), ("lwf", "domain", {}, {}),
    ("replay", "task", {}, {}), ("replay", "class", {}, {}),
    ("replay", "class", {"replay": {"memory": None, "per_class": 10, "mix": "dataset",
                                    "selection": "class-balanced"}}, {}),
    ("ewc+replay", "class", {}, {}), ("l2+lwf", "task", {"l2": {"lam": 0.1}}, {}),
]


@pytest.mark.parametrize(("strategy", "setting", "hparams", "protocol"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_seed_of_a_batched_job_equals_its_own_run(digits_root, final_params, strategy,
                                                       setting, hparams, protocol):
    configs = plan(digits_root, strategy, setting, hparams=hparams, **protocol)
    single = [execute(c, digits_root) for c in configs]
    single_params = final_params[:]
    batch = execute_batched(configs, digits_root)
    assert_same_runs(single, batch, single_params, final_params[len(single):])


def test_members_of_a_job_may_differ_in_hyperparameters(digits_root, final_params):
    """A stacked job takes each member's own hyperparameters (grid points stack as seeds do):
    EWC's lam (0 included) and LwF's alpha and temperature differ between members, and each
    member still gets its own run's record."""
    members = [(0, 1000.0, 1.0, 2.0), (1, 10.0, 0.5, 0.7), (0, 0.0, 2.0, 2.0)]
    configs = [plan(digits_root, "ewc+lwf", "class", seeds=[seed], hparams={
        "ewc": {"lam": lam}, "lwf": {"alpha": alpha, "temperature": temperature}})[0]
        for seed, lam, alpha, temperature in members]
    single = [execute(c, digits_root) for c in configs]
    single_params = final_params[:]
    batch = execute_batched(configs, digits_root)
    assert_same_runs(single, batch, single_params, final_params[len(single):])
    assert len({json.dumps(r.R) for r in batch}) == 3


def grid(root: Path, strategy: str, points: list[dict[str, Any]], seeds: list[int],
         **protocol: Any) -> list[RunConfig]:
    """A sweep's runs: every seed of every point (hyperparameters of `strategy`; "lr" is the
    protocol's)."""
    return [c for point in points for c in plan(
        root, strategy, "class", seeds=seeds, **{**protocol, **{k: v for k, v in point.items()
                                                                if k == "lr"}},
        hparams={strategy: {k: v for k, v in point.items() if k != "lr"}})]


GRIDS = [
    ("ewc", [{"lam": 1000.0}, {"lam": 10.0}], [0, 1], {}),
    ("l2", [{"lam": lam, "lr": lr} for lam in (0.1, 1.0) for lr in (0.1, 0.03)], [0],
     {"optimizer": "sgd"}),
    ("online-ewc", [{"gamma": gamma, "lr": lr} for gamma in (0.0, 1.0) for lr in (1e-3, 3e-3)],
     [0], {"reset_optimizer": False}),
]


@pytest.mark.parametrize(("strategy", "points", "seeds", "protocol"), GRIDS,
                         ids=[g[0] for g in GRIDS])
def test_grid_points_stack_and_each_equals_its_own_run(digits_root, final_params, strategy,
                                                       points, seeds, protocol):
    """The points of a grid over what a stacked form takes per member (EWC's lam, L2's lam,
    online EWC's gamma) and over the learning rate (SGD's, and Adam's with its moments kept
    across tasks) form one group, and each member of its job gets its own run's record."""
    configs = grid(digits_root, strategy, points, seeds, iterations=15, **protocol)
    assert [(len(g.configs), g.reason) for g in stack_groups(configs)] == [(len(configs), None)]
    single = [execute(c, digits_root) for c in configs]
    single_params = final_params[:]
    batch = execute_batched(configs, digits_root)
    assert_same_runs(single, batch, single_params, final_params[len(single):])
    assert len({json.dumps(r.R) for r in batch}) == len(configs)  # no two members alike


def test_what_a_form_does_not_take_per_member_groups_runs_by_equal_values(digits_root):
    """Replay's memory (how many samples a replayed batch holds), L2-SP's alpha (which
    importances exist) and EWC's Fisher samples are not per member: runs stack only with equal
    values. SI has no stacked form: its runs group by everything but seed and learning rate,
    and say why they run one at a time. execute_batched refuses a job that mixes values."""
    replay = grid(digits_root, "replay", [{"memory": 5}, {"memory": 50}], [0, 1])
    configs = [*replay, *grid(digits_root, "l2-sp", [{"alpha": 0.1}, {"alpha": 0.5}], [0]),
               *grid(digits_root, "ewc", [{"fisher_samples": 100, "lam": 1.0},
                                          {"fisher_samples": 200, "lam": 1.0},
                                          {"fisher_samples": 100, "lam": 5.0}], [0]),
               *grid(digits_root, "si", [{"lam": 1.0, "lr": 1e-3}, {"lam": 1.0, "lr": 1e-2}],
                     [0])]
    groups = stack_groups(configs)
    assert [([configs.index(c) for c in g.configs], g.reason) for g in groups] == [
        ([0, 1], None), ([2, 3], None), ([4], "a single run"), ([5], "a single run"),
        ([6, 8], None), ([7], "a single run"), ([9, 10], "strategy 'si' has no batched form")]
    with pytest.raises(ValueError, match="differ only in their seeds, learning rates and"):
        execute_batched(replay[1:3], digits_root)


def test_the_comparison_sees_a_wrong_penalty_or_a_wrong_seed(digits_root, final_params):
    """What the tolerance above rules out: the weakest penalty tested (l2, lam=0.1) left out,
    or one seed's batches given to another, moves parameters by far more than 1e-5."""
    (l2,) = plan(digits_root, "l2", "class", seeds=[0], hparams={"l2": {"lam": 0.1}})
    naive = plan(digits_root, "naive", "class", seeds=[0, 1])
    for config in (l2, *naive):
        execute(config, digits_root)
    l2_params, naive0, naive1 = final_params
    gap = max((l2_params[n] - naive0[n]).abs().max().item() for n in naive0)
    seeds_gap = max((naive1[n] - naive0[n]).abs().max().item() for n in naive0)
    assert gap > 1e-2 and seeds_gap > 1e-2


def test_transfer_seeds_batch_with_the_source_learned_per_seed(transfer_root, final_params):
    configs = plan(transfer_root, "ewc", "class", seeds=[0, 1], scenario="mnist-to-fashion",
                   options={"source_epochs": 0.05}, iterations=30, lr=1e-2)
    single = [execute(c, transfer_root) for c in configs]
    single_params = final_params[:]
    batch = execute_batched(configs, transfer_root)
    assert_same_runs(single, batch, single_params, final_params[2:])
    assert all("rem_source" in r.metrics for r in batch)
    assert batch[0].R[1] != batch[1].R[1]  # each seed pretrained its own source


def test_the_batched_job_is_deterministic(digits_root, final_params):
    configs = plan(digits_root, "ewc", "class")
    first, second = (execute_batched(configs, digits_root) for _ in range(2))
    assert [r.R for r in first] == [r.R for r in second]
    for a, b in zip(final_params[:3], final_params[3:], strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_stack_groups_say_why_they_cannot_be_stacked(digits_root):
    configs = plan_runs(scenario="split-digits", settings=["class"], strategies=["si", "naive"],
                        hparams={}, seeds=[0, 1], protocol_overrides={"iterations": 20},
                        data_root=digits_root)
    groups = stack_groups(configs)
    assert [(len(g.configs), g.reason) for g in groups] == [
        (2, "strategy 'si' has no batched form"), (2, None)]
    batched = execute_batched(configs[2:], digits_root)
    alone = [execute(c, digits_root) for c in configs[2:]]
    assert [r.R for r in batched] == [r.R for r in alone]
    assert [r.cost.get("stacked_runs") for r in batched] == [2, 2]
    assert "stacked_runs" not in alone[0].cost and batched[0].cost.keys() - {
        "stacked_runs"} == alone[0].cost.keys()
    with pytest.raises(CfbenchError, match="strategy .si. has no batched form"):
        execute_batched(configs[:2], digits_root)
    with pytest.raises(ValueError, match="differ only in their seeds, learning rates and"):
        execute_batched([configs[0], configs[2]], digits_root)


def test_models_other_than_mlps_are_not_batched(digits_root):
    (config,) = plan(digits_root, "naive", "class", seeds=[0])
    resnet = RunConfig.from_dict({**config.to_dict(), "protocol": {
        **config.to_dict()["protocol"], "model": "resnet18-reduced"}})
    assert can_batch(config) is None
    assert can_batch(resnet) == ("model 'resnet18-reduced' is not batched (only mlp: "
                                 "backbones, which have no buffers)")
    assert stack_groups([config])[0].reason == "a single run"


def test_a_diverging_member_runs_alone_and_the_others_stack_again(digits_root):
    """SGD at lr=300 diverges (seed 0), at 0.1 it does not: the diverging point runs alone, with
    a warning, the other two stack again without it, and each record is its own run's, the
    failed one included."""
    configs = [*plan(digits_root, "naive", "class", seeds=[0], iterations=20, optimizer="sgd",
                     lr=300.0),
               *plan(digits_root, "naive", "class", seeds=[0, 2], iterations=20,
                     optimizer="sgd", lr=0.1)]
    alone = [execute(c, digits_root) for c in configs]
    assert [r.status for r in alone] == ["failed", "ok", "ok"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = execute_batched(configs, digits_root)
    assert len(caught) == 1
    assert str(caught[0].message).startswith("run 1 of a stacked job of 3 runs of naive "
                                             "diverged (non-finite loss nan at task 1")
    assert [(r.status, r.error, r.R) for r in records] == [(r.status, r.error, r.R)
                                                           for r in alone]
    assert [r.cost.get("stacked_runs") for r in records] == [None, 2, 2]
