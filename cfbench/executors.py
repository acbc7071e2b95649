"""Where the runs of a sweep execute: serially, in a local process pool, or as Ray tasks.

One interface: ``executor.run(configs, on_record)`` calls ``on_record`` in the driver process
with each run's record as soon as the run finishes, so the driver alone writes the store. A run
never takes the sweep down: an exception or a non-finite loss is a failed record (from
`execute`), a run past its timeout is stopped and recorded as failed, and a worker that dies
(killed, out of memory, a segfault) is a failed record naming the crash; a fresh worker takes
its place. On Ctrl-C the runs in flight are recorded as interrupted, workers are stopped, and
KeyboardInterrupt propagates.

Workers are forked from a ``forkserver`` process that has imported torch and cfbench but run
nothing, so no fork ever happens after torch started threads, and a worker (or its replacement
after a crash) starts in a fraction of a second instead of importing torch again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
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

KILL_GRACE_S = 30.0
"""A run past its timeout normally stops itself (an alarm inside the run); a worker still busy
this much later is killed by the driver."""

OnRecord = Callable[[RunRecord], None]


@dataclass(frozen=True)
class RunSetup:
    """What every worker needs to execute a configuration."""

    data_root: Path
    plugins: tuple[str, ...] = ()
    """Python files registering strategies or scenarios, imported in every worker."""
    timeout: float | None = None
    """Seconds a run may take (training and evaluation; loading the data is not counted);
    past it the run is recorded as failed."""


class RunTimeout(Exception):
    """A run exceeded its time limit (raised inside the run by an alarm)."""


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
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_loaded_plugins: set[str] = set()


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


def run_one(config: RunConfig, setup: RunSetup) -> RunRecord:
    """Execute one configuration in this process; every outcome is a record."""
    from cfbench.cli import load_plugin
    from cfbench.experiment import execute, load_scenario, unfinished_record

    try:
        for path in setup.plugins:
            if path not in _loaded_plugins:
                load_plugin(path)
                _loaded_plugins.add(path)
        # Loading the data is a worker's one-time cost (it is cached), not the run's: it is
        # done before the clock starts. A failure here recurs inside execute, which records it.
        with contextlib.suppress(Exception):
            load_scenario(config.scenario, config.scenario_options, config.scenario_seed,
                          setup.data_root, config.device)
        with _deadline(setup.timeout):
            return execute(config, setup.data_root)
    except RunTimeout as exc:  # fired outside execute's own handler
        return unfinished_record(config, "failed", f"RunTimeout: {exc}")
    except CfbenchError as exc:  # the worker's environment differs from the driver's
        return unfinished_record(config, "failed", f"CfbenchError: {exc}")


class Executor(ABC):
    """Runs configurations and hands each record to `on_record` in the calling process."""

    setup: RunSetup

    @abstractmethod
    def run(self, configs: Sequence[RunConfig], on_record: OnRecord) -> None:
        """Execute every configuration; on Ctrl-C record those in flight as interrupted and
        re-raise KeyboardInterrupt."""


def _interrupted(config: RunConfig, started_at: str) -> RunRecord:
    from cfbench.experiment import unfinished_record

    return unfinished_record(config, "interrupted", "interrupted (Ctrl-C) while running; "
                             "`--resume` reruns it", started_at)


def _failed(config: RunConfig, reason: str, started_at: str) -> RunRecord:
    from cfbench.experiment import unfinished_record

    return unfinished_record(config, "failed", reason, started_at)


@dataclass
class SerialExecutor(Executor):
    """One run after another in this process (the scenario's tensors are loaded once)."""

    setup: RunSetup

    def run(self, configs: Sequence[RunConfig], on_record: OnRecord) -> None:
        for config in configs:
            started = _now()
            try:
                record = run_one(config, self.setup)
            except KeyboardInterrupt:
                on_record(_interrupted(config, started))
                raise
            on_record(record)


# ---------------------------------------------------------------- local process pool


PRELOAD = ["torch", "cfbench.experiment", "cfbench.executors", "cfbench.strategies",
           "cfbench.scenarios", "torch._dynamo", "torch._inductor", "torch.onnx", "sympy"]
"""Imported once by the fork server; every worker forked from it starts with them (the last
four are what the FLOP counter imports on first use: seconds per worker otherwise)."""


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when its parent dies. The parent is the fork
    server, which exits when the driver does, even by kill -9."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(conn: Connection, setup: RunSetup, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _die_with_parent()
    import torch

    torch.set_num_threads(threads)
    _warm_up()
    while True:
        try:
            config = conn.recv()
        except EOFError:
            return
        if config is None:
            return
        conn.send(run_one(config, setup))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    config: RunConfig | None = None
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
    each given one run at a time, so the driver always knows which run a worker holds. Each
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

    def run(self, configs: Sequence[RunConfig], on_record: OnRecord) -> None:
        todo = deque(configs)
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
                    if worker.config is None and todo:
                        worker.config, worker.started_at = todo.popleft(), _now()
                        worker.started = time.monotonic()
                        worker.conn.send(worker.config)
                busy = [w for w in pool if w.config is not None]
                if not busy:
                    return
                wait([o for w in busy for o in (w.conn, w.process.sentinel)],
                     timeout=self._next_deadline(busy))
                for worker in busy:
                    record, alive = self._collect(worker)
                    if record is None:
                        continue
                    worker.config = None
                    if not alive:
                        worker.conn.close()
                        pool[pool.index(worker)] = self._start(context, threads)
                    on_record(record)
        except KeyboardInterrupt:
            for worker in pool:
                if worker.config is not None:
                    on_record(_interrupted(worker.config, worker.started_at))
            raise
        finally:
            for worker in pool:
                if worker.process.is_alive():
                    worker.process.kill()
                worker.process.join()
                worker.conn.close()

    def _next_deadline(self, busy: list[_Worker]) -> float | None:
        if self.setup.timeout is None:
            return None
        limit = self.setup.timeout + KILL_GRACE_S
        return max(0.0, min(w.started + limit for w in busy) - time.monotonic())

    def _collect(self, worker: _Worker) -> tuple[RunRecord | None, bool]:
        """(the record, whether the worker lives) once the worker's run has ended: its own
        record, or a failed one if it died or was killed for overrunning; (None, True) while
        the run goes on."""
        config = worker.config
        assert config is not None
        if worker.conn.poll():
            try:
                return worker.conn.recv(), True
            except (EOFError, OSError):
                pass  # it died while sending: a crash, below
        elapsed = time.monotonic() - worker.started
        if worker.process.is_alive():
            if self.setup.timeout is None or elapsed < self.setup.timeout + KILL_GRACE_S:
                return None, True
            worker.process.kill()
            worker.process.join()
            reason = (f"RunTimeout: the run exceeded its timeout of {self.setup.timeout:g} s "
                      f"and its worker, still busy after {elapsed:.0f} s, was killed")
        else:
            worker.process.join()
            reason = (f"WorkerCrashed: the worker process died "
                      f"({_signal_name(worker.process.exitcode)}) {elapsed:.1f} s into this run")
        return _failed(config, reason, worker.started_at), False


# ---------------------------------------------------------------- Ray


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise CfbenchError("the ray executor needs Ray, which is not installed: pip install "
                           "'cfbench[ray]' (or pip install ray)") from None
    return ray


def _ray_task(config: RunConfig, setup: RunSetup, threads: int) -> RunRecord:
    import torch

    torch.set_num_threads(threads)
    _warm_up()  # once per Ray worker process: its parts are cached
    return run_one(config, setup)


@dataclass
class RayExecutor(Executor):
    """Each run a Ray task requesting `cpus` CPUs and `gpus` GPUs (a fraction lets several
    small runs share one GPU). At most `workers` tasks are submitted at once (default: as many
    as the cluster's CPUs hold), so those in flight are those running; records stream back to
    the driver as tasks finish. Connects to `address` (e.g. ``auto`` or ``ray://head:10001``),
    starts a local Ray instance when none is given, or uses the one already initialised."""

    setup: RunSetup
    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    workers: int | None = None

    def run(self, configs: Sequence[RunConfig], on_record: OnRecord) -> None:
        if not configs:
            return
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, include_dashboard=False,
                         logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f" at {self.address}" if self.address else ""
                raise CfbenchError(f"cannot start or reach Ray{where}: {exc}") from None
        try:
            self._run(ray, configs, on_record)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray: Any, configs: Sequence[RunConfig], on_record: OnRecord) -> None:
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_ray_task)
        window = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus))
        threads = max(1, int(self.cpus))
        limit = None if self.setup.timeout is None else self.setup.timeout + KILL_GRACE_S
        todo = deque(configs)
        pending: dict[Any, tuple[RunConfig, str, float]] = {}
        try:
            while todo or pending:
                while todo and len(pending) < window:
                    config = todo.popleft()
                    ref = task.remote(config, self.setup, threads)
                    pending[ref] = (config, _now(), time.monotonic())
                timeout = None if limit is None else max(
                    0.0, min(t for _, _, t in pending.values()) + limit - time.monotonic())
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
                for ref in ready:
                    config, started_at, _ = pending.pop(ref)
                    try:
                        record = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # a dead worker or node
                        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        record = _failed(config, f"WorkerCrashed: {type(exc).__name__}: "
                                                 f"{reason}", started_at)
                    on_record(record)
                for ref, (config, started_at, t0) in list(pending.items()):
                    if limit is not None and time.monotonic() - t0 > limit:
                        ray.cancel(ref, force=True)
                        del pending[ref]
                        on_record(_failed(config, f"RunTimeout: the run exceeded its timeout "
                                                  f"of {self.setup.timeout:g} s and its task "
                                                  "was cancelled", started_at))
        except KeyboardInterrupt:
            for ref, (config, started_at, _) in pending.items():
                ray.cancel(ref, force=True)
                on_record(_interrupted(config, started_at))
            raise


def make_executor(name: str, setup: RunSetup, *, workers: int | None = None,
                  address: str | None = None, cpus: float = 1.0, gpus: float = 0.0
                  ) -> Executor:
    """The executor called `name` (serial, process or ray)."""
    if address is not None and name != "ray":
        raise CfbenchError("--address names a Ray cluster: use it with --executor ray")
    if name == "serial":
        if workers is not None:
            raise CfbenchError("--workers applies to the process and ray executors")
        return SerialExecutor(setup)
    if name == "process":
        return ProcessExecutor(setup) if workers is None else ProcessExecutor(setup, workers)
    if name == "ray":
        _import_ray()  # not installed: say so before anything runs
        return RayExecutor(setup, address, cpus, gpus, workers)
    raise CfbenchError(f"unknown executor '{name}'; choose one of serial, process, ray")
