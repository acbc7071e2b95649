"""Sweeps that fail well: a crashed worker, a run past its timeout, the sweep killed with
kill -9, Ctrl-C. Nothing finished is lost, nothing runs twice, and resume completes the rest."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cfbench.cli import main
from cfbench.store import Store
from cfbench.sweep import plan
from cfbench.sweepfile import load_sweep
from tests.test_sweep import one_thread, stored, write  # noqa: F401 (an autouse fixture)

CFBENCH = str(Path(sys.executable).parent / "cfbench")


PLUGIN = """
import os
import signal
import time

from cfbench import Strategy, register_strategy


@register_strategy("crash", family="test")
class Crash(Strategy):
    '''Kills its own process, as the out-of-memory killer would.'''

    def setup(self, ctx):
        os.kill(os.getpid(), signal.SIGKILL)


@register_strategy("stall", family="test")
class Stall(Strategy):
    '''Never finishes its first task.'''

    def setup(self, ctx):
        time.sleep(600)
"""


def test_crashed_workers_and_timeouts_are_failed_records_and_the_sweep_goes_on(
        tmp_path, digits_root, capsys):
    plugin = write(tmp_path, PLUGIN, "plugin_failures.py")
    path = write(tmp_path, "scenarios: split-digits\nsettings: task\nstrategies: [crash, stall,"
                           " naive]\nprotocol: {iterations: 5}\ntimeout: 4\n")
    db = tmp_path / "runs.sqlite"
    start = time.monotonic()
    assert main(["sweep", str(path), "--workers", "2", "--store", str(db), "--plugin",
                 str(plugin), "--data-root", str(digits_root), "--quiet"]) == 1
    assert time.monotonic() - start < 60  # the stalled run was stopped, not waited for
    runs = {r.config["strategy"]: r for r in stored(db).values()}
    assert runs["naive"].status == "ok" and len(runs["naive"].R) == 6
    assert runs["crash"].status == "failed"
    assert runs["crash"].error.startswith("WorkerCrashed: the worker process died (killed by "
                                          "SIGKILL)")
    assert runs["stall"].status == "failed"
    assert runs["stall"].error.startswith("RunTimeout: the run exceeded its timeout of 4 s")
    assert "1 ok, 2 failed, 0 interrupted" in capsys.readouterr().out


SLOW = ("name: slow\nscenarios: split-digits\nsettings: [task, class]\nstrategies: [naive]\n"
        "seeds: 3\nprotocol: {iterations: 60}\n")


def start_sweep(path: Path, db: Path, root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([CFBENCH, "sweep", str(path), "--workers", "2", "--store", str(db),
                             "--data-root", str(root), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_ctrl_c)


def _default_ctrl_c() -> None:
    """A test run started in the background (`cmd &` in a script) ignores SIGINT, and the
    sweep would inherit that: give it Ctrl-C's default, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_ok(db: Path, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if db.is_file():
            with Store(db) as store:
                if len(store.finished_ids()) >= count:
                    return
        time.sleep(0.1)
    raise AssertionError("the sweep finished no run in 120 s")


def test_kill_9_mid_sweep_then_resume_completes_every_run_exactly_once(
        tmp_path, digits_root, capsys):
    path = write(tmp_path, SLOW)
    planned = {r.config.run_id for r in plan(load_sweep(path), digits_root)}
    db = tmp_path / "runs.sqlite"
    proc = start_sweep(path, db, digits_root)
    wait_for_ok(db, proc, 1)
    workers = workers_of(proc.pid)
    assert len(workers) == 3  # the fork server and two workers
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert_gone(workers)  # the server sees its driver gone; the kernel kills the workers
    before = stored(db)  # integrity_check passes after the kill
    assert 1 <= len(before) < len(planned) and set(before) <= planned
    resume = ["sweep", str(path), "--executor", "serial", "--store", str(db), "--data-root",
              str(digits_root), "--quiet"]
    # Without --resume an existing store is an error that says what to do.
    assert main(resume) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*resume, "--resume"]) == 0
    assert f"{len(planned) - len(before)} ok, 0 failed, 0 interrupted, {len(before)} skipped" \
        in capsys.readouterr().out
    after = stored(db)
    assert set(after) == planned and all(r.status == "ok" for r in after.values())
    for run_id, record in before.items():  # finished runs were kept, not rerun
        assert after[run_id].finished_at == record.finished_at
        assert after[run_id].started_at == record.started_at


SPIN = """
from pathlib import Path

from cfbench import Strategy, register_strategy


@register_strategy("spin", family="test")
class Spin(Strategy):
    '''Computes forever, after saying it started.'''

    def setup(self, ctx):
        Path(__file__).with_suffix(".started").touch()
        while True:
            pass
"""


def test_no_process_of_a_sweep_outlives_its_driver_killed_mid_run_by_kill_9(tmp_path,
                                                                            digits_root):
    plugin = write(tmp_path, SPIN, "plugin_spin.py")
    path = write(tmp_path, "scenarios: split-digits\nsettings: task\nstrategies: spin\n"
                           "protocol: {iterations: 5}\n")
    proc = start_sweep(path, tmp_path / "runs.sqlite", digits_root, "--plugin", str(plugin))
    deadline = time.monotonic() + 60
    while not plugin.with_suffix(".started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    family = descendants(proc.pid)
    try:
        assert len(family) == 3  # the resource tracker, the fork server, the busy worker
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert_gone(family)  # the fork server exits once it reads EOF: slow on a busy machine
    finally:  # a failure must not leave a busy worker behind
        proc.kill()
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def test_ctrl_c_records_runs_in_flight_as_interrupted_and_resume_completes_them(
        tmp_path, digits_root, capsys):
    path = write(tmp_path, SLOW)
    db = tmp_path / "runs.sqlite"
    proc = start_sweep(path, db, digits_root, "--executor", "process")
    wait_for_ok(db, proc, 1)
    workers = workers_of(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; finished runs are kept" in err and "Traceback" not in err
    assert "--resume" in out
    records = stored(db)
    interrupted = [r for r in records.values() if r.status == "interrupted"]
    assert 1 <= len(interrupted) <= 2  # the two workers' runs in flight
    assert all("Ctrl-C" in r.error for r in interrupted)
    assert sum(r.status == "ok" for r in records.values()) >= 1
    assert_gone(workers)
    assert main(["sweep", str(path), "--executor", "serial", "--store", str(db), "--resume",
                 "--data-root", str(digits_root), "--quiet"]) == 0
    after = stored(db)
    assert len(after) == 6 and all(r.status == "ok" for r in after.values())
    for record in interrupted:
        assert after[record.run_id].R


def workers_of(pid: int) -> list[int]:
    """The fork server `pid` started and the workers it forked (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if b"forkserver" in (stat.parent / "cmdline").read_bytes():
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    server = [p for p, parent in parents.items() if parent == pid]
    return server + [p for p, parent in parents.items() if parent in server]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc): the fork server, the resource tracker and
    the workers of a sweep."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def assert_gone(pids: list[int], within: float = 30.0) -> None:
    """Workers do not outlive their sweep, however it ended."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"worker processes {alive} outlived their sweep")
