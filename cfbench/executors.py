"""Where runs execute: serially, in a local process pool, or as Ray tasks.

The unit of work is a job (`make_jobs`): with stacking on, runs that can train as one stacked
job (seeds and grid points, ``cfbench.batched``), else one run; `run_job`, the one caller of the
engine, executes it.
``executor.run(jobs, on_records, on_start)`` tells the driver when each job starts and hands it
the job's records as it ends, so the driver alone writes the sink. A run never takes the
others down: an exception or a non-finite loss is a failed record, a job past its timeout is
stopped and a dead worker (killed, out of memory) replaced, each run they held recorded as
failed with the reason; on KeyboardInterrupt the runs in flight are recorded as interrupted,
workers are stopped, and it propagates.

Workers are forked from a ``forkserver`` process that has imported torch and cfbench but run
nothing, so no fork ever happens after torch started threads, and a worker (or its replacement
after a crash) starts in a fraction of a second instead of importing torch again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from cfbench.errors import CfbenchError
from cfbench.records import RunConfig, RunRecord
from cfbench.registry import load_plugin

KILL_GRACE_S = 30.0
"""A job past its timeout normally stops itself (an alarm inside the job); a worker still busy
this much later is killed by the driver."""

OnRecords = Callable[[list[RunRecord]], None]
Job = tuple[RunConfig, ...]
"""Configurations run together: the runs of one stacked job, or a single one."""
OnStart = Callable[[Job], None]


@dataclass(frozen=True)
class RunSetup:
    """What every worker needs to execute a job."""

    data_root: Path
    plugins: tuple[str, ...] = ()
    """Python files registering strategies or scenarios, imported in every worker."""
    timeout: float | None = None
    """Seconds a run may take (training and evaluation; loading the data is not counted);
    past it the run is recorded as failed. A stacked job of K runs may take K times this."""

    def limit(self, job: Job) -> float | None:
        """The timeout of `job`: the per-run timeout times the runs it holds."""
        return None if self.timeout is None else self.timeout * len(job)

    def kill_at(self, job: Job, started: float) -> float:
        """When (`time.monotonic`) the driver stops a job started at `started`."""
        limit = self.limit(job)
        return math.inf if limit is None else started + limit + KILL_GRACE_S


def _wait_until(moment: float) -> float | None:
    """Seconds from now until `moment`, as a timeout for a wait (None: forever)."""
    return None if moment == math.inf else max(0.0, moment - time.monotonic())


class RunTimeout(TimeoutError):
    """A run exceeded its time limit (raised inside the run by an alarm). A TimeoutError, so
    the engine knows it without importing this module (a stacked job does not rerun it)."""


def cpu_count() -> int:
    """Cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise RunTimeout in this thread once `seconds` have passed (main thread only; elsewhere
    the driver's kill after KILL_GRACE_S is the limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = True

    def alarm(signum: int, frame: Any) -> None:
        if armed:
            raise RunTimeout(f"the run exceeded its timeout of {seconds:g} s and was stopped")

    previous = signal.signal(signal.SIGALRM, alarm)
    # The interval timer overflows past about 2^31 s; a limit beyond years is no limit.
    signal.setitimer(signal.ITIMER_REAL, min(seconds, 2.0**30))
    try:
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _warm_up() -> None:
    """Pay a fresh worker's one-time costs (imports, registries, the FLOP counter, the git sha)
    before its first run, so they count against no run's timeout or clock."""
    from cfbench import registry
    from cfbench.records import environment
    from cfbench.train import warm_up

    registry.strategies.load()
    registry.scenarios.load()
    warm_up()
    environment("cpu")


MOST_STACKED = 16
"""Runs in one stacked job at most: a job holds K models and strategy states and may take K
times the timeout, and past tens of members a CPU's caches no longer hold the stacked weights,
so each member's step costs more."""


def make_jobs(configs: Sequence[RunConfig], stack: bool, note: Callable[[str], None],
              slots: int = 1) -> list[Job]:
    """`configs` as jobs: without `stack` one job per run. With it, the runs of each group that
    can share a stacked job (``cfbench.batched.stack_groups``: seeds, learning rates and grid
    points of per-member hyperparameters) do, a group split into near-equal jobs where that
    keeps `slots` jobs running at once (runs in parallel beat a longer stack) or its jobs at
    most MOST_STACKED runs; `note` is told, once per reason, why a group cannot stack."""
    if not stack:
        return [(config,) for config in configs]
    from cfbench.batched import stack_groups

    groups = stack_groups(configs)
    notes = [f"{g.configs[0].strategy}: runs one at a time ({g.reason})" for g in groups
             if g.reason is not None and len(g.configs) > 1]
    for line in dict.fromkeys(notes):
        note(line)
    stacks = [g.configs for g in groups if g.reason is None]
    alone = sum(len(g.configs) for g in groups if g.reason is not None)
    parts = [-(-len(runs) // MOST_STACKED) for runs in stacks]
    while stacks and alone + sum(parts) < slots:
        i = max(range(len(stacks)), key=lambda j: len(stacks[j]) / parts[j])
        if parts[i] == len(stacks[i]):  # every job holds one run
            break
        parts[i] += 1
    chunks = iter([[runs[j * len(runs) // n:(j + 1) * len(runs) // n] for j in range(n)]
                   for runs, n in zip(stacks, parts, strict=True)])
    return [job for g in groups
            for job in (next(chunks) if g.reason is None else [(c,) for c in g.configs])]


def run_job(job: Job, setup: RunSetup) -> list[RunRecord]:
    """Execute one job in this process: a record per configuration, whatever happens."""
    from cfbench.batched import execute_batched
    from cfbench.experiment import execute, load_scenario

    try:
        for path in setup.plugins:
            load_plugin(path)
        # Loading the data is a worker's one-time cost (it is cached), not the run's: it is
        # done before the clock starts. A failure here recurs inside the run, which records it.
        first = job[0]
        with contextlib.suppress(Exception):
            load_scenario(first.scenario, first.scenario_options, first.scenario_seed,
                          setup.data_root, first.device)
        with _deadline(setup.limit(job)):
            if len(job) == 1:
                return [execute(first, setup.data_root)]
            return execute_batched(job, setup.data_root)
    except TimeoutError as exc:  # fired outside the engine's handler, or a stacked job's
        return _unfinished(job, "failed", f"{type(exc).__name__}: {exc}")
    except CfbenchError as exc:  # the worker's environment differs from the driver's
        return _unfinished(job, "failed", f"CfbenchError: {exc}")


class Executor(ABC):
    """Runs jobs and hands their records to `on_records` in the calling process."""

    setup: RunSetup

    @property
    def slots(self) -> int:
        """Jobs run at once, as far as it is known before they start (`make_jobs` splits
        stacked groups to keep them busy): the workers asked for, else one."""
        return getattr(self, "workers", None) or 1

    @abstractmethod
    def run(self, jobs: Sequence[Job], on_records: OnRecords, on_start: OnStart) -> None:
        """Execute every job, calling `on_start` as it is handed to a worker and handing over
        its records as it ends; on KeyboardInterrupt hand over the runs in flight as
        interrupted and re-raise it."""


def _unfinished(job: Job, status: str, reason: str, started_at: str = "") -> list[RunRecord]:
    """The records of a job's runs that did not finish (failed or interrupted)."""
    from cfbench.experiment import unfinished_record

    return [unfinished_record(config, status, reason, started_at) for config in job]


def _interrupted(job: Job, started_at: str) -> list[RunRecord]:
    return _unfinished(job, "interrupted", "interrupted (Ctrl-C or SIGTERM) while running; "
                       "`--resume` reruns it", started_at)


@dataclass
class SerialExecutor(Executor):
    """One run after another in this process (the scenario's tensors are loaded once)."""

    setup: RunSetup

    def run(self, jobs: Sequence[Job], on_records: OnRecords, on_start: OnStart) -> None:
        for job in jobs:
            started = _now()
            on_start(job)
            try:
                records = run_job(job, self.setup)
            except KeyboardInterrupt:
                on_records(_interrupted(job, started))
                raise
            on_records(records)


# ---------------------------------------------------------------- local process pool


PRELOAD = ["torch", "cfbench.experiment", "cfbench.executors", "cfbench.strategies",
           "cfbench.scenarios", "torch._dynamo", "torch._inductor", "torch.onnx", "sympy"]
"""Imported once by the fork server; every worker forked from it starts with them (the last
four are what the FLOP counter imports on first use: seconds per worker otherwise)."""


def _die_with_driver() -> None:
    """Exit the moment the driver exits, even by kill -9, whatever this worker is doing.

    Its parent sentinel is a pipe whose write end only the driver holds, so it turns ready when
    the driver dies; a daemon thread waits on it (on every OS). The kernel's parent-death
    signal would watch the fork server instead, which never sees the driver go while a worker
    lives: each worker inherits the server's "alive" pipe. Once the workers are gone, the
    server and the resource tracker read EOF and exit too."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="cfbench-driver-watch", daemon=True).start()


def _worker_main(conn: Connection, setup: RunSetup, threads: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):  # the driver's to handle, for the group too
        signal.signal(signum, signal.SIG_IGN)
    _die_with_driver()
    import torch

    torch.set_num_threads(threads)
    _warm_up()
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(run_job(job, setup))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    job: Job | None = None
    started_at: str = ""
    started: float = 0.0


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


@dataclass
class ProcessExecutor(Executor):
    """A pool of long-lived worker processes (forked by a ``forkserver`` that never ran torch),
    each given one job at a time, so the driver always knows which runs a worker holds. Each
    worker uses cores // workers torch threads (at least one), so the pool does not oversubscribe
    the machine."""

    setup: RunSetup
    workers: int = field(default_factory=cpu_count)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise CfbenchError(f"--workers must be at least 1, got {self.workers}")

    def _start(self, context: Any, threads: int) -> _Worker:
        here, there = context.Pipe()
        process = context.Process(target=_worker_main, daemon=True, name="cfbench-worker",
                                  args=(there, self.setup, threads))
        process.start()
        there.close()
        return _Worker(process, here)

    def run(self, jobs: Sequence[Job], on_records: OnRecords, on_start: OnStart) -> None:
        todo = deque(jobs)
        size = min(self.workers, len(todo))
        if not size:
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        threads = max(1, cpu_count() // size)
        pool = [self._start(context, threads) for _ in range(size)]
        try:
            while True:
                for worker in pool:
                    if worker.job is None and todo:
                        worker.job, worker.started_at = todo.popleft(), _now()
                        worker.started = time.monotonic()
                        worker.conn.send(worker.job)
                        on_start(worker.job)
                busy = [w for w in pool if w.job is not None]
                if not busy:
                    return
                wait([o for w in busy for o in (w.conn, w.process.sentinel)], timeout=_wait_until(
                    min(self.setup.kill_at(w.job, w.started) for w in busy if w.job)))
                for worker in busy:
                    records, alive = self._collect(worker)
                    if records is None:
                        continue
                    worker.job = None
                    if not alive:
                        worker.conn.close()
                        pool[pool.index(worker)] = self._start(context, threads)
                    on_records(records)
        except KeyboardInterrupt:
            for worker in pool:
                if worker.job is not None:
                    on_records(_interrupted(worker.job, worker.started_at))
            raise
        finally:
            for worker in pool:
                if worker.process.is_alive():
                    worker.process.kill()
                worker.process.join()
                worker.conn.close()

    def _collect(self, worker: _Worker) -> tuple[list[RunRecord] | None, bool]:
        """(the records, whether the worker lives) once the worker's job has ended: its own
        records, or failed ones if it died or was killed for overrunning; (None, True) while
        the job goes on."""
        job = worker.job
        assert job is not None
        if worker.conn.poll():
            try:
                return worker.conn.recv(), True
            except (EOFError, OSError):
                pass  # it died while sending: a crash, below
        elapsed = time.monotonic() - worker.started
        if worker.process.is_alive():
            if time.monotonic() < self.setup.kill_at(job, worker.started):
                return None, True
            worker.process.kill()
            worker.process.join()
            reason = (f"RunTimeout: the run exceeded its timeout of {self.setup.limit(job):g} s "
                      f"and its worker, still busy after {elapsed:.0f} s, was killed")
        else:
            worker.process.join()
            reason = (f"WorkerCrashed: the worker process died "
                      f"({_signal_name(worker.process.exitcode)}) {elapsed:.1f} s into this run")
        return _unfinished(job, "failed", reason, worker.started_at), False


# ---------------------------------------------------------------- Ray


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise CfbenchError("the ray executor needs Ray, which is not installed: pip install "
                           "'cfbench[ray]' (or pip install ray)") from None
    return ray


def _ray_task(job: Job, setup: RunSetup, threads: int) -> list[RunRecord]:
    import ray
    import torch

    torch.set_num_threads(threads)
    _warm_up()  # once per Ray worker process: its parts are cached
    records = run_job(job, setup)
    node = ray.get_runtime_context().get_node_id()
    for record in records:
        record.env["ray_node"] = node  # which node of the cluster ran it
    return records


def _check_dashboard() -> None:
    """Ray's dashboard needs packages minimal Ray lacks: say so before anything runs."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (what Ray checks before starting it)
    except ImportError as exc:
        raise CfbenchError(f"--ray-dashboard needs Ray's dashboard packages ({exc}): pip "
                           "install 'ray[default]'") from None


@dataclass
class RayExecutor(Executor):
    """Each job a Ray task requesting `cpus` CPUs and `gpus` GPUs (a fraction lets several
    small runs share one GPU). At most `workers` tasks are submitted at once (default: as many
    as the cluster's CPUs hold), so those in flight are those running; records stream back to
    the driver as tasks finish. Connects to `address` (e.g. ``auto``, ``HOST:PORT`` or
    ``ray://head:10001``), or starts a local Ray instance (with its dashboard if `dashboard`)
    when none is given, never joining whatever RAY_ADDRESS or ``ray start`` left around; uses
    the instance already initialised in this process if there is one."""

    setup: RunSetup
    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    workers: int | None = None
    dashboard: bool = False

    def _init(self, ray: Any) -> None:
        """Start or join Ray without its start-up lines (its informational log, its workers'
        output, the notice that it enabled token authentication); its warnings and errors
        still show, and a run's own failure is in its record."""
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        try:
            context = ray.init(address=self.address or "local",
                               include_dashboard=self.dashboard, logging_level=logging.WARNING,
                               log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f" at {self.address}" if self.address else ""
            raise CfbenchError(f"cannot start or reach Ray{where}: {exc}") from None
        if self.dashboard:
            print(f"cfbench: Ray dashboard at http://{context.dashboard_url}", file=sys.stderr,
                  flush=True)

    def run(self, jobs: Sequence[Job], on_records: OnRecords, on_start: OnStart) -> None:
        if not jobs:
            return
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            self._init(ray)
        todo = deque(jobs)
        pending: dict[Any, tuple[Job, str, float]] = {}  # job, started at, when to cancel it
        try:
            task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_ray_task)
            window = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)
                                                // self.cpus))
            threads = max(1, int(self.cpus))
            while todo or pending:
                while todo and len(pending) < window:
                    job = todo.popleft()
                    pending[task.remote(job, self.setup, threads)] = (
                        job, _now(), self.setup.kill_at(job, time.monotonic()))
                    on_start(job)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=_wait_until(
                    min(t for _, _, t in pending.values())))
                for ref in ready:
                    job, started_at, _ = pending.pop(ref)
                    try:
                        records = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # a dead worker or node
                        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        records = _unfinished(job, "failed", f"WorkerCrashed: "
                                              f"{type(exc).__name__}: {reason}", started_at)
                    on_records(records)
                for ref, (job, started_at, deadline) in list(pending.items()):
                    if time.monotonic() > deadline:
                        ray.cancel(ref, force=True)
                        del pending[ref]
                        on_records(_unfinished(job, "failed", f"RunTimeout: the run exceeded "
                                               f"its timeout of {self.setup.limit(job):g} s and "
                                               "its task was cancelled", started_at))
        except KeyboardInterrupt:
            for ref, (job, started_at, _) in pending.items():
                ray.cancel(ref, force=True)
                on_records(_interrupted(job, started_at))
            raise
        finally:
            if started_here:
                ray.shutdown()


def make_executor(name: str, setup: RunSetup, *, workers: int | None = None,
                  address: str | None = None, cpus: float = 1.0, gpus: float = 0.0,
                  dashboard: bool = False) -> Executor:
    """The executor called `name` (serial, process or ray)."""
    if address is not None and name != "ray":
        raise CfbenchError("--address names a Ray cluster: use it with --executor ray")
    if dashboard and (name != "ray" or address is not None):
        raise CfbenchError("--ray-dashboard starts the dashboard of the local Ray instance: use "
                           "it with --executor ray and without --address (a cluster has its own)")
    if name == "serial":
        if workers is not None:
            raise CfbenchError("--workers applies to the process and ray executors")
        return SerialExecutor(setup)
    if name == "process":
        return ProcessExecutor(setup) if workers is None else ProcessExecutor(setup, workers)
    if name == "ray":
        _import_ray()  # not installed: say so before anything runs
        if dashboard:
            _check_dashboard()
        return RayExecutor(setup, address, cpus, gpus, workers, dashboard)
    raise CfbenchError(f"unknown executor '{name}'; choose one of serial, process, ray")
