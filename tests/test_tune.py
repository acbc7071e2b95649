"""Hyperparameter selection without test-set leakage: the validation split (carved from training
data, stratified, seeded, first k tasks), `cfbench tune` end to end, and its seed rule."""

from __future__ import annotations

import re

import pytest
import torch

from cfbench.cli import main
from cfbench.errors import CfbenchError
from cfbench.experiment import load_scenario
from cfbench.scenario import Protocol, Scenario, Task
from cfbench.sweep import plan
from cfbench.sweepfile import load_sweep
from cfbench.validation import validation_split
from tests.test_sweep import one_thread, readme_block, stored, write  # noqa: F401 (a fixture)


def tagged_scenario(sizes: dict[int, int], tasks: int = 3) -> Scenario:
    """Tasks of two classes whose every sample carries a unique id in its first two pixels, so
    where a sample went can be told exactly."""
    next_id = 0

    def samples(classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal next_id
        ids, labels = [], []
        for c in classes:
            ids += range(next_id, next_id + sizes[c % 2])
            labels += [c] * sizes[c % 2]
            next_id += sizes[c % 2]
        ids_t = torch.tensor(ids)
        x = torch.zeros(len(ids), 1, 2, 2, dtype=torch.uint8)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = ids_t // 256, ids_t % 256
        return x, torch.tensor(labels)

    built = []
    for t in range(tasks):
        classes = (2 * t, 2 * t + 1)
        built.append(Task(f"{classes}", classes, *samples(classes), *samples(classes)))
    return Scenario("tagged", built, Protocol(model="mlp:4"))


def id_list(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


def ids(x: torch.Tensor) -> set[int]:
    return set(id_list(x))


def test_the_validation_split_is_carved_from_train_stratified_and_never_touches_test():
    scenario = tagged_scenario({0: 40, 1: 11})
    val = validation_split(scenario, 0.25, seed=3)
    assert len(val.tasks) == 3
    for orig, task in zip(scenario.tasks, val.tasks, strict=True):
        held, kept = ids(task.x_test), ids(task.x_train)
        assert held | kept == ids(orig.x_train) and not held & kept  # a partition of train
        assert not held & ids(orig.x_test) and not kept & ids(orig.x_test)
        for c, n in zip(orig.classes, (40, 11), strict=True):  # the same fraction per class
            assert int((task.y_test == c).sum()) == round(n * 0.25)
            assert int((task.y_train == c).sum()) == n - round(n * 0.25)
        label_of = dict(zip(id_list(orig.x_train), orig.y_train.tolist(), strict=True))
        assert [label_of[i] for i in id_list(task.x_test)] == task.y_test.tolist()
    assert ids(scenario.tasks[0].x_test) == set(range(51, 102))  # the input is not modified


def test_the_validation_split_is_seeded_and_can_keep_the_first_k_tasks():
    scenario = tagged_scenario({0: 30, 1: 30})
    a, b = validation_split(scenario, 0.2, seed=0), validation_split(scenario, 0.2, seed=0)
    c = validation_split(scenario, 0.2, seed=1)
    assert [ids(t.x_test) for t in a.tasks] == [ids(t.x_test) for t in b.tasks]
    assert [ids(t.x_test) for t in a.tasks] != [ids(t.x_test) for t in c.tasks]
    first = validation_split(scenario, 0.2, seed=0, tasks=2)
    assert [t.name for t in first.tasks] == [t.name for t in scenario.tasks[:2]]
    assert first.n_classes == 4 and [ids(t.x_test) for t in first.tasks] == \
        [ids(t.x_test) for t in a.tasks[:2]]
    with pytest.raises(CfbenchError, match="cannot tune on the first 4 tasks: scenario 'tagged' "
                                           "has 3"):
        validation_split(scenario, 0.2, seed=0, tasks=4)
    with pytest.raises(CfbenchError, match=r"validation fraction must be in \(0, 1\)"):
        validation_split(scenario, 1.0, seed=0)
    with pytest.raises(CfbenchError, match="class 1 has 1 training sample"):
        validation_split(tagged_scenario({0: 5, 1: 1}), 0.2, seed=0)


def test_the_split_of_real_digits_keeps_each_class_share(digits_root):
    scenario = load_scenario("split-digits", {"test_fraction": 0.3}, 0, digits_root, "cpu")
    val = validation_split(scenario, 0.2, seed=0)
    for orig, task in zip(scenario.tasks, val.tasks, strict=True):
        for c in orig.classes:
            n = int((orig.y_train == c).sum())
            assert int((task.y_test == c).sum()) == round(0.2 * n)
        assert len(task.y_train) + len(task.y_test) == len(orig.y_train)


def test_tune_chooses_on_validation_and_reports_the_choice_on_other_seeds(
        tmp_path, digits_root, capsys):
    path = write(tmp_path, readme_block("### Choosing hyperparameters"))
    db = tmp_path / "tuned.sqlite"
    assert main(["tune", str(path), "--executor", "serial", "--store", str(db), "--data-root",
                 str(digits_root), "--quiet"]) == 0
    out = capsys.readouterr().out
    validation = stored(tmp_path / "tuned.validation.sqlite")
    reported = stored(db)
    # Each grid point ran once (one tuning seed) on the first 3 tasks of the carved split.
    assert len(validation) == 3
    for r in validation.values():
        assert r.config["validation"] == {"fraction": 0.2, "seed": 0, "tasks": 3}
        assert r.config["seed"] == 0 and len(r.R[0]) == 3
        assert [t["n_train"] + t["n_test"] for t in r.tasks] == \
            [len(t.y_train) for t in load_scenario("split-digits", {"test_fraction": 0.3}, 0,
                                                   digits_root, "cpu").tasks[:3]]
    # The choice is the first grid point with the best mean validation ACC.
    acc = {r.config["hparams"]["ewc"]["lam"]: r.metrics["acc"] for r in validation.values()}
    grid = [1.0, 100.0, 10000.0]
    chosen = next(lam for lam in grid if acc[lam] == max(acc.values()))
    assert sorted(r.config["seed"] for r in reported.values()) == [1, 2]
    for r in reported.values():
        assert r.config["hparams"]["ewc"]["lam"] == chosen
        assert "validation" not in r.config and len(r.R[0]) == 5  # the test split, all tasks
        assert r.selection["by"] == "cfbench tune" and r.selection["tuning_seeds"] == [0]
        assert r.selection["candidates"] == 3 and r.selection["chosen"] == {"lam": chosen}
        assert r.selection["grid"] == {"lam": [1, 100, 10000]}
        assert r.selection["defaults"] == {"lam": 1000.0}  # ewc's own, shown beside the choice
        assert r.selection["validation_acc"] == acc[chosen]
        assert r.selection["validation"] == {"fraction": 0.2, "seed": 0, "tasks": 3}
    assert f"split-digits/domain/ewc: lam={chosen:g}  validation ACC" in out
    # Selection is not part of the configuration: the ids are those of the same runs by hand.
    by_hand = {r.config.run_id for r in plan(load_sweep(path), digits_root)
               if r.config.hparams["ewc"]["lam"] == chosen}
    assert set(reported) == by_hand
    # A second tune needs --resume, and then reruns nothing and chooses the same.
    args = ["tune", str(path), "--executor", "serial", "--store", str(db), "--data-root",
            str(digits_root), "--quiet"]
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "0 ok, 0 failed, 0 interrupted, 3 skipped" in out
    assert "0 ok, 0 failed, 0 interrupted, 2 skipped" in out
    assert f"split-digits/domain/ewc: lam={chosen:g}  validation ACC" in out
    # The leaderboard names the command that chose the values; show prints the selection.
    assert main(["leaderboard", "--store", str(db), "--format", "md"]) == 0
    board = capsys.readouterr().out
    assert "runs by: cfbench tune" in board
    assert (f"chosen: split-digits domain ewc: lam={chosen:g} (lam from 1/100/10000, default "
            "1000.0), validation ACC") in board
    assert main(["show", next(iter(reported)), "--store", str(db)]) == 0
    assert "selection: lam=" in capsys.readouterr().out


TUNE = """\
scenarios: split-digits
settings: [task]
strategies:
  ewc: {lam: [1, 10]}
seeds: [1, 2]
protocol: {iterations: 5}
tune:
  seeds: [0]
"""


def test_tune_stacks_its_grid_points_and_gets_the_records_of_separate_runs(tmp_path,
                                                                           digits_root):
    """With --stack, the validation runs of both lam values form one job, as do the two
    reported seeds, and every record is the one the unstacked tune gets."""
    path = write(tmp_path, TUNE, "tune.yaml")
    for name, flags in (("alone", []), ("stacked", ["--stack"])):
        assert main(["tune", str(path), "--executor", "serial", "--store",
                     str(tmp_path / f"{name}.sqlite"), "--data-root", str(digits_root),
                     "--quiet", *flags]) == 0
    for stage in ("", ".validation"):
        alone, stacked = (stored(tmp_path / f"{name}{stage}.sqlite")
                          for name in ("alone", "stacked"))
        assert stacked.keys() == alone.keys() and len(alone) == 2
        for run_id, record in stacked.items():
            assert record.R == alone[run_id].R and record.cost["stacked_runs"] == 2


@pytest.mark.parametrize("edit, message", [
    (("seeds: [0]", "seeds: [2, 3]"), r"tune.yaml:7: tune.seeds: seed\(s\) \[2\] are also in "
                                      r"'seeds'; tune on seeds disjoint"),
    (("seeds: [0]", "seeds: [0]\n  tasks: 9"), r"tune.yaml:7: tune: cannot tune on the first 9 "
                                               r"tasks: scenario 'split-digits' has 5"),
    (("seeds: [0]", "seeds: [0]\n  validation: 1.5"), r"tune.yaml:9: tune.validation: .* must "
                                                      r"be below 1"),
    (("seeds: [0]", "seeds: [0]\n  metric: bwt"), r"tune.yaml:9: tune.metric: unknown key"),
    (("tune:\n  seeds: [0]\n", ""), r"tune.yaml: `cfbench tune` needs a 'tune:' section"),
    (("  seeds: [0]\n", "  tasks: 2\n"), r"tune.yaml:7: tune: missing 'seeds'"),
])
def test_bad_tune_sections_are_rejected_before_anything_runs(tmp_path, digits_root, capsys,
                                                             edit, message):
    old, new = edit
    assert old in TUNE
    path = write(tmp_path, TUNE.replace(old, new, 1), "tune.yaml")
    db = tmp_path / "tuned.sqlite"
    assert main(["tune", str(path), "--store", str(db), "--data-root", str(digits_root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not db.exists() and not (tmp_path / "tuned.validation.sqlite").exists()


def test_tune_keeps_validation_records_apart_and_a_fresh_clone_resumes_from_the_records(
        tmp_path, digits_root, capsys):
    """With --out, validation records go to its validation/ subfolder (a leaderboard over --out
    never reads them); a later tune whose stores are gone (a fresh clone: records are committed,
    SQLite files are not) reruns nothing and refills the stores from the records."""
    path = write(tmp_path, TUNE, "tune.yaml")
    out = tmp_path / "runs"
    args = ["tune", str(path), "--executor", "serial", "--data-root", str(digits_root),
            "--quiet", "--out", str(out)]
    assert main([*args, "--store", str(tmp_path / "first.sqlite")]) == 0
    reported = {p.stem for p in out.glob("*.json")}
    validation = {p.stem for p in (out / "validation").glob("*.json")}
    assert len(reported) == 2 and len(validation) == 2 and not reported & validation
    assert reported == set(stored(tmp_path / "first.sqlite"))
    capsys.readouterr()
    fresh = tmp_path / "fresh.sqlite"
    assert main([*args, "--store", str(fresh), "--resume"]) == 0
    out_text = capsys.readouterr().out
    assert out_text.count("0 ok, 0 failed, 0 interrupted, 2 skipped") == 2, out_text
    assert set(stored(fresh)) == reported
    assert set(stored(tmp_path / "fresh.validation.sqlite")) == validation
    assert main(["leaderboard", "--records", str(out), "--format", "csv"]) == 0
    table = capsys.readouterr().out
    assert "ewc" in table and "validation" not in table.lower()


def test_a_resumed_tune_stamps_its_selection_on_runs_recorded_before(tmp_path, digits_root):
    """A reported run already recorded without a selection (run by hand, at the defaults, or by
    an older version) is not rerun, but its record gains the selection that chose it."""
    import json

    path = write(tmp_path, TUNE, "tune.yaml")
    out = tmp_path / "runs"
    args = ["tune", str(path), "--executor", "serial", "--data-root", str(digits_root),
            "--quiet", "--out", str(out)]
    assert main([*args, "--store", str(tmp_path / "first.sqlite")]) == 0
    files = sorted(out.glob("*.json"))
    selections = {f.stem: json.loads(f.read_text())["selection"] for f in files}
    for f in files:
        record = json.loads(f.read_text())
        record["selection"] = None
        f.write_text(json.dumps(record))
    assert main([*args, "--store", str(tmp_path / "second.sqlite"), "--resume"]) == 0
    again = {f.stem: json.loads(f.read_text())["selection"] for f in files}
    assert again == selections and all(s is not None for s in again.values())
    assert {k: r.selection for k, r in stored(tmp_path / "second.sqlite").items()} == selections
