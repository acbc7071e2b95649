"""Run configurations and run records: the JSON a run leaves behind.

A run id is the hash of the canonical configuration (scenario, setting, strategy with every
hyperparameter resolved, both seeds, the full protocol, the device), so the same experiment always
gets the same id and a finished run can be recognised and skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfbench.errors import CfbenchError
from cfbench.scenario import Protocol

SCHEMA_VERSION = 1
RUN_ID = re.compile(r"[0-9a-f]{16}")
STATUSES = ("ok", "failed", "interrupted")
DEFAULT_OUT = Path("results") / "runs"


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's result. Two seeds are kept apart on purpose:
    `scenario_seed` fixes the task sequence (class order, permutations), `seed` the training
    (initialisation, minibatch order, a strategy's own sampling)."""

    scenario: str
    setting: str
    strategy: str
    hparams: dict[str, dict[str, Any]]
    scenario_options: dict[str, Any]
    scenario_seed: int
    seed: int
    protocol: Protocol
    device: str
    validation: dict[str, Any] | None = None
    """None: the scenario's own test split. Otherwise the arguments of
    `cfbench.validation.validation_split` (fraction, seed, tasks): the run trains on the rest of
    each task's training data and is evaluated on a held-out part of it (`cfbench tune`)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["protocol"] = self.protocol.to_dict()
        if self.validation is None:
            del d["validation"]  # absent, not null: ids of runs on the test split are unchanged
        return d

    @property
    def run_id(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(**{**d, "protocol": Protocol(**d["protocol"])})


@dataclass
class RunRecord:
    """The outcome of one run (schema version 1). R has T+1 rows of scores in [0, 1] (accuracy
    for classification)."""

    run_id: str
    config: dict[str, Any]
    status: str = "ok"
    """One of STATUSES: "ok", "failed" (error says why: an exception, a non-finite loss, a
    timeout, a crashed worker) or "interrupted" (stopped by Ctrl-C; a resumed sweep reruns it)."""
    error: str | None = None
    traceback: str | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    R: list[list[float]] = field(default_factory=list)
    matrices: dict[str, list[list[float]]] = field(default_factory=dict)
    """Measurements shaped like R that the scenario's objective keeps beside it (a language
    model's held-out loss in nats per token); none for classification."""
    metrics: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float | int | None] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    command: str | None = None
    """The command line that produced the run, when it came from the CLI."""
    strategy_log: dict[str, Any] = field(default_factory=dict)
    """What the strategy reported about the run (e.g. where early stopping ended each task)."""
    selection: dict[str, Any] | None = None
    """How the hyperparameters were chosen, when `cfbench tune` chose them (protocol, split,
    seeds, criterion, score). Not part of the config: it does not change the result."""
    schema_version: int = SCHEMA_VERSION

    def to_json(self, indent: int | None = 1) -> str:
        # NaN is not JSON: undefined metrics are written as null.
        d = dataclasses.asdict(self)
        d["metrics"] = {k: (None if v != v else v) for k, v in self.metrics.items()}
        return json.dumps(d, indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise CfbenchError(f"run record schema {d.get('schema_version')} is not supported "
                               f"(this cfbench reads {SCHEMA_VERSION})")
        metrics = {k: (float("nan") if v is None else v) for k, v in d["metrics"].items()}
        return cls(**{**d, "metrics": metrics})


def write_record(record: RunRecord, out_dir: Path) -> Path:
    """Write ``out_dir/<run_id>.json`` atomically: a reader never sees a partial file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{record.run_id}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{record.run_id}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(record.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def read_record(path: Path) -> RunRecord:
    try:
        return RunRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CfbenchError(f"{path} is not a readable run record ({exc})") from None


def read_records(directory: Path) -> list[RunRecord]:
    """Every run record in `directory` (files named <run id>.json; other files are not runs)."""
    if not directory.is_dir():
        raise CfbenchError(f"no run records in {directory}: the directory does not exist")
    return [read_record(p) for p in sorted(directory.glob("*.json"))
            if RUN_ID.fullmatch(p.stem)]


def find_record(run_id: str, directory: Path) -> RunRecord:
    """The record whose id starts with `run_id` (a unique prefix is enough)."""
    matches = sorted(directory.glob(f"{run_id}*.json")) if run_id else []
    if len(matches) != 1:
        problem = "no run" if not matches else f"{len(matches)} runs"
        raise CfbenchError(f"{problem} with id '{run_id}' in {directory}; pass --out DIR if the "
                           "records are elsewhere")
    return read_record(matches[0])


@functools.cache
def _git_sha() -> str | None:
    """The commit cfbench runs from, with "-dirty" when its code (the installed packages and
    pyproject.toml, not results or docs) differs from that commit."""
    here = Path(__file__).parent
    code = [str(here), str(here.parent / "strategies"), str(here.parent / "scenarios"),
            str(here.parent / "pyproject.toml")]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *code], cwd=here, capture_output=True, text=True,
                               timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty.strip() else "")) or None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """Where a run happened: costs are only comparable on the same hardware and versions."""
    import torch

    from cfbench import __version__

    name = (torch.cuda.get_device_name(torch.device(device))
            if device.startswith("cuda") else _cpu_name())
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cfbench": __version__, "git_sha": _git_sha(), "device": device,
            "device_name": name, "threads": torch.get_num_threads(),
            "platform": platform.platform()}
