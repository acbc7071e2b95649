"""Sweeps: the README's sweep file, three executors that agree bit for bit, a diverging run, and
bad sweep files rejected before anything runs (failures of workers and of the sweep itself are
in test_sweep_failures.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from cfbench.cli import main
from cfbench.errors import CfbenchError
from cfbench.store import Store
from cfbench.sweep import plan
from cfbench.sweepfile import load_sweep

ROOT = Path(__file__).resolve().parents[1]


def readme_block(title: str) -> str:
    """The YAML block that follows `title` in the README (the README's example is what runs)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    return re.search(r"```yaml\n(.*?)```", text[start:], re.S).group(1)


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def stored(db: Path) -> dict[str, object]:
    with Store(db) as store:
        assert store.integrity() == "ok"
        return {r.run_id: r for r in store.records()}


def comparable(record) -> tuple:
    """What must not depend on the executor: the config, the outcome, R and the metrics."""
    metrics = {k: v for k, v in record.metrics.items() if v == v}  # NaN != NaN
    return record.config, record.status, record.R, metrics, record.cost["steps"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Serial runs in this process use one torch thread, as each of the two workers on this
    2-core machine does: small runs gain nothing from more, and contended cores lose a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def example(tmp_path_factory, digits_root, one_thread):
    """The README's example sweep, run serially: the reference the other executors must equal."""
    tmp = tmp_path_factory.mktemp("example")
    path = write(tmp, readme_block("### The sweep file"))
    db = tmp / "serial.sqlite"
    assert main(["sweep", str(path), "--executor", "serial", "--store", str(db), "--data-root",
                 str(digits_root), "--quiet"]) == 0
    return path, stored(db)


def test_the_readme_example_runs_every_grid_point_once(example, digits_root, capsys):
    path, records = example
    planned = plan(load_sweep(path), digits_root)
    assert sorted(records) == sorted(r.config.run_id for r in planned)
    assert all(r.status == "ok" and r.command.startswith("cfbench sweep") for r in
               records.values())
    lams = sorted(r.config["hparams"]["ewc"]["lam"] for r in records.values()
                  if r.config["strategy"] == "ewc")
    settings = {r.config["setting"] for r in records.values()}
    seeds = {r.config["seed"] for r in records.values()}
    assert len(records) == len(settings) * len(seeds) * (1 + len(set(lams)))
    assert len(set(lams)) == 2 and len(settings) == 2 and len(seeds) == 2
    # --dry-run lists the same runs, marked as stored, and runs nothing.
    capsys.readouterr()
    assert main(["sweep", str(path), "--dry-run", "--store", str(path.parent / "serial.sqlite"),
                 "--data-root", str(digits_root)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert {line.split()[0] for line in lines} == set(records)
    assert all(line.rstrip().endswith("ok") for line in lines)


def test_process_pool_with_stacked_runs_records_equal_serial(example, tmp_path, digits_root):
    """A worker takes a stacked job (both seeds of naive; both seeds of both lam values of ewc)
    and returns each run's own record."""
    path, serial = example
    db = tmp_path / "process.sqlite"
    assert main(["sweep", str(path), "--executor", "process", "--workers", "2", "--store",
                 str(db), "--out", str(tmp_path / "json"), "--data-root", str(digits_root),
                 "--stack", "--quiet"]) == 0
    pooled = stored(db)
    assert sorted(pooled) == sorted(serial)
    assert sorted(p.stem for p in (tmp_path / "json").glob("*.json")) == sorted(serial)
    for run_id, record in pooled.items():
        assert comparable(record) == comparable(serial[run_id])
        assert record.env["threads"] == 1  # 2 cores // 2 workers
        assert record.cost["stacked_runs"] == (4 if record.config["strategy"] == "ewc" else 2)


def test_ray_records_equal_serial(example, tmp_path, digits_root):
    import ray  # `make test` installs the 'ray' extra: this test is never skipped

    path, serial = example
    db = tmp_path / "ray.sqlite"
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a running one
    try:
        assert main(["sweep", str(path), "--executor", "ray", "--store", str(db),
                     "--data-root", str(digits_root), "--quiet"]) == 0
    finally:
        ray.shutdown()
    remote = stored(db)
    assert sorted(remote) == sorted(serial)
    for run_id, record in remote.items():
        assert comparable(record) == comparable(serial[run_id])
        assert record.env["threads"] == 1  # resources.cpus of each task


def test_a_sweep_file_sets_any_protocol_field_and_a_per_seed_sequence(tmp_path, digits_root):
    """The protocol fields `cfbench run --protocol` sets, read the same way (a list is a grid
    axis; `scenario_seed: seed` gives each training seed its own task sequence)."""
    path = write(tmp_path, "scenarios: split-digits\nsettings: class\nstrategies: naive\n"
                           "seeds: 2\nscenario_seed: seed\nprotocol: {iterations: 5, "
                           "class_scope: all, init: [default, xavier], also_evaluate: task}\n")
    runs = plan(load_sweep(path), digits_root)
    assert len(runs) == 4
    for run in runs:
        c = run.config
        assert (c.protocol.class_scope, c.protocol.also_evaluate) == ("all", ("task",))
        assert c.scenario_seed == c.seed
    assert {r.config.protocol.init for r in runs} == {"default", "xavier"}
    with pytest.raises(CfbenchError, match=r"sweep.yaml:\d+: scenario_seed: expected an integer"):
        load_sweep(write(tmp_path, path.read_text().replace("scenario_seed: seed",
                                                            "scenario_seed: seeds")))


def test_a_diverging_run_fails_naming_the_nonfinite_loss_and_the_others_succeed(
        tmp_path, digits_root, capsys):
    path = write(tmp_path, "scenarios: split-digits\nsettings: class\nstrategies: [naive, ewc]\n"
                           "protocol: {iterations: 10, lr: [0.001, 1.0e+30]}\n")
    db = tmp_path / "runs.sqlite"
    assert main(["sweep", str(path), "--executor", "serial", "--store", str(db),
                 "--data-root", str(digits_root), "--quiet"]) == 1
    records = stored(db).values()
    ok = [r for r in records if r.status == "ok"]
    failed = [r for r in records if r.status == "failed"]
    assert {r.config["protocol"]["lr"] for r in ok} == {0.001} and len(ok) == 2
    assert {r.config["protocol"]["lr"] for r in failed} == {1e30} and len(failed) == 2
    for r in failed:
        assert re.fullmatch(r"NonFiniteLoss: non-finite loss (nan|inf|-inf) at task 1 "
                            r"\('0/1'\), step \d+ of that task; the run was stopped", r.error)
        assert not r.R  # stopped at once: not a single row evaluated after training
    out = capsys.readouterr().out
    assert "2 ok, 2 failed" in out and out.count("NonFiniteLoss") == 2


GOOD = """\
name: ok
scenarios:
  split-digits: {test_fraction: 0.3}
settings: [task]
strategies:
  naive:
  ewc: {lam: [1, 10]}
seeds: 1
protocol: {iterations: 5}
"""


def test_on_an_accelerator_the_first_nonfinite_step_is_found_from_a_device_side_flag(
        digits_root, monkeypatch):
    """The deferred check (read every N steps, as on CUDA) names the same step as the check
    at every step, and still stops the run."""
    from cfbench import train
    from cfbench.experiment import execute, plan_runs

    (config,) = plan_runs(scenario="split-digits", settings=["class"], strategies=["naive"],
                          hparams={}, seeds=[0], protocol_overrides={"lr": 1e30, "iterations": 30},
                          data_root=digits_root)
    at_once = execute(config, digits_root)
    monkeypatch.setattr(train, "reads_are_free", lambda device: False)
    monkeypatch.setattr(train, "NONFINITE_CHECK_EVERY", 7)
    deferred = execute(config, digits_root)
    step = re.search(r"at task 1 \('0/1'\), step (\d+) of that task", at_once.error)
    assert at_once.status == deferred.status == "failed" and step
    assert deferred.error == ("NonFiniteLoss: non-finite loss (nan or inf) at task 1 ('0/1'), "
                              f"step {step.group(1)} of that task; the run was stopped")
    assert not deferred.R


@pytest.mark.parametrize("edit, message", [
    (("seeds: 1", "seeds: 1\nepochs: 3"), r"sweep.yaml:9: epochs: unknown key; valid: name, "),
    (("  naive:", "  naive:\n  ewcc:"), r"sweep.yaml:7: strategies.ewcc: unknown strategy "
                                        r"'ewcc'; did you mean ewc"),
    (("lam: [1, 10]", "lam: []"), r"sweep.yaml:7: strategies.ewc.lam: empty grid"),
    (("lam: [1, 10]", "lam: [1, fast]"), r"sweep.yaml:7: strategies.ewc.lam: bad value 'fast' "
                                          r"for hyperparameter 'lam'"),
    (("lam: [1, 10]", "lamda: 1"), r"sweep.yaml:7: strategies.ewc.lamda: unknown "
                                   r"hyperparameter 'lamda'.*did you mean lam"),
    (("{iterations: 5}", "{iterations: five}"), r"sweep.yaml:9: protocol.iterations: expected "
                                                r"int \| None, got 'five'"),
    (("{iterations: 5}", "{iteration: 5}"), r"sweep.yaml:9: protocol.iteration: unknown key"),
    (("seeds: 1", "seeds: [0, 0]"), r"sweep.yaml:8: seeds: seed listed twice"),
    (("seeds: 1", "seeds: zero"), r"sweep.yaml:8: seeds: expected a number of seeds"),
    (("[task]", "[task, clas]"), r"sweep.yaml:4: settings: unknown setting 'clas'"),
    (("{test_fraction: 0.3}", "{test_fraction: 0.3, tasks: 3}"),
     r"sweep.yaml:3: scenarios.split-digits.tasks: unknown option 'tasks'"),
    (("{test_fraction: 0.3}", "{test_fraction: [0.3, 2]}"),
     r"sweep.yaml:3: scenarios.split-digits: bad options for scenario 'split-digits': "
     r"test_fraction must be in \(0, 1\), got 2"),
    (("split-digits:", "split-digit:"), r"sweep.yaml:3: scenarios.split-digit: unknown "
                                        r"scenario"),
    (("name: ok", "name: ok\nname: again"), r"sweep.yaml:2: duplicate key 'name' \(first at "
                                            r"line 1\)"),
    (("settings: [task]", "settings: [task"), r"sweep.yaml:5: not valid YAML"),
    (("name: ok", "name: 'a b'"), r"sweep.yaml:1: name: 'a b' must be letters"),
    (("seeds: 1", "seeds: 1\ntimeout: -5"), r"sweep.yaml:9: timeout: must be positive"),
    (("seeds: 1", "seeds: 1\nresources: {cpus: 1, gpus: 0.5}"),
     r"sweep.yaml:9: resources.gpus is 0.5 but the runs use device 'cpu'"),
    (("seeds: 1", "seeds: 1\ndevice: tpu"), r"sweep.yaml:9: device: unknown device 'tpu'"),
    (("{iterations: 5}", "{iterations: 5, lr: -1}"),
     r"sweep.yaml:9: protocol.lr: --lr must be positive, got -1"),
])
def test_bad_sweep_files_are_rejected_naming_line_and_key_before_anything_runs(
        tmp_path, digits_root, capsys, edit, message):
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    db = tmp_path / "runs.sqlite"
    assert main(["sweep", str(path), "--store", str(db), "--data-root", str(digits_root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not db.exists()


def test_executor_flags_are_checked_before_anything_runs(tmp_path, digits_root, capsys,
                                                        monkeypatch):
    path = write(tmp_path, GOOD)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["sweep", str(path), "--executor", "ray", "--data-root", str(digits_root)]) == 2
    assert "pip install 'cfbench[ray]'" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["sweep", str(path), "--executor", "serial", "--workers", "2",
                 "--data-root", str(digits_root)]) == 2
    assert "--workers applies to the process and ray executors" in capsys.readouterr().err
    assert main(["sweep", str(path), "--address", "auto", "--data-root", str(digits_root)]) == 2
    assert "--address names a Ray cluster" in capsys.readouterr().err
    for flags in (["--executor", "process"], ["--executor", "ray", "--address", "auto"]):
        assert main(["sweep", str(path), "--ray-dashboard", *flags, "--data-root",
                     str(digits_root)]) == 2
        assert "--ray-dashboard starts the dashboard of the local Ray instance" in \
            capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read sweep file" in capsys.readouterr().err
