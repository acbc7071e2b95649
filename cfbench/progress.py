"""What a user sees while a command loads its scenario and executes runs.

On an interactive terminal: a spinner while planning loads the data (seconds, before anything
else is said), then a bar naming the run in flight (scenario/setting/strategy and seed), with
each finished run's line printed above it; spinner and bar vanish when done and leave the lines.
Anywhere else (a pipe, a log file, a test) only the finished runs' lines: nothing is printed
before planning succeeds, so bad input stays one line on stderr.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as _RichProgress
from rich.spinner import Spinner
from rich.text import Text


def _silent(line: str) -> None:
    """Told nothing."""


class Progress:
    """The plain display: each finished run's line, told to `say` (nothing by default)."""

    def __init__(self, say: Callable[[str], None] = _silent) -> None:
        self.say = say

    @contextlib.contextmanager
    def loading(self, what: str) -> Iterator[None]:
        """Around planning, which loads `what` (a scenario's data)."""
        yield

    @contextlib.contextmanager
    def running(self, total: int) -> Iterator[None]:
        """Around the execution of `total` runs."""
        yield

    def started(self, run_id: str, label: str) -> None:
        """Run `run_id`, described by `label`, has begun."""

    def finished(self, run_id: str, line: str) -> None:
        """Run `run_id` has ended; `line` says how."""
        self.say(line)


class ProgressBar(Progress):
    """The terminal's display: a spinner while loading, then a bar of runs done out of
    `total`, naming the run in flight (the first of several, with how many more)."""

    def __init__(self, console: Console) -> None:
        super().__init__(lambda line: console.print(line, soft_wrap=True))
        self.console = console
        self._bar: _RichProgress | None = None
        self._in_flight: dict[str, str] = {}

    @contextlib.contextmanager
    def loading(self, what: str) -> Iterator[None]:
        spinner = Spinner("dots", Text(f"loading {what} ..."))
        with Live(spinner, console=self.console, transient=True, refresh_per_second=12.5):
            yield  # drawn on entry, before the data is read

    @contextlib.contextmanager
    def running(self, total: int) -> Iterator[None]:
        bar = _RichProgress(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                            BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=self.console, transient=True)
        bar.add_task("starting", total=total)
        self._bar = bar
        try:
            with bar:
                yield
        finally:
            self._bar = None
            self._in_flight.clear()

    def started(self, run_id: str, label: str) -> None:
        self._in_flight[run_id] = label
        self._show(advance=0)

    def finished(self, run_id: str, line: str) -> None:
        super().finished(run_id, line)  # printed above the bar
        self._in_flight.pop(run_id, None)
        self._show(advance=1)

    def _show(self, advance: int) -> None:
        if self._bar is None:
            return
        (task,) = self._bar.tasks
        labels = list(self._in_flight.values())
        more = f" (+{len(labels) - 1} more)" if len(labels) > 1 else ""
        done = task.total is not None and task.completed + advance >= task.total
        text = (f"running {labels[0]}{more}" if labels
                else "done" if done else "waiting for the next run")
        self._bar.update(task.id, description=text, advance=advance, refresh=True)


def for_stderr(say: Callable[[str], None], quiet: bool) -> Progress:
    """A bar when stderr is an interactive terminal, else the finished runs' lines through
    `say`; nothing at all when `quiet`."""
    if quiet:
        return Progress()
    console = Console(stderr=True, markup=False, emoji=False, highlight=False)
    return ProgressBar(console) if console.is_interactive else Progress(say)
