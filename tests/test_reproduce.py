"""`cfbench reproduce`: the Hsu et al. 2018 protocol, its bands, and resuming a long run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cfbench import registry, reproduce
from cfbench.experiment import plan_runs
from cfbench.reproduce import HSU2018_SPLIT_MNIST, band
from cfbench.strategy import TrainContext, make_strategy
from cfbench.train import train_task
from tests.test_cli import cli


def test_band_is_three_published_stds_or_two_points():
    assert band(93.46, 2.01) == pytest.approx((87.43, 99.49))
    assert band(19.71, 0.08) == pytest.approx((17.71, 21.71))


def test_padding_reproduces_hsus_input_statistics(mnist_root):
    scenario = registry.scenarios.get("split-mnist").factory(data_root=mnist_root, seed=0, pad=2)
    assert scenario.input_shape == (1, 32, 32)
    assert (scenario.mean, scenario.std) == pytest.approx((0.1000, 0.2752), abs=1e-4)
    x = scenario.prepare(torch.cat([t.x_train for t in scenario.tasks]))
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(x.std()) == pytest.approx(1.0, abs=1e-3)
    assert (scenario.tasks[0].x_train[:, :, :2, :] == 0).all()


def test_every_row_plans_with_the_papers_protocol(mnist_root):
    repro = HSU2018_SPLIT_MNIST
    assert set(r.method for r in repro.rows) == set(repro.published)
    for row in repro.rows:
        for setting in repro.settings:
            (config,) = plan_runs(
                scenario=repro.scenario, settings=[setting], strategies=[row.strategy],
                hparams=row.hparams.get(setting, {}), seeds=[0],
                scenario_options=repro.scenario_options,
                protocol_overrides={**repro.protocol, **row.protocol}, data_root=mnist_root)
            p = config.protocol
            assert (p.model, p.batch_size, p.epochs, p.reset_optimizer) == \
                ("mlp:400,400", 128, 4, False)
            assert (p.optimizer, p.lr) == (("sgd", 0.01) if row.method in ("SGD", "GEM")
                                           else ("adam", 1e-3))


def test_optimizer_state_carries_over_when_not_reset(digits_root):
    scenario = registry.scenarios.get("split-digits").factory(data_root=digits_root, seed=0)
    for reset in (True, False):
        scenario = dataclasses.replace(scenario, protocol=dataclasses.replace(
            scenario.protocol, reset_optimizer=reset, epochs=None, iterations=7))
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        ctx = TrainContext.create(model, scenario, "class")
        strategy = make_strategy("naive")
        optimizers = []
        for t, task in enumerate(scenario.tasks[:2]):
            ctx.task_index = t
            train_task(ctx, strategy, task)
            optimizers.append(ctx.optimizer)
        state = ctx.optimizer.state[model[1].weight]
        if reset:
            assert optimizers[0] is not optimizers[1] and int(state["step"]) == 7
        else:
            assert optimizers[0] is optimizers[1] and int(state["step"]) == 14


def test_cli_reproduces_a_reduced_table_and_resumes(mnist_root, tmp_path):
    out = tmp_path / "hsu"
    args = ("reproduce", "hsu2018-split-mnist", "--row", "Adam", "--row", "Naive rehearsal*",
            "--setting", "class", "--seeds", "1", "--epochs", "1", "--out", str(out),
            "--data-root", str(mnist_root), "--quiet")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    lines = {line.split("|")[1].strip(): line for line in first.stdout.splitlines()
             if line.startswith("| ") and "method" not in line}
    assert set(lines) == {"Adam", "Naive rehearsal (memory 1100)",
                          "Naive rehearsal (memory 4400)"}
    acc = {k: float(v.split("|")[2].split()[0]) for k, v in lines.items()}
    # Looser than the paper's bands: one seed at one epoch per task.
    assert 15 < acc["Adam"] < 22
    assert acc["Naive rehearsal (memory 1100)"] > 80
    assert acc["Naive rehearsal (memory 4400)"] > acc["Naive rehearsal (memory 1100)"]
    assert (out / "reproduction.md").read_text().startswith("Reproduction of Hsu")
    records = sorted((out / "runs").glob("*.json"))
    assert len(records) == 3
    mtimes = [p.stat().st_mtime_ns for p in records]
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split("Produced by")[0] == first.stdout.split("Produced by")[0]
    assert [p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*.json"))] == mtimes


def test_unknown_reproduction_and_row_are_one_line_errors(tmp_path):
    proc = cli("reproduce", "nope-2099")
    assert proc.returncode == 2 and "unknown reproduction 'nope-2099'" in proc.stderr
    proc = cli("reproduce", "hsu2018-split-mnist", "--row", "Nothing*", "--out", str(tmp_path))
    assert proc.returncode == 2 and "no row of hsu2018-split-mnist matches" in proc.stderr
    assert reproduce.get("hsu2018-split-mnist") is HSU2018_SPLIT_MNIST
