"""Protocol speed flags, checked on the CPU: bfloat16 autocast (forward passes in bf16,
weights and optimizer state in fp32), torch.compile (the eager result, the model unchanged for
strategies that copy it) and the fused optimizer kernel; and that adding them left earlier run
ids valid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from cfbench import experiment, train
from cfbench.batched import can_batch
from cfbench.cli import main
from cfbench.errors import CfbenchError
from cfbench.experiment import plan_runs
from cfbench.records import RunConfig, read_records
from cfbench.scenario import Protocol
from tests.helpers import diagonal, run_one


def spy_on_linear_outputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, torch.dtype,
                                                                           torch.dtype]]:
    """(training?, output dtype, weight dtype) of every Linear forward in the runs that follow."""
    seen: list[tuple[bool, torch.dtype, torch.dtype]] = []
    build = experiment.initial_model

    def initial_model(*args, **kwargs):
        model = build(*args, **kwargs)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(
                    lambda m, _, out: seen.append((m.training, out.dtype, m.weight.dtype)))
        return model

    monkeypatch.setattr(experiment, "initial_model", initial_model)
    return seen


def test_bf16_runs_training_and_evaluation_forwards_in_bfloat16_with_fp32_weights(
        digits_root, monkeypatch):
    seen = spy_on_linear_outputs(monkeypatch)
    fp32 = run_one(digits_root, "split-digits", "task", "naive", iterations=60)
    assert {dtype for _, dtype, _ in seen} == {torch.float32}
    seen.clear()
    bf16 = run_one(digits_root, "split-digits", "task", "naive", iterations=60,
                   precision="bf16")
    assert {(training, dtype) for training, dtype, _ in seen} == {
        (True, torch.bfloat16), (False, torch.bfloat16)}
    assert {weight for _, _, weight in seen} == {torch.float32}
    assert bf16.config["protocol"]["precision"] == "bf16"
    # Different rounding, so different weights; the same skill.
    assert bf16.metrics["drift"] != fp32.metrics["drift"]
    assert diagonal(bf16).min() > 0.85
    assert abs(bf16.metrics["acc"] - fp32.metrics["acc"]) < 0.03


def test_a_compiled_model_gives_the_eager_result_and_can_be_copied(digits_root):
    # LwF deep-copies the model as its teacher, so the compiled module must survive a copy.
    eager = run_one(digits_root, "split-digits", "class", "lwf", iterations=40)
    graphs = counters["stats"]["unique_graphs"]
    compiled = run_one(digits_root, "split-digits", "class", "lwf", iterations=40, compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo did compile
    assert compiled.config["protocol"]["compile"] is True
    np.testing.assert_allclose(compiled.R, eager.R, atol=0.01)
    assert compiled.cost["train_flops"] == eager.cost["train_flops"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_fused_optimizer_is_used_and_gives_the_same_skill(digits_root, monkeypatch,
                                                               optimizer):
    built = []
    make = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda *a: built.append(make(*a)) or built[-1])
    lr = {"adam": 1e-3, "sgd": 1e-2}[optimizer]
    plain = run_one(digits_root, "split-digits", "task", "ewc", iterations=60,
                    optimizer=optimizer, lr=lr)
    assert {o.defaults["fused"] for o in built} == {None}
    built.clear()
    fused = run_one(digits_root, "split-digits", "task", "ewc", iterations=60,
                    optimizer=optimizer, lr=lr, fused_optimizer=True)
    assert len(built) == 5 and {o.defaults["fused"] for o in built} == {True}
    np.testing.assert_allclose(fused.R, plain.R, atol=0.02)
    assert fused.metrics["drift"] == pytest.approx(plain.metrics["drift"], rel=1e-3)


def test_the_new_fields_leave_ids_of_default_runs_unchanged(digits_root):
    (config,) = plan_runs(scenario="split-digits", settings=["class"], strategies=["naive"],
                          hparams={}, seeds=[0], data_root=digits_root)
    recorded = config.to_dict()["protocol"]
    assert not {"precision", "compile", "fused_optimizer"} & set(recorded)
    assert RunConfig.from_dict(config.to_dict()) == config
    ids = {config.run_id}
    for change in ({"precision": "bf16"}, {"compile": True}, {"fused_optimizer": True}):
        other = dataclasses.replace(config, protocol=dataclasses.replace(config.protocol,
                                                                         **change))
        assert other.to_dict()["protocol"].items() >= change.items()
        assert RunConfig.from_dict(other.to_dict()) == other
        ids.add(other.run_id)
    assert len(ids) == 4


def test_bad_precision_is_refused_and_flagged_runs_are_not_seed_batched(digits_root):
    with pytest.raises(CfbenchError, match="unknown precision 'fp16'; use fp32 or bf16"):
        Protocol(precision="fp16")
    (config,) = plan_runs(scenario="split-digits", settings=["class"], strategies=["naive"],
                          hparams={}, seeds=[0], data_root=digits_root,
                          protocol_overrides={"precision": "bf16"})
    assert can_batch(config).startswith("bf16, compiled and fused-optimizer runs are not")
    fp32 = dataclasses.replace(config, protocol=dataclasses.replace(config.protocol,
                                                                     precision="fp32"))
    assert can_batch(fp32) is None
    for change in ({"compile": True}, {"fused_optimizer": True}):
        assert can_batch(dataclasses.replace(
            fp32, protocol=dataclasses.replace(fp32.protocol, **change))) is not None


def test_the_command_line_records_the_flags(digits_root, tmp_path, capsys):
    out = tmp_path / "records"
    assert main(["run", "--scenario", "split-digits", "--setting", "task", "--strategy",
                 "naive", "--iterations", "5", "--precision", "bf16", "--quiet",
                 "--data-root", str(digits_root), "--out", str(out)]) == 0
    (record,) = read_records(out)
    assert record.config["protocol"]["precision"] == "bf16"
    assert "compile" not in record.config["protocol"]
    assert main(["run", "--scenario", "split-digits", "--strategy", "naive", "--precision",
                 "fp16"]) == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
