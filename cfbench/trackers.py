"""Experiment trackers: ``--log tensorboard|wandb|mlflow`` (or a sweep file's ``log:``) sends
each run record, once it is committed, to one tracker run named by its run id and grouped by
the plan it belongs to (a sweep's name): the configuration, the training-loss curve, R after
each task, the final metrics and costs, and a figure of R.

Trackers run in the driver after the record is written (``runs.run_plan``), so they work with
every executor and with stacked jobs, and a tracker that fails costs a one-line warning, never a
record. `Tracking` checks when a command starts that each library is installed; a library is
imported only when its tracker first logs. Adding a tracker is one `Tracker` subclass in
`TRACKERS`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cfbench.errors import CfbenchError

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

    from cfbench.records import RunRecord

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Logged:
    """What every tracker logs of one record, computed once."""

    run_id: str
    group: str
    label: str
    status: str
    error: str | None
    config: dict[str, Any]
    """The record's configuration as it is stored (nested)."""
    params: dict[str, Scalar]
    """The configuration flattened to dotted keys (``protocol.lr``, ``hparams.ewc.lam``)."""
    loss: list[tuple[int, float]]
    """(optimizer steps taken, over all tasks, at the end of a chunk; its mean training loss)."""
    rows: list[dict[str, float]]
    """Row t of R (after t tasks trained) as ``{"R/task_i": score}``."""
    final: dict[str, float]
    """``metrics/NAME`` and ``cost/NAME``: each finite number the record holds."""
    figure: np.ndarray | None
    """``plots.run_figure`` as an RGB image (None: the run has no R)."""

    @classmethod
    def of(cls, record: RunRecord, group: str, label: str) -> Logged:
        loss, start = [], 0
        for task, curve in zip(record.tasks, record.curves.get("train_loss", []), strict=False):
            steps = task.get("steps", 0)
            loss += [(start + -(-(j + 1) * steps // len(curve)), value)
                     for j, value in enumerate(curve) if math.isfinite(value)]
            start += steps
        rows = [{f"R/task_{i + 1}": v for i, v in enumerate(row) if math.isfinite(v)}
                for row in record.R]
        final = {f"{kind}/{name}": float(value)
                 for kind, values in (("metrics", record.metrics), ("cost", record.cost))
                 for name, value in values.items()
                 if isinstance(value, int | float) and math.isfinite(value)}
        from cfbench.plots import run_figure

        figure = _pixels(run_figure(record)) if record.R else None
        return cls(record.run_id, group, label, record.status, record.error, record.config,
                   _flat(record.config), loss, rows, final, figure)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, Scalar) else json.dumps(value)
    return out


def _pixels(fig: Figure) -> np.ndarray:
    """`fig` drawn by Agg, as an RGB array (height, width, 3)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class Tracker:
    """One experiment tracker: `log` writes one record as one tracker run under `directory`."""

    name: ClassVar[str]
    library: ClassVar[str]
    """The module it needs; the extra ``cfbench[name]`` installs it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def log(self, run: Logged) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    """Event files in ``DIR/tensorboard/GROUP/RUN_ID`` (``tensorboard --logdir
    DIR/tensorboard``); the configuration and final metrics in the HParams tab. A rerun
    replaces its run's events, as it replaces its record."""

    name = library = "tensorboard"

    def log(self, run: Logged) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        where = self.directory / "tensorboard" / run.group / run.run_id
        for old in where.glob("events.out.tfevents.*"):
            old.unlink()
        with SummaryWriter(str(where)) as writer:
            writer.add_text("run", f"{run.label} ({run.status})"
                            + (f": {run.error}" if run.error else ""))
            writer.add_text("config", "    " + json.dumps(run.config, indent=1).replace(
                "\n", "\n    "))  # indented: Markdown shows it as code
            for step, value in run.loss:
                writer.add_scalar("train/loss", value, step)
            for t, row in enumerate(run.rows):
                for tag, value in row.items():
                    writer.add_scalar(tag, value, t)
            for tag, value in run.final.items():
                writer.add_scalar(tag, value, len(run.rows) - 1)
            if run.figure is not None:
                writer.add_image("R", run.figure, dataformats="HWC")
            for summary in hparams(run.params, {k: v for k, v in run.final.items()
                                                if k.startswith("metrics/")}):
                writer.file_writer.add_summary(summary)


class WandB(Tracker):
    """A W&B run in project ``$WANDB_PROJECT`` (default cfbench), grouped by the plan, under
    ``DIR/wandb``; offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads)."""

    name = library = "wandb"

    def log(self, run: Logged) -> None:
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        tracked = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cfbench"), group=run.group,
            name=run.run_id, notes=run.label, tags=[run.status], config=run.config,
            dir=str(self.directory), reinit="create_new",
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            settings=wandb.Settings(console="off", silent=True))
        try:
            tracked.define_metric("train/step")
            tracked.define_metric("train/loss", step_metric="train/step")
            tracked.define_metric("tasks_trained")
            tracked.define_metric("R/*", step_metric="tasks_trained")
            for step, value in run.loss:
                tracked.log({"train/step": step, "train/loss": value})
            for t, row in enumerate(run.rows):
                tracked.log({"tasks_trained": t, **row})
            if run.figure is not None:
                tracked.log({"R": wandb.Image(run.figure)})
            tracked.summary.update(run.final)
        finally:
            tracked.finish(exit_code=0 if run.status == "ok" else 1)


class MLflow(Tracker):
    """An MLflow run in the experiment named by the group: at ``$MLFLOW_TRACKING_URI`` if set,
    else in the SQLite store ``DIR/mlflow.db`` with artifacts in ``DIR/mlflow-artifacts``
    (``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db``)."""

    name = library = "mlflow"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._client: Any = None

    def log(self, run: Logged) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        own_store = not os.environ.get("MLFLOW_TRACKING_URI")
        if self._client is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(
                f"sqlite:///{(self.directory / 'mlflow.db').resolve()}" if own_store else None)
        client = self._client
        experiment = client.get_experiment_by_name(run.group)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            run.group, artifact_location=(self.directory / "mlflow-artifacts").resolve().as_uri()
            if own_store else None)
        run_id = client.create_run(experiment_id, run_name=run.run_id, tags={
            "cfbench.run_id": run.run_id, "cfbench.label": run.label,
            "cfbench.status": run.status}).info.run_id
        try:
            metrics = [Metric("train/loss", value, 0, step) for step, value in run.loss]
            metrics += [Metric(tag, value, 0, t) for t, row in enumerate(run.rows)
                        for tag, value in row.items()]
            metrics += [Metric(tag, value, 0, len(run.rows) - 1)
                        for tag, value in run.final.items()]
            params = [Param(key, str(value)) for key, value in run.params.items()]
            for start in range(0, len(metrics), 1000):  # MLflow's limits per call
                client.log_batch(run_id, metrics=metrics[start:start + 1000])
            for start in range(0, len(params), 100):
                client.log_batch(run_id, params=params[start:start + 100])
            client.log_dict(run_id, run.config, "config.json")
            if run.figure is not None:
                client.log_image(run_id, run.figure, "R.png")
        finally:
            client.set_terminated(run_id, "FINISHED" if run.status == "ok" else "FAILED")


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, WandB, MLflow)}


def group_name(name: str) -> str:
    """A plan's name as trackers group by it and TensorBoard names a folder ("cfbench run"
    -> "cfbench-run")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "runs"


@dataclass(frozen=True)
class Tracking:
    """The trackers a command logs to and where (None: a folder ``logs`` beside the records);
    a tracker that is unknown or whose library is missing is an error when it is made."""

    names: tuple[str, ...]
    directory: Path | None = None

    def __post_init__(self) -> None:
        for name in self.names:
            if name not in TRACKERS:
                raise CfbenchError(f"unknown tracker '{name}'; use {', '.join(TRACKERS)}")
            library = TRACKERS[name].library
            try:
                missing = find_spec(library) is None
            except ImportError:
                missing = True
            if missing:
                raise CfbenchError(f"logging to {name} needs the {library} package: pip install "
                                   f"'cfbench[{name}]'")

    def where(self, records: Path) -> Path:
        """Where the logs go when the records go to `records` (a directory or a store)."""
        return self.directory if self.directory is not None else records.parent / "logs"

    def start(self, directory: Path, group: str, warn: Callable[[str], None]
              ) -> Callable[[RunRecord, str], None]:
        """A function that logs one record (and its label) to every tracker in `directory`,
        grouped as `group`; a tracker that fails is a one-line `warn`."""
        from cfbench.formats import one_line

        trackers = [TRACKERS[name](directory) for name in self.names]
        group = group_name(group)

        def log(record: RunRecord, label: str) -> None:
            try:
                run = Logged.of(record, group, label)
            except Exception as exc:
                warn(one_line(f"warning: run {record.run_id} was not logged: "
                              f"{type(exc).__name__}: {exc}"))
                return
            for tracker in trackers:
                try:
                    tracker.log(run)
                except Exception as exc:
                    warn(one_line(f"warning: {tracker.name} did not log run {record.run_id}: "
                                  f"{type(exc).__name__}: {exc}"))

        return log


def tracking(names: Sequence[str], directory: str | None) -> Tracking | None:
    """The `Tracking` of ``--log`` names (and a sweep file's), None without any."""
    names = tuple(dict.fromkeys(names))
    if not names:
        if directory is not None:
            raise CfbenchError("--log-dir without --log: name a tracker, e.g. --log tensorboard")
        return None
    return Tracking(names, Path(directory) if directory is not None else None)
