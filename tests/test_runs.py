"""The one run path as `cfbench run` drives it: killed with kill -9 or stopped with SIGTERM, it
keeps every finished run and `--resume` completes the rest, each run exactly once; seed batching
resumes per run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from cfbench.cli import main
from cfbench.executors import RunSetup, make_jobs
from cfbench.experiment import plan_runs
from cfbench.records import read_records
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
    assert [first[s].cost["batched_seeds"] for s in range(3)] == [3, 3, 3]
    for seed in (0, 2):
        (out / f"{first[seed].run_id}.json").unlink()
    kept = (out / f"{first[1].run_id}.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "2 ok, 0 failed, 0 interrupted, 1 skipped" in capsys.readouterr().err
    again = {r.config["seed"]: r for r in read_records(out)}
    assert (out / f"{first[1].run_id}.json").read_bytes() == kept
    for seed in (0, 2):  # one job of the two missing seeds, with the records they had
        assert again[seed].cost["batched_seeds"] == 2 and again[seed].R == first[seed].R


def test_jobs_group_seeds_only_when_batching_and_time_out_per_run(digits_root):
    configs = [c for precision in ("fp32", "bf16") for c in plan_runs(
        scenario="split-digits", settings=["class"], strategies=["naive"], hparams={},
        seeds=range(2), protocol_overrides={"iterations": 5, "precision": precision},
        data_root=digits_root)]
    notes: list[str] = []
    jobs = make_jobs(configs, batch_seeds=True, note=notes.append)
    assert [[c.seed for c in job] for job in jobs] == [[0, 1], [0], [1]]
    assert len(notes) == 1 and notes[0].startswith("naive: seeds run one at a time (bf16")
    unbatched = make_jobs(configs, batch_seeds=False, note=notes.append)
    assert [len(job) for job in unbatched] == [1, 1, 1, 1] and len(notes) == 1
    setup = RunSetup(digits_root, timeout=10.0)
    assert [setup.limit(job) for job in jobs] == [20.0, 10.0, 10.0]
