"""The one run path as `cfbench run` drives it: killed with kill -9 or stopped with SIGTERM, it
keeps every finished run and `--resume` completes the rest, each run exactly once; a stacked
job (seeds, grid points) resumes per run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from cfbench import executors
from cfbench.cli import main
from cfbench.executors import RunSetup, SerialExecutor, make_jobs, run_job
from cfbench.experiment import plan_runs
from cfbench.records import RunRecord, read_records
from cfbench.runs import Outcome, PlannedRun, RunOptions, Sink, run_plan
from tests.test_cli import CFBENCH
from tests.test_sweep import one_thread, write  # noqa: F401 (an autouse fixture)
from tests.test_sweep_failures import PLUGIN, assert_gone, workers_of

RUN = ["run", "--scenario", "split-digits", "--setting", "task,class", "--strategy", "naive",
       "--seeds", "3", "--iterations", "150", "--quiet"]


def start(out: Path, root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([CFBENCH, *args, "--out", str(out), "--data-root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(out: Path, proc: subprocess.Popen, count: int = 1) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if len(list(out.glob("*.json"))) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no run finished in 120 s: {proc.communicate()}")


def test_kill_9_mid_run_then_resume_loses_no_finished_run_and_duplicates_none(
        tmp_path, digits_root, capsys):
    out = tmp_path / "records"
    planned = {c.run_id for c in plan_runs(
        scenario="split-digits", settings=["task", "class"], strategies=["naive"], hparams={},
        seeds=range(3), protocol_overrides={"iterations": 150}, data_root=digits_root)}
    proc = start(out, digits_root, *RUN)
    wait_for_records(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    before = {p.stem: p.read_bytes() for p in out.glob("*.json")}
    assert 1 <= len(before) < len(planned) and set(before) <= planned
    assert main([*RUN, "--out", str(out), "--data-root", str(digits_root), "--resume"]) == 0
    assert (f"{len(planned) - len(before)} ok, 0 failed, 0 interrupted, {len(before)} skipped"
            in capsys.readouterr().err)
    after = {r.run_id: r for r in read_records(out)}
    assert set(after) == planned == {p.stem for p in out.glob("*.json")}
    assert all(r.status == "ok" for r in after.values())
    for run_id, content in before.items():  # kept as they were, not rerun
        assert (out / f"{run_id}.json").read_bytes() == content


def test_sigterm_records_runs_in_flight_as_interrupted_and_keeps_finished_ones(
        tmp_path, digits_root):
    plugin = write(tmp_path, PLUGIN, "plugin_sigterm.py")
    out = tmp_path / "records"
    proc = start(out, digits_root, "run", "--scenario", "split-digits", "--setting", "task",
                 "--strategy", "naive,stall", "--iterations", "5", "--plugin", str(plugin),
                 "--executor", "process", "--workers", "2", "--quiet")
    wait_for_records(out, proc)
    workers = workers_of(proc.pid)
    proc.send_signal(signal.SIGTERM)  # what a cluster scheduler sends
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; finished runs are kept" in err and "Traceback" not in err
    records = {r.config["strategy"]: r for r in read_records(out)}
    assert records["naive"].status == "ok" and records["naive"].R
    assert records["stall"].status == "interrupted" and "SIGTERM" in records["stall"].error
    assert "1 ok, 0 failed, 1 interrupted" in err
    assert_gone(workers)


def test_a_batched_job_whose_seeds_are_partly_done_runs_only_the_missing_ones(
        tmp_path, digits_root, capsys):
    out = tmp_path / "records"
    args = ["run", "--scenario", "split-digits", "--setting", "class", "--strategy", "naive",
            "--seeds", "3", "--iterations", "20", "--batch-seeds", "--out", str(out),
            "--data-root", str(digits_root), "--quiet"]
    assert main(args) == 0
    first = {r.config["seed"]: r for r in read_records(out)}
    assert [first[s].cost["stacked_runs"] for s in range(3)] == [3, 3, 3]
    for seed in (0, 2):
        (out / f"{first[seed].run_id}.json").unlink()
    kept = (out / f"{first[1].run_id}.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "2 ok, 0 failed, 0 interrupted, 1 skipped" in capsys.readouterr().err
    again = {r.config["seed"]: r for r in read_records(out)}
    assert (out / f"{first[1].run_id}.json").read_bytes() == kept
    for seed in (0, 2):  # one job of the two missing seeds, with the records they had
        assert again[seed].cost["stacked_runs"] == 2 and again[seed].R == first[seed].R


def test_a_stacked_grid_whose_runs_are_partly_done_runs_only_the_missing_ones(
        tmp_path, digits_root):
    """Grid points resume as seeds do: of EWC's two lam values x two seeds (one job of four),
    the two runs whose records are gone rerun as one job of two, with the records they had."""
    configs = [c for lam in (10.0, 1000.0) for c in plan_runs(
        scenario="split-digits", settings=["class"], strategies=["ewc"],
        hparams={"ewc": {"lam": lam, "fisher_samples": 64}}, seeds=range(2),
        protocol_overrides={"iterations": 10}, data_root=digits_root)]
    runs, sink = [PlannedRun(c) for c in configs], Sink(out=tmp_path)
    options = RunOptions(SerialExecutor(RunSetup(digits_root)), resume=True, stack=True)
    run_plan(runs, sink, "grid", options)
    first = sink.stored()
    assert [first[c.run_id].cost["stacked_runs"] for c in configs] == [4, 4, 4, 4]
    gone = [configs[0].run_id, configs[3].run_id]
    for run_id in gone:
        (tmp_path / f"{run_id}.json").unlink()
    outcome = run_plan(runs, sink, "grid", options)
    assert len(outcome.ok) == 2 and len(outcome.skipped) == 2
    again = sink.stored()
    for run_id in gone:
        assert again[run_id].cost["stacked_runs"] == 2 and again[run_id].R == first[run_id].R


def test_a_stacked_job_past_its_timeout_fails_every_run_and_reruns_none(digits_root):
    """The alarm stops the job at K x the limit: each run is a failed record, none is
    retried one at a time (which would run without a limit)."""
    job = tuple(plan_runs(scenario="split-digits", settings=["class"], strategies=["naive"],
                          hparams={}, seeds=range(2), protocol_overrides={"iterations": 2000},
                          data_root=digits_root))
    start = time.monotonic()
    records = run_job(job, RunSetup(digits_root, timeout=0.05))
    assert time.monotonic() - start < 5
    assert [(r.status, r.error) for r in records] == [
        ("failed", "RunTimeout: the run exceeded its timeout of 0.1 s and was stopped")] * 2


def test_jobs_stack_only_when_asked_split_to_fill_slots_and_time_out_per_run(
        digits_root, monkeypatch: pytest.MonkeyPatch):
    """Groups that cannot stack say why, once per reason; one that can is split into
    near-equal jobs while that keeps the slots busy, and into jobs of at most MOST_STACKED
    runs."""
    configs = [c for precision, settings in (("fp32", ["class"]), ("bf16", ["class", "task"]))
               for c in plan_runs(scenario="split-digits", settings=settings,
                                  strategies=["naive"], hparams={}, seeds=range(2),
                                  protocol_overrides={"iterations": 5, "precision": precision},
                                  data_root=digits_root)]
    grid = [c for lr in (1e-3, 1e-2, 1e-1) for c in plan_runs(
        scenario="split-digits", settings=["class"], strategies=["naive"], hparams={},
        seeds=range(2), protocol_overrides={"iterations": 5, "lr": lr}, data_root=digits_root)]
    notes: list[str] = []
    jobs = make_jobs(configs, stack=True, note=notes.append)
    assert [len(job) for job in jobs] == [2, 1, 1, 1, 1]
    assert notes == ["naive: runs one at a time (bf16, compiled and fused-optimizer runs are "
                     "not batched (each seed would not get its own run's numbers))"]
    unstacked = make_jobs(configs, stack=False, note=notes.append)
    assert [len(job) for job in unstacked] == [1] * 6 and len(notes) == 1
    setup = RunSetup(digits_root, timeout=10.0)
    assert [setup.limit(job) for job in jobs] == [20.0, 10.0, 10.0, 10.0, 10.0]
    sizes = {slots: [len(job) for job in make_jobs(grid, True, notes.append, slots)]
             for slots in (1, 2, 4, 9)}
    assert sizes == {1: [6], 2: [3, 3], 4: [1, 2, 1, 2], 9: [1] * 6}
    monkeypatch.setattr(executors, "MOST_STACKED", 4)
    assert [len(job) for job in make_jobs(grid, True, notes.append)] == [3, 3]


def test_a_timeout_beyond_the_interval_timer_is_no_limit_not_an_overflow():
    """A finite but astronomically long --timeout (1e300 s) passes validation; the alarm that
    enforces it must not overflow the interval timer."""
    with executors._deadline(1e300):
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 1e8
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


@pytest.mark.parametrize("count", [1, 2])
def test_the_summary_counts_failed_and_interrupted_runs_in_the_right_number(count):
    outcome = Outcome()
    for i in range(count):
        for status in ("failed", "interrupted"):
            outcome.add(RunRecord(run_id=f"{status}{i}", config={}, status=status, error="why"))
    lines = outcome.summary("cfbench run", "results/runs/").splitlines()
    assert lines[0] == (f"cfbench run: 0 ok, {count} failed, {count} interrupted, 0 skipped "
                        "(already ok in results/runs/)")
    if count == 1:
        assert lines[1] == "failed run:" and lines[-1] == ("1 run interrupted; `--resume` "
                                                           "reruns it")
    else:
        assert lines[1] == "failed runs:" and lines[-1] == ("2 runs interrupted; `--resume` "
                                                            "reruns them")
