"""The one run path: `run`, `sweep`, `reproduce` and `tune` each plan runs and hand them to
`run_plan`, which applies the resume rule against a `Sink` (a JSON directory and/or a results
store), groups what is left into jobs (stacked runs), has an executor run them and commits each
record the moment it arrives. KeyboardInterrupt (Ctrl-C; SIGTERM too under the CLI) stops it:
the runs in flight are recorded as interrupted and every finished one is kept.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfbench.errors import CfbenchError
from cfbench.executors import Executor, Job, make_jobs
from cfbench.progress import Progress
from cfbench.records import RunConfig, RunRecord, read_records, write_record
from cfbench.store import Store

if TYPE_CHECKING:
    from cfbench.trackers import Tracking

Report = Callable[[str], None]

MOST_RUNS = 10_000
"""A plan of more runs is refused unless the user confirms it (``--yes``): a typo in a grid or
a seed count should cost one line, not minutes of planning and gigabytes of memory."""


def check_run_count(count: int, yes: bool) -> None:
    """Refuse a plan of more than MOST_RUNS runs without `yes`; `count` comes from the sizes of
    the grid, before it is expanded."""
    if count > MOST_RUNS and not yes:
        raise CfbenchError(f"this plans {count} runs, more than {MOST_RUNS}; pass --yes to run "
                           "them all, or shrink the grid (fewer values, seeds or settings)")


def check_writable(path: Path, flag: str, *, directory: bool) -> None:
    """Raise unless `path` can take output: a directory of records (`directory`) or a store
    file, itself or its nearest existing ancestor writable. Checked before anything trains, so
    no finished run is lost to an output that cannot be written."""
    if directory and path.exists() and not path.is_dir():
        raise CfbenchError(f"{flag} {path} is a file; give a directory")
    if not directory and path.is_dir():
        raise CfbenchError(f"{flag} {path} is a directory; give a file name, e.g. "
                           f"{path / 'runs.sqlite'}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise CfbenchError(f"{flag} {path}: {existing} is a file, not a directory")
    for place in {existing, existing if existing.is_dir() else existing.parent}:
        if not os.access(place, os.W_OK):
            raise CfbenchError(f"{flag} {path}: {place} is not writable")


def silent(text: str) -> None:
    """A report nobody reads."""


def plural(count: int, noun: str) -> str:
    """``1 run``, ``2 runs``: a count and its noun, in the right number."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class PlannedRun:
    """One run of a plan, the values it takes from a grid (for display) and, for a run whose
    values `cfbench tune` chose, how they were chosen (copied into its record)."""

    config: RunConfig
    point: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] | None = None

    def values(self) -> str:
        """The grid values, e.g. ``lam=10 hidden=100,100``."""
        return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                        for k, v in self.point.items())

    def label(self) -> str:
        c = self.config
        where = "[validation] " if c.validation is not None else ""
        return " ".join(filter(None, (f"{where}{c.scenario}/{c.setting}/{c.strategy}",
                                      self.values(), f"seed {c.seed}")))


@dataclass
class Outcome:
    """What one `run_plan` did: records by status, and those skipped as already ok."""

    ok: list[RunRecord] = field(default_factory=list)
    failed: list[RunRecord] = field(default_factory=list)
    interrupted: list[RunRecord] = field(default_factory=list)
    skipped: list[RunRecord] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    def add(self, record: RunRecord) -> None:
        getattr(self, record.status if record.status in ("ok", "interrupted") else "failed"
                ).append(record)

    def records(self) -> list[RunRecord]:
        """Every record of the plan: those skipped (ok before) and those made now."""
        return [*self.skipped, *self.ok, *self.failed, *self.interrupted]

    def summary(self, name: str, where: str) -> str:
        lines = [f"{name}: {len(self.ok)} ok, {len(self.failed)} failed, "
                 f"{len(self.interrupted)} interrupted, {len(self.skipped)} skipped (already ok "
                 f"in {where})"]
        if self.failed:
            lines.append(f"failed {'run' if len(self.failed) == 1 else 'runs'}:")
            lines += [f"  {r.run_id} {self.labels.get(r.run_id, '')}: {r.error}"
                      for r in self.failed]
        if self.interrupted:
            lines.append(f"{plural(len(self.interrupted), 'run')} interrupted; `--resume` "
                         f"reruns {'it' if len(self.interrupted) == 1 else 'them'}")
        return "\n".join(lines)


class Sink:
    """Where records go: a JSON directory (one file per run), a results store, or both. A run is
    held when either has it (resume reads both); the store is written last, so a run it holds is
    in the directory too. Reading a sink creates nothing; making one checks that both can be
    written."""

    def __init__(self, out: str | Path | None = None, store: str | Path | None = None) -> None:
        self.out = Path(out) if out is not None else None
        self.store_path = Path(store) if store is not None else None
        if self.out is not None:
            check_writable(self.out, "--out", directory=True)
        if self.store_path is not None:
            check_writable(self.store_path, "--store", directory=False)
        self._store: Store | None = None
        self.where = " and ".join([*([f"{self.out}/"] if self.out is not None else []),
                                   *([f"store {self.store_path}"] if self.store_path else [])])

    def stored(self) -> dict[str, RunRecord]:
        """Run id -> record of every run the sink holds, in the directory or the store (the
        store's copy wins): a fresh clone's committed records count as stored, though the
        store, which git does not keep, is new."""
        held: dict[str, RunRecord] = {}
        if self.out is not None and self.out.is_dir():
            held.update((r.run_id, r) for r in read_records(self.out))
        if self.store_path is not None and self.store_path.exists():
            with Store(self.store_path) as store:
                held.update((r.run_id, r) for r in store.records())
        return held

    def put(self, record: RunRecord) -> None:
        if self.out is not None:
            write_record(record, self.out)
        self._put_in_store(record)

    def adopt(self, records: Iterable[RunRecord]) -> None:
        """Copy into the store the held records that only the directory has (a fresh clone's
        committed records), so the store alone tabulates every run."""
        if self.store_path is None:
            return
        in_store: set[str] = set()
        if self.store_path.exists():
            with Store(self.store_path) as store:
                in_store = store.finished_ids()
        missing = [r for r in records if r.run_id not in in_store]
        if missing:
            self._store = self._store or Store(self.store_path)
            self._store.put_many(missing)

    def _put_in_store(self, record: RunRecord) -> None:
        if self.store_path is not None:
            self._store = self._store or Store(self.store_path)
            self._store.put(record)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._store is not None:
            self._store.close()


def check_stored(runs: Sequence[PlannedRun], sink: Sink, resume: bool, replace: bool = False
                 ) -> dict[str, RunRecord]:
    """The sink's records of these runs. Without `resume` or `replace` any is an error: a sink
    holds one attempt per run unless the user asks to continue it."""
    ids = {run.config.run_id for run in runs}
    stored = {run_id: r for run_id, r in sink.stored().items() if run_id in ids}
    if stored and not (resume or replace):
        done = sum(r.status == "ok" for r in stored.values())
        held = (f"this run (status {next(iter(stored.values())).status})" if len(ids) == 1
                else f"{len(stored)} of these {len(ids)} runs ({done} ok)")
        raise CfbenchError(f"{sink.where} already holds {held}; pass --resume to "
                           "skip the finished ones and rerun the rest, or give another "
                           f"{'--store' if sink.store_path else '--out'}")
    return stored


@dataclass(frozen=True)
class RunOptions:
    """How a command's runs execute and what it is told: the same for every command."""

    executor: Executor
    resume: bool = False
    """Skip runs the sink holds with status ok; rerun failed and interrupted ones. Without it,
    a sink holding any run of the plan is an error, unless `replace`."""
    replace: bool = False
    """Without `resume`, rerun every run and replace what the sink holds (`cfbench run`)."""
    stack: bool = False
    """Train runs that can share a stacked job as one (``executors.make_jobs``)."""
    command: str | None = None
    tracking: Tracking | None = None
    """Experiment trackers each committed record is logged to (``--log``)."""
    progress: Progress = field(default_factory=Progress)
    """Told each run as it starts and its line as it ends (``cfbench.progress``)."""
    report: Report = silent  # told notes (runs not stacked) and the summary at the end


def run_plan(runs: Sequence[PlannedRun], sink: Sink, name: str, options: RunOptions
             ) -> Outcome:
    """Run what the sink does not hold as ok yet and commit each record as it arrives.
    KeyboardInterrupt (Ctrl-C or SIGTERM) propagates after the runs in flight are committed as
    interrupted and the summary is reported."""
    stored = check_stored(runs, sink, options.resume, options.replace)
    ok = {run_id: r for run_id, r in stored.items() if r.status == "ok" and options.resume}
    sink.adopt(ok.values())
    for run in runs:  # a run tune now chooses, recorded before (e.g. at its defaults)
        record = ok.get(run.config.run_id)
        if record is not None and run.selection and record.selection != run.selection:
            record.selection = run.selection
            with _signals_deferred():
                sink.put(record)
    todo = {run.config.run_id: run for run in runs if run.config.run_id not in ok}
    outcome = Outcome(skipped=list(ok.values()),
                      labels={run.config.run_id: run.label() for run in runs})
    log = None
    if options.tracking is not None:  # after the commit: a tracker's failure loses no record
        logs = options.tracking.where(sink.store_path or sink.out or Path("."))
        check_writable(logs, "--log-dir", directory=True)
        log = options.tracking.start(logs, name, options.report)

    def on_records(records: list[RunRecord]) -> None:
        for record in records:
            record.command = options.command
            record.selection = todo[record.run_id].selection or record.selection
            with _signals_deferred():
                sink.put(record)
                outcome.add(record)
            seconds = record.cost.get("train_seconds")
            took = f" ({seconds:.1f} s training)" if seconds else ""
            problem = f": {record.error}" if record.error else ""
            done = len(outcome.ok) + len(outcome.failed) + len(outcome.interrupted)
            options.progress.finished(record.run_id, f"[{done}/{len(todo)}] {record.status} "
                                      f"{record.run_id} {outcome.labels[record.run_id]}{took}"
                                      f"{problem}")
            if log is not None:
                log(record, outcome.labels[record.run_id])

    jobs = make_jobs([run.config for run in todo.values()], options.stack, options.report,
                     options.executor.slots)
    def on_start(job: Job) -> None:
        for config in job:
            options.progress.started(config.run_id, outcome.labels[config.run_id])

    try:
        with options.progress.running(len(todo)):
            options.executor.run(jobs, on_records, on_start)
    except KeyboardInterrupt:  # say what was kept before it propagates
        options.report(outcome.summary(name, sink.where))
        raise
    options.report(outcome.summary(name, sink.where))
    return outcome


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, so a record is never half-committed;
    then each caught signal is delivered to the handler it would have reached."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught:
            signal.raise_signal(signum)
