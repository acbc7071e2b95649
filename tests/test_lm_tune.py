"""`cfbench tune` on the language-model scenarios: the validation split holds out whole token
windows (their labels are per token, so there are no classes to stratify), and a tune on a
tiny budget chooses a point and reports it on the test split."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cfbench.cli import main
from cfbench.errors import CfbenchError
from cfbench.validation import validation_split
from tests.test_language import SMALL, small_scenario
from tests.test_sweep import one_thread, stored, write  # noqa: F401 (a fixture)


def indexed(scenario):
    """`scenario` with each training window's index appended as its last token, so where a
    window went can be told exactly (the split reads neither tokens nor labels)."""
    tasks = [dataclasses.replace(t, x_train=torch.cat(
        [t.x_train, torch.arange(len(t.x_train), dtype=t.x_train.dtype)[:, None]], 1))
        for t in scenario.tasks]
    return dataclasses.replace(scenario, tasks=tasks)


def test_the_split_of_a_language_task_holds_out_whole_training_windows(language_root):
    scenario = indexed(small_scenario(language_root))
    val = validation_split(scenario, 0.2, seed=3)
    for orig, task in zip(scenario.tasks, val.tasks, strict=True):
        held, kept = task.x_test[:, -1].tolist(), task.x_train[:, -1].tolist()
        assert len(held) == round(0.2 * SMALL["train_chars"])
        assert sorted(held + kept) == list(range(SMALL["train_chars"]))  # a partition
        assert held == sorted(held) and kept == sorted(kept)  # original order in each part
        assert torch.equal(task.x_test, orig.x_train[held])  # whole windows, with their labels
        assert torch.equal(task.y_test, orig.y_train[held])
        assert torch.equal(task.y_train, orig.y_train[kept])
    assert val.tasks[0].x_val is scenario.tasks[0].x_val  # the source's own split stays


def test_the_language_split_never_reads_the_test_split_and_is_seeded(language_root):
    scenario = small_scenario(language_root)
    blank = dataclasses.replace(scenario, tasks=[
        dataclasses.replace(t, x_test=torch.zeros_like(t.x_test), y_test=torch.zeros_like(
            t.y_test)) for t in scenario.tasks])
    a, b = validation_split(scenario, 0.2, seed=3), validation_split(blank, 0.2, seed=3)
    other = validation_split(scenario, 0.2, seed=4)
    for x, y, z in zip(a.tasks, b.tasks, other.tasks, strict=True):
        assert torch.equal(x.x_test, y.x_test) and torch.equal(x.x_train, y.x_train)
        assert not torch.equal(x.x_test, z.x_test)
    assert [len(t.y_test) for t in validation_split(scenario, 1e-6, seed=0).tasks] == [1, 1]
    one = dataclasses.replace(scenario, tasks=[dataclasses.replace(
        t, x_train=t.x_train[:1], y_train=t.y_train[:1]) for t in scenario.tasks])
    with pytest.raises(CfbenchError, match="task 'english' has 1 training sample"):
        validation_split(one, 0.2, seed=0)


TUNE = f"""\
scenarios:
  lm-general-to-code: {SMALL}
strategies:
  l2-sp: {{alpha: [0.01, 10]}}
seeds: [1]
protocol: {{iterations: 3, batch_size: 16}}
tune:
  seeds: [0]
"""


def test_tune_on_a_language_scenario_chooses_on_validation_windows(tmp_path, language_root,
                                                                   capsys):
    path = write(tmp_path, TUNE, "tune.yaml")
    db, out = tmp_path / "tuned.sqlite", tmp_path / "runs"
    assert main(["tune", str(path), "--executor", "serial", "--store", str(db), "--data-root",
                 str(language_root), "--out", str(out), "--quiet"]) == 0
    validation = stored(tmp_path / "tuned.validation.sqlite")
    assert len(validation) == 2
    for r in validation.values():
        assert r.config["validation"] == {"fraction": 0.2, "seed": 0, "tasks": None}
        assert [t["n_train"] + t["n_test"] for t in r.tasks] == [SMALL["train_chars"]] * 2
    acc = {r.config["hparams"]["l2-sp"]["alpha"]: r.metrics["acc"] for r in validation.values()}
    chosen = next(a for a in (0.01, 10.0) if acc[a] == max(acc.values()))
    (reported,) = stored(db).values()
    assert "validation" not in reported.config and reported.config["seed"] == 1
    assert [t["n_test"] for t in reported.tasks] == [SMALL["heldout_chars"]] * 2
    assert reported.config["hparams"]["l2-sp"]["alpha"] == chosen
    assert reported.selection["chosen"] == {"alpha": chosen}
    assert reported.selection["validation_acc"] == acc[chosen]
    capsys.readouterr()
    assert main(["leaderboard", "--records", str(out), "--format", "md"]) == 0
    table = capsys.readouterr().out
    assert "| l2-sp |" in table  # and how its value was chosen:
    assert "chosen: lm-general-to-code domain l2-sp: alpha=" in table
